"""``service/resources.py``'s memory estimate against the measured peak, for every method, on the CPU.

Each case runs the real recipe (``workers.local``: no service) for ``--steps`` steps in a fresh child
process (``spawn``: nothing else lives in it). The child imports everything first, then reads its RSS
(the baseline) and resets the kernel's high-water mark (``/proc/self/clear_refs``); after the recipe it
reads ``VmHWM``. Measured = peak − baseline: the job's own memory, without the interpreter and the
libraries, which a GPU's estimate does not count either.

Like is compared with like: the recipes run fp32 on the CPU (``workers.modeling.choose_precision``), so
the estimate is asked for the CPU's precision (``service.resources.CPU_FP32``: fp32 weights, AdamW state
and activations, no CUDA context) and for the sequence length the data really has (every example here
fills ``max_length``).

The model is SmolLM2-135M's architecture (``service/model_configs/SmolLM2-135M-Instruct.json``) with
random weights drawn once into ``<model cache>/smollm2-135m-random`` (``workers.base_models.random_model``):
the weights (0.54 GB in fp32) dominate the noise of a few MB, and nothing is downloaded.

Run: ``.venv/bin/python bench/memory_estimate.py [--cases sft:lora dpo:full …] [--steps 2]``; prints
one line per case, ``memory_estimate method=<m> training=<lora|full> estimate_bytes=<n>
measured_bytes=<n> ratio=<estimate/measured>``, then a table.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODEL = "smollm2-135m-random"
CONFIG = REPO / "service" / "model_configs" / "SmolLM2-135M-Instruct.json"
#: method (the spec's name) of each case's short name
METHODS = {"sft": "supervised", "reward_model": "reward_model", "dpo": "dpo", "ppo": "ppo",
           "reinforcement": "reinforcement"}
#: PPO and reinforcement train LoRA adapters only (the API refuses a full fine-tune for them)
ALL_CASES = [f"{m}:{t}" for m in METHODS for t in ("lora", "full") if t == "lora" or m not in ("ppo", "reinforcement")]
#: the sizes every case uses: short sequences, so the weights dominate (module docstring)
BATCH, LENGTH, NEW_TOKENS, GROUP = 2, 64, 16, 2
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
         "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango"]


def _text(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(n))


def _settings(workdir: Path) -> Any:
    from service.settings import Settings

    settings = Settings.from_env(workdir / "data")
    cache = Path(os.environ.get("ALIGND_MODEL_CACHE") or REPO / ".alignd" / "models")
    return replace(settings, model_cache_dir=cache, models={**settings.models, MODEL: str(cache / MODEL)})


def model_dir() -> Path:
    """SmolLM2-135M's architecture with seeded random weights, made once (``workers.base_models``)."""
    import json

    from workers.base_models import random_model

    settings = _settings(Path(tempfile.gettempdir()) / "alignd-memory-bench")
    return random_model(Path(settings.model_cache_dir) / MODEL, json.loads(CONFIG.read_text()))


def rows(method: str) -> list[dict[str, Any]]:
    """Examples long enough to fill ``LENGTH`` tokens (truncated there)."""
    if method in ("supervised",):
        return [{"prompt": _text(i, 4), "completion": _text(i + 1, 80)} for i in range(8)]
    if method in ("dpo", "reward_model"):
        return [{"prompt": _text(i, 4), "chosen": _text(i + 1, 80), "rejected": _text(i + 2, 80)}
                for i in range(8)]
    if method == "ppo":
        return [{"prompt": _text(i, 8)} for i in range(8)]
    return [{"messages": [{"role": "user", "content": _text(i, 8)}], "answer": "alpha"} for i in range(8)]


def _method(method: str, steps: int, reward_ref: str | None) -> Any:
    from service.jobs import spec
    from workers.local import method_of

    common = {"batch_size": BATCH, "max_length": LENGTH, "max_steps": steps, "n_epochs": 1}
    if method == "supervised":
        return method_of("supervised", spec.SupervisedHyperparameters(**common))
    if method == "dpo":
        return method_of("dpo", spec.DpoHyperparameters(**common))
    if method == "reward_model":
        return method_of("reward_model", spec.RewardModelHyperparameters(**common))
    if method == "ppo":
        return method_of("ppo", spec.PpoHyperparameters(
            reward_model=reward_ref, rollout_batch_size=BATCH, mini_batch_size=BATCH, max_new_tokens=NEW_TOKENS,
            ppo_epochs=1, max_length=LENGTH, max_steps=steps))
    from service.graders import parse_grader

    grader = parse_grader({"type": "string_check", "name": "a", "input": "{{sample.output_text}}",
                           "reference": "{{item.answer}}", "operation": "like"})
    hp = spec.ReinforcementHyperparameters(batch_size=BATCH, group_size=GROUP, max_new_tokens=NEW_TOKENS,
                                           max_length=LENGTH, max_steps=steps, n_epochs=1)
    return spec.Method(type="reinforcement", reinforcement=spec.ReinforcementMethod(grader=grader, hyperparameters=hp))


def _child(queue: Any, case: str, steps: int) -> None:
    try:
        queue.put(measure(case, steps))
    except BaseException as exc:  # noqa: BLE001 - the parent reports it
        queue.put({"case": case, "error": f"{type(exc).__name__}: {exc}"})


def measure(case: str, steps: int) -> dict[str, Any]:
    """In a fresh process: the recipe's peak RSS above the RSS after every import (module docstring)."""
    import torch  # noqa: F401 - imported before the baseline, as every library below

    from service.jobs.spec import FullTraining, LoraTraining
    from workers import recipes
    from workers.context import ModelRef
    from workers.local import MemoryReporter, local_context
    from workers.memory import current_rss, peak_rss, reset_peak_rss
    from workers.recipes.rl import ppo, reinforcement  # noqa: F401 - every recipe's imports done

    name, training = case.split(":")
    method = METHODS[name]
    workdir = Path(tempfile.mkdtemp(prefix="alignd-memory-"))
    settings = _settings(workdir)
    references: dict[str, ModelRef] = {}
    reward_ref = None
    if method == "ppo":
        from bench.ppo_memory import write_reward_adapter
        from service.storage import LocalStore
        from workers.archives import store_dir_archive

        store = LocalStore(workdir / "objects")
        os.environ["ALIGND_MODELS"] = f"{MODEL}={settings.model_cache_dir / MODEL}"
        adapter = write_reward_adapter(MODEL, workdir / "rm")
        key = store_dir_archive(store, adapter, "jobs/ftjob-rm/adapter.tar.gz")
        reward_ref = f"ft:{MODEL}:local::ftjob-rm"
        references["reward_model"] = ModelRef(reward_ref, "ftjob-rm", "reward_model", MODEL, [], key)
    kind = LoraTraining() if training == "lora" else FullTraining()
    ctx = local_context(workdir, model=MODEL, method=_method(method, steps, reward_ref), training_type=kind,
                        training_rows=rows(method), settings=settings, reporter=MemoryReporter(),
                        references=references)
    recipe_class = recipes.recipe_class(method)
    assert recipe_class is not None
    baseline = current_rss()
    reset_peak_rss()
    recipe = recipes.build(recipe_class, ctx)
    try:
        recipe.setup()
        result = recipe.train()
    finally:
        recipe.cleanup()
    return {"case": case, "status": result.status, "measured": peak_rss() - baseline, "baseline": baseline}


def estimate(case: str) -> int:
    """The service's estimate for the case, for the CPU's precision and the data's sequence length."""
    import json

    from service.resources import CPU_FP32, JobShape, ModelShape, estimate_memory

    name, training = case.split(":")
    method = METHODS[name]
    lora = training == "lora"
    from service.jobs.spec import DEFAULT_TARGET_MODULES

    job = JobShape(method=method, lora=lora, lora_r=16 if lora else 0,
                   lora_target_modules=tuple(DEFAULT_TARGET_MODULES) if lora else (), batch_size=BATCH,
                   max_length=LENGTH, rollout_batch_size=BATCH * GROUP if method == "reinforcement" else BATCH,
                   mini_batch_size=BATCH, reward_adapter=method == "ppo")  # a LoRA reward model on the base
    shape = ModelShape.from_config(json.loads(CONFIG.read_text()))
    return estimate_memory(shape, job, precision=CPU_FP32).bytes


def run(case: str, steps: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, case, steps))
    proc.start()
    out: dict[str, Any] = queue.get()
    proc.join()
    if "error" not in out:
        out["estimate"] = estimate(case)
        out["ratio"] = out["estimate"] / max(out["measured"], 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="*", default=ALL_CASES, help="method:lora|full")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    model_dir()
    results = []
    for case in args.cases:
        out = run(case, args.steps)
        results.append(out)
        name, training = case.split(":")
        if "error" in out:
            print(f"memory_estimate method={name} training={training} error={out['error']!r}", flush=True)
            continue
        print(f"memory_estimate method={name} training={training} estimate_bytes={out['estimate']} "
              f"measured_bytes={out['measured']} ratio={out['ratio']:.3f}", flush=True)
    print("\n| method | training | estimate (MiB) | measured (MiB) | estimate / measured |")
    print("| --- | --- | ---: | ---: | ---: |")
    for out in results:
        if "error" not in out:
            name, training = out["case"].split(":")
            print(f"| {name} | {training} | {out['estimate'] / 2**20:.0f} | {out['measured'] / 2**20:.0f} | "
                  f"{out['ratio']:.2f} |")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
