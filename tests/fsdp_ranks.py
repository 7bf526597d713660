"""Full fine-tunes of tiny-random-llama through the real recipes, in this process or as one rank of
several: ``python -m torch.distributed.run --standalone --nproc-per-node N -m tests.fsdp_ranks SPEC OUT``.

``SPEC`` (JSON) lists runs (recipe kind, hyperparameters, strategy, a step to pause at, a checkpoint
to resume from); every rank runs them in order over one object store (``workers.local``), and rank 0
writes what each run reported to ``OUT``: its step metrics (combined over the ranks), its
checkpoints and its result archive's key. ``tests/test_fsdp.py`` compares those with the same runs
in one process.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

TINY = "tiny-random-llama"
PREFERENCES = [
    {"prompt": f"What is {a} plus {b}?", "chosen": f"{a + b}.",
     "rejected": f"Well, let me think about this carefully. Adding {a} and {b} together gives {a + b}."}
    for a in range(1, 9) for b in (2, 5)
]
CHATS = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]}
         for r in PREFERENCES]
RECIPES = {
    "dpo": ("workers.recipes.dpo:DPORecipe", "DpoHyperparameters", PREFERENCES),
    "supervised": ("workers.recipes.sft:SFTRecipe", "SupervisedHyperparameters", CHATS),
    "reward_model": ("workers.recipes.reward_model:RewardModelRecipe", "RewardModelHyperparameters", PREFERENCES),
}


def run_recipe(root: Path, run: dict[str, Any], model_cache: Path) -> dict[str, Any]:
    """One run of a recipe on a full fine-tune of tiny-random-llama; what its reporter heard."""
    import importlib
    import tempfile

    from service.jobs import spec
    from service.settings import Settings
    from service.storage import LocalStore
    from workers.local import MemoryReporter, local_context, method_of

    kind = run["kind"]
    target, hp_name, rows = RECIPES[kind]
    hp = getattr(spec, hp_name)(**run["hp"])
    reporter = MemoryReporter(stop_at={int(k): v for k, v in (run.get("stop_at") or {}).items()})
    workdir = Path(tempfile.mkdtemp(prefix="rank-", dir=root))  # each rank its own, as on separate nodes
    ctx = local_context(workdir, model=TINY, method=method_of(kind, hp), training_type=spec.FullTraining(),
                        training_rows=rows, seed=run.get("seed", 5), job_id=run["job_id"],
                        settings=replace(Settings.from_env(root / "data"), model_cache_dir=model_cache),
                        store=LocalStore(root / "objects"), reporter=reporter, strategy=run.get("strategy", "fsdp"))
    if run.get("resume_from"):
        ctx.resume_from = (int(run["resume_from"][0]), str(run["resume_from"][1]))
    module, _, name = target.partition(":")
    recipe = getattr(importlib.import_module(module), name)(ctx)
    saved = {k: os.environ.get(k) for k in run.get("env") or {}}
    os.environ.update(run.get("env") or {})  # e.g. ALIGND_MIXED_PRECISION, read by setup
    try:
        recipe.setup()
        from torch.distributed.fsdp import FSDPModule

        sharded = {name: isinstance(getattr(recipe, name, None), FSDPModule)
                   for name in ("policy", "scorer", "reference")}
        dtypes = sorted({str(p.dtype) for p in recipe.model.parameters()})
        result = recipe.train()
    finally:
        recipe.cleanup()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {"status": result.status, "steps": reporter.steps, "checkpoints": reporter.checkpoints,
            "adapter_key": result.adapter_key, "resumed_at": reporter.resumed_at, "sharded": sharded,
            "metrics": reporter.metrics, "param_dtypes": dtypes}


def main(argv: list[str]) -> int:
    spec_path, out_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text())
    root, cache = Path(spec["root"]), Path(spec["model_cache"])
    results = {run["name"]: run_recipe(root, run, cache) for run in spec["runs"]}
    if int(os.environ.get("RANK", "0")) == 0:
        out_path.write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
