"""PPO's memory: four roles on one shared base, against the seed's four separate copies.

The seed's PPO keeps four models in memory: the policy, a frozen reference, the reward model and the
value function, each a full copy of the weights ("about 160 GB for a 7B model"). alignd's recipe
(``workers/recipes/rl/``) keeps one frozen base: policy and value are LoRA adapters on it (the value
head a linear layer), the reference is the base with adapters disabled, and a reward model trained as
a LoRA on the same base is a third adapter plus its score head.

For each model, one child process (multiprocessing "spawn", so nothing else lives in it) starts the
meter, loads the base, builds the shared base with the three adapters and runs ``--steps`` real PPO
steps of ``PPOEngine`` (the recipe's own rollout and update code): rollouts of ``--rollout`` (8)
prompts from ``workers/demo_data.py``, up to ``--new-tokens`` (32) new tokens, 2 PPO epochs in
mini-batches of ``--mini-batch`` (4). A small shape (``--rollout 2 --mini-batch 1 --new-tokens 8``)
shows what the weights cost once activations are nearly gone. The reward adapter
is an untrained SEQ_CLS LoRA (random B, random head) written by the parent first: its numbers do not
matter, its memory does.

After loading: the same meter once the base, the adapters and the optimizer exist (weights; on
the CPU also whatever the loader left allocated). Measured peak: on CUDA
``torch.cuda.max_memory_allocated`` above what was allocated before loading; on the CPU the peak
RSS (``VmHWM``, reset at the start) above the RSS before loading. One base copy:
the bytes of the base's parameters and buffers (fp32 on the CPU, bf16 on a bf16 GPU). The seed's
arithmetic: 4 x that.

Run: ``.venv/bin/python bench/ppo_memory.py [--models tiny-random-llama SmolLM2-135M-Instruct] [--steps 2]
[--rollout 8] [--mini-batch 4] [--new-tokens 32]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODELS = ["tiny-random-llama", "SmolLM2-135M-Instruct"]
SEED_7B_PARAMS = 7e9
GB = 1e9
MIB = 2**20


def _settings() -> Any:
    from service.settings import Settings

    settings = Settings.from_env(Path(tempfile.gettempdir()) / "alignd-bench")
    if not os.environ.get("ALIGND_MODEL_CACHE"):
        settings = replace(settings, model_cache_dir=REPO / ".alignd" / "models")
    return settings


def write_reward_adapter(model: str, out: Path) -> Path:
    """An untrained SEQ_CLS LoRA reward model on ``model`` (non-zero B and head), as a job would save it."""
    import torch

    from service.jobs.spec import LoraTraining
    from workers.base_models import load_tokenizer, resolve_base_model
    from workers.modeling import apply_training_type, load_sequence_classifier

    path = resolve_base_model(model, _settings())
    tokenizer = load_tokenizer(path)
    torch.manual_seed(0)
    rm = apply_training_type(load_sequence_classifier(path, torch.float32, tokenizer.pad_token_id),
                             LoraTraining(), seed=0, task_type="SEQ_CLS")
    with torch.no_grad():
        for name, p in rm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.01)
    rm.save_pretrained(str(out))
    return out


def measure(model: str, reward_dir: str, steps: int, shape: dict[str, int]) -> dict[str, Any]:
    """Runs in a fresh child process: the meter starts before anything is loaded."""
    import torch

    from service.jobs.spec import LoraTraining, PpoHyperparameters
    from workers.base_models import load_tokenizer, resolve_base_model
    from workers.data import prompt_ids
    from workers.demo_data import FACTS
    from workers.loop import Optimization, make_accelerator, make_optimizer
    from workers.memory import PeakMeter, parameter_bytes, parameter_count
    from workers.modeling import choose_precision, disable_dropout, eos_token_ids, load_causal_lm
    from workers.recipes.rl.engine import AdapterReward, PPOEngine, Prompt
    from workers.recipes.rl.models import SharedBase

    hp = PpoHyperparameters(reward_model="bench", ppo_epochs=2, learning_rate=1e-5, max_length=256, **shape)
    precision = choose_precision(LoraTraining())
    accelerator = make_accelerator(hp, precision)
    device = accelerator.device
    path = resolve_base_model(model, _settings())
    tokenizer = load_tokenizer(path)
    conversations = [[{"role": "user", "content": q}] for q, _, _ in FACTS]
    prompts = [Prompt(messages, prompt_ids(messages, tokenizer, 200)) for messages in conversations]
    torch.manual_seed(0)
    meter = PeakMeter(device).start()
    base = load_causal_lm(path, precision.weights)
    base.requires_grad_(False)
    base_bytes, params = parameter_bytes(base), parameter_count(base)
    models = SharedBase(base, LoraTraining(), seed=0)
    models.add_reward_adapter(Path(reward_dir))
    models.to(device)
    disable_dropout(models)
    optimizer, scheduler = make_optimizer(models.trainable, hp, steps * PPOEngine.updates_per_step(hp))
    optim = Optimization(accelerator, optimizer, scheduler, models.trainable, hp.max_grad_norm)
    engine = PPOEngine(models, tokenizer, hp, accelerator=accelerator, optim=optim,
                       eos_ids=eos_token_ids(base, tokenizer), reward=AdapterReward(models, accelerator), seed=0)
    loaded = meter.current()
    times = []
    for step in range(steps):
        began = time.perf_counter()
        batch = prompts[step * hp.rollout_batch_size:(step + 1) * hp.rollout_batch_size]
        engine.step(batch, step + 1)
        times.append(time.perf_counter() - began)
    adapters = parameter_bytes(models) - base_bytes
    return {"model": model, "shape": shape, "device": str(device), "dtype": str(base.dtype).replace("torch.", ""),
            "parameters": params, "base_bytes": base_bytes, "adapter_bytes": adapters,
            "loaded_bytes": loaded, "peak_bytes": meter.peak(), "measured": meter.kind,
            "seconds_per_step": sum(times) / len(times)}


def _child(queue: Any, model: str, reward_dir: str, steps: int, shape: dict[str, int]) -> None:
    try:
        queue.put(measure(model, reward_dir, steps, shape))
    except Exception as exc:  # noqa: BLE001 - report, do not hang the parent
        queue.put({"model": model, "error": f"{type(exc).__name__}: {exc}"})


def run(model: str, steps: int, shape: dict[str, int]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        reward_dir = write_reward_adapter(model, Path(tmp) / "reward")
        context = mp.get_context("spawn")
        queue = context.Queue()
        proc = context.Process(target=_child, args=(queue, model, str(reward_dir), steps, shape))
        proc.start()
        result: dict[str, Any] = queue.get()
        proc.join()
    return result


def shape_text(shape: dict[str, int]) -> str:
    return f"{shape['rollout_batch_size']} / {shape['mini_batch_size']} / {shape['max_new_tokens']}"


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| model | rollout / mini-batch / new tokens | device, dtype | parameters | one base copy "
             "| adapters (3 LoRA + heads) | after loading | measured peak | peak / one copy "
             "| seed's four copies (4 x params x bytes) | s/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error']} |||||||||")
            continue
        lines.append(
            f"| {r['model']} | {shape_text(r['shape'])} | {r['device']}, {r['dtype']} | {r['parameters'] / 1e6:.1f} M "
            f"| {r['base_bytes'] / MIB:.0f} MiB | {r['adapter_bytes'] / MIB:.1f} MiB "
            f"| {r['loaded_bytes'] / MIB:.0f} MiB | {r['peak_bytes'] / MIB:.0f} MiB ({r['measured']}) "
            f"| {r['peak_bytes'] / r['base_bytes']:.2f} "
            f"| {4 * r['base_bytes'] / MIB:.0f} MiB | {r['seconds_per_step']:.1f} |")
    lines.append(f"| 7B (arithmetic) | - | fp32 / bf16 | 7000 M | {SEED_7B_PARAMS * 4 / GB:.0f} / "
                 f"{SEED_7B_PARAMS * 2 / GB:.0f} GB | - | - | - | - | {4 * SEED_7B_PARAMS * 4 / GB:.0f} / "
                 f"{4 * SEED_7B_PARAMS * 2 / GB:.0f} GB (the seed quotes ~160 GB) | - |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rollout", type=int, default=8, help="rollout_batch_size")
    parser.add_argument("--mini-batch", type=int, default=4, help="mini_batch_size")
    parser.add_argument("--new-tokens", type=int, default=32, help="max_new_tokens")
    args = parser.parse_args()
    shape = {"rollout_batch_size": args.rollout, "mini_batch_size": args.mini_batch,
             "max_new_tokens": args.new_tokens}
    results = [run(model, args.steps, shape) for model in args.models]
    print(table(results))


if __name__ == "__main__":
    main()
