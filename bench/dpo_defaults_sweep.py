"""Choose the DPO defaults by measurement: (learning_rate, n_epochs, beta) on SmolLM2-135M-Instruct.

Each point runs alignd's DPO recipe in process (``workers.local``, no service): the built-in
concise-vs-verbose pairs (``bench/data.py``: ``--train`` training pairs, ``--val`` held-out pairs on
other questions), LoRA with the defaults (r 16, alpha 32, q/k/v/o, dropout 0), batch 8, max_length
128, the other hyperparameters at their defaults, and the retention probe of ``workers/demo_data.py``
(20 facts the base answers right) as ``retention_file``. It prints, per point:

* ``acc``: held-out implicit-reward accuracy (``eval/rewards/accuracies`` at the end);
* ``ret``: ``eval/retention``, the share of the probe facts the base got right that the policy keeps;
* ``len``: mean greedy answer length (words, up to 64 new tokens) of the policy over the base's, on
  the held-out prompts (below 1: DPO made the answers shorter, the preference this data teaches).

Run (each point is ~1-2 min on 2 idle cores; hold the shared lock):
``flock /tmp/cpu.lock .venv/bin/python bench/dpo_defaults_sweep.py --points 5e-4:1:0.1 1e-3:2:0.1``.
The last line is ``dpo_defaults_sweep points=<n>``; one ``point lr=.. epochs=.. beta=.. acc=.. ret=..
len=.. seconds=..`` line per point.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODEL = "SmolLM2-135M-Instruct"
LENGTH_TOKENS = 64


def train_point(workdir: Path, *, train: int, val: int, seed: int = 0, training: dict[str, Any] | None = None,
                model: str = MODEL, **hyperparameters: Any) -> dict[str, float]:
    """One DPO run in process; ``acc``, ``ret``, ``len`` (see the module docstring) and ``seconds``."""
    import torch

    from bench.data import preference_pairs
    from service.jobs.spec import DpoHyperparameters, LoraTraining
    from service.settings import Settings
    from workers import data as D
    from workers.demo_data import RETENTION_GRADER, retention_rows
    from workers.local import local_context, method_of
    from workers.modeling import causal_lm_of, eos_token_ids
    from workers.recipes.dpo import DPORecipe
    from workers.retention import greedy_answers

    torch.manual_seed(seed)
    hp = DpoHyperparameters(**{"batch_size": 8, "max_length": 128, "retention_file": "probe",
                               "retention_grader": RETENTION_GRADER, **hyperparameters})
    validation = preference_pairs(val, "validation")
    settings = Settings.from_env()
    ctx = local_context(workdir, model=model, method=method_of("dpo", hp), seed=seed,
                        training_type=LoraTraining(**(training or {})),
                        training_rows=preference_pairs(train, "train"), validation_rows=validation,
                        settings=replace(settings, data_dir=workdir / "data"),
                        extra_files={"retention_file": retention_rows()})
    began = time.perf_counter()
    recipe = DPORecipe(ctx)
    recipe.setup()
    result = recipe.train()
    prompts = [D.prompt_ids(D.normalize_prompt({"prompt": row["prompt"]}), recipe.tokenizer, 512)
               for row in validation]
    eos = eos_token_ids(causal_lm_of(recipe.model), recipe.tokenizer)

    def words(base: bool) -> float:
        def answer() -> list[str]:
            return greedy_answers(recipe.model, recipe.tokenizer, prompts, max_new_tokens=LENGTH_TOKENS,
                                  eos_ids=eos, device=recipe.accelerator.device)
        if base:
            with recipe.model.disable_adapter():
                texts = answer()
        else:
            texts = answer()
        return sum(len(t.split()) for t in texts) / len(texts)

    ratio = words(False) / max(words(True), 1e-9)
    seconds = time.perf_counter() - began
    recipe.cleanup()
    summary = result.summary or {}
    return {"acc": summary["eval/rewards/accuracies"], "ret": summary["eval/retention"], "len": ratio,
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", nargs="+", default=["5e-4:1:0.1"], help="lr:epochs:beta")
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--val", type=int, default=32)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    for point in args.points:
        lr, epochs, beta = point.split(":")
        with tempfile.TemporaryDirectory() as tmp:
            out = train_point(Path(tmp), train=args.train, val=args.val, learning_rate=float(lr),
                              n_epochs=int(epochs), beta=float(beta))
        print(f"point lr={lr} epochs={epochs} beta={beta} acc={out['acc']:.2f} ret={out['ret']:.2f} "
              f"len={out['len']:.2f} seconds={out['seconds']:.0f}", flush=True)
    print(f"dpo_defaults_sweep points={len(args.points)}")


if __name__ == "__main__":
    main()
