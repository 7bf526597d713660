"""alignd's reinforcement recipe (GRPO) against TRL 1.16's ``GRPOTrainer`` (no vLLM) on the same work.

Set-up (both sides): SmolLM2-135M-Instruct (fp32 on the CPU; ``--device cuda`` runs bf16 on a GPU),
LoRA r=8 / alpha 16 / dropout 0 on ``q_proj`` and ``v_proj``, arithmetic prompts ("What is a + b?", a and
b from 1 to 9, with a system turn asking for the number only), 4 prompts a step x ``group_size`` 4 samples, at most
32 new tokens, temperature 1, top_p 1, the same reward (exact match of the completion's text with the
answer: alignd's ``string_check`` ``eq`` grader, a plain Python function for TRL), ``loss_type`` dapo,
``kl_coef``/``beta`` 0, ``num_iterations`` 1, ``scale_rewards`` group, AdamW lr 1e-5 with a linear
schedule, max_grad_norm 1, 8 steps, dropout off, no evaluation, metrics every step.

Loss check (``loss_diff``). With ``num_iterations`` 1 the clipped ratio is 1 and a loss is the same
whatever the log-probs are, so that would be no check. Instead one child builds both sides, samples
a batch of completions once (alignd's sampler), computes the "old" log-probs with one LoRA state,
moves both sides to the same other non-zero LoRA state, and asks each side for its loss on that
fixed batch with ``beta`` 0.04 (TRL's default ``use_bias_correction_kl``, alignd's ``kl_bias_correction``)
and ``epsilon_high`` 0.28 (rewards: the graded ones, or a fixed 0/1 pattern when every group is graded
alike, so the surrogate is checked as well as the KL term): TRL through its own
``_get_per_token_logps_and_entropies`` and ``_compute_loss``, alignd through its own
``grouped_response_logps`` (each prompt run once for its group) and ``group_loss`` (old and
reference log-probs computed by each side's own code, the reference with the adapters disabled).
``loss_diff`` is the difference of the two losses; the LoRA gradients are compared too.

Timing. Each block of ``--steps`` steps runs in its own spawned process; blocks alternate TRL,
alignd, alignd, TRL (``--rounds`` 2). A step's time is the wall time between the ends of consecutive
steps (TRL: ``on_step_end``; alignd: the reporter's per-step call): sampling, grading, scoring and
the update. Step 1 (warm-up) is left out; each side's mean pools steps 2.. of its blocks. Samples
are random on both sides, so completion lengths differ from run to run; their means are printed.

The last line printed is ``grpo_vs_trl speedup=<alignd steps/s / TRL steps/s> loss_diff=<x>
alignd_steps_per_s=<x> trl_steps_per_s=<y> alignd_generation_share=<share of step time sampling>``.

Run: ``make bench-grpo`` or ``.venv/bin/python bench/grpo_vs_trl.py [--rounds N] [--steps N]
[--device cpu|cuda] [--model NAME] [--check-only]``. Run it on a quiet machine: timings on a busy one are noisy.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ALIGND_MODEL_CACHE", str(REPO / ".alignd" / "models"))

SEED = 0
CONFIG: dict[str, Any] = {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 32, "learning_rate": 1e-5,
                          "lora_r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
                          "max_grad_norm": 1.0, "temperature": 1.0}
SYSTEM = "Reply with only the number."


def rows(n: int) -> list[dict[str, Any]]:
    rng = random.Random(SEED)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)  # one-digit sums: SmolLM2 gets some right
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What is {a} + {b}?"}]
        out.append({"messages": messages, "answer": str(a + b)})
    return out


def _settings() -> Any:
    from service.settings import Settings

    return Settings.from_env(Path(tempfile.gettempdir()) / "alignd-bench")


def exact_match(completions: list[Any], answer: list[str], **_: Any) -> list[float]:
    """TRL's reward function: the completion's text equals the answer (alignd's string_check eq)."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if text == expected else 0.0 for text, expected in zip(texts, answer, strict=True)]


# --------------------------------------------------------------------------- the two sides


def _alignd_recipe(workdir: Path, steps: int, model: str) -> Any:
    from service.graders import parse_grader
    from service.jobs.spec import LoraTraining, Method, ReinforcementHyperparameters, ReinforcementMethod
    from workers.local import MemoryReporter, local_context
    from workers.recipes.rl.reinforcement import ReinforcementRecipe

    grader = parse_grader({"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
                           "reference": "{{item.answer}}", "operation": "eq"})
    hp = ReinforcementHyperparameters(batch_size=CONFIG["prompts_per_step"], group_size=CONFIG["group_size"],
                                      max_new_tokens=CONFIG["max_new_tokens"], temperature=CONFIG["temperature"],
                                      top_p=1.0, learning_rate=CONFIG["learning_rate"], lr_scheduler="linear",
                                      max_grad_norm=CONFIG["max_grad_norm"], max_steps=steps, n_epochs=1,
                                      kl_coef=0.0, loss_type="dapo", num_iterations=1, max_length=256)
    method = Method(type="reinforcement", reinforcement=ReinforcementMethod(grader=grader, hyperparameters=hp))
    ctx = local_context(workdir, model=model, method=method, seed=SEED, reporter=MemoryReporter(),
                        training_type=LoraTraining(r=CONFIG["lora_r"], alpha=CONFIG["lora_alpha"],
                                                   target_modules=list(CONFIG["target_modules"])),
                        training_rows=rows(CONFIG["prompts_per_step"] * steps), settings=_settings())
    recipe = ReinforcementRecipe(ctx)
    recipe.setup()
    return recipe


def _trl_trainer(workdir: Path, steps: int, model_name: str, device: str, callbacks: list[Any] | None = None,
                 **overrides: Any) -> Any:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from workers.base_models import load_tokenizer, resolve_base_model

    path = resolve_base_model(model_name, _settings())
    tokenizer = load_tokenizer(path)
    tokenizer.padding_side = "left"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    settings = {"output_dir": str(workdir / "trl"), "per_device_train_batch_size": CONFIG["prompts_per_step"] *
                CONFIG["group_size"], "num_generations": CONFIG["group_size"],
                "max_completion_length": CONFIG["max_new_tokens"], "learning_rate": CONFIG["learning_rate"],
                "lr_scheduler_type": "linear", "max_grad_norm": CONFIG["max_grad_norm"], "max_steps": steps,
                "logging_steps": 1, "report_to": "none", "save_strategy": "no", "use_cpu": device == "cpu",
                "bf16": device == "cuda", "seed": SEED, "beta": 0.0, "loss_type": "dapo",
                "temperature": CONFIG["temperature"], "top_p": 1.0, "top_k": 0, "num_iterations": 1,
                "scale_rewards": "group", "disable_dropout": True, "dataloader_num_workers": 0,
                "gradient_accumulation_steps": 1, **overrides}
    args = GRPOConfig(**settings)
    data = [{"prompt": r["messages"], "answer": r["answer"]} for r in rows(CONFIG["prompts_per_step"] * steps)]
    peft_config = LoraConfig(r=CONFIG["lora_r"], lora_alpha=CONFIG["lora_alpha"], lora_dropout=0.0,
                             task_type="CAUSAL_LM", bias="none", target_modules=list(CONFIG["target_modules"]))
    return GRPOTrainer(model=model, reward_funcs=exact_match, args=args, train_dataset=Dataset.from_list(data),
                       processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)


# --------------------------------------------------------------------------- child processes


def _check(workdir: Path, model: str, device: str) -> dict[str, Any]:
    """Each side's own loss and gradients on one fixed batch of completions, with equal LoRA weights."""
    import torch

    from workers.recipes.rl import core as P
    from workers.recipes.rl.models import POLICY

    recipe = _alignd_recipe(workdir, steps=1, model=model)
    trainer = _trl_trainer(workdir, steps=1, model_name=model, device=device, beta=0.04, epsilon_high=0.28)
    engine = recipe.group
    rollout, _ = engine.rollout(recipe.prompts[:CONFIG["prompts_per_step"]])
    ours_lora = {n.replace(f".{POLICY}.", ".default."): p for n, p in recipe.models.peft.named_parameters()
                 if "lora_" in n and f".{POLICY}." in n}
    trl_lora = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    if set(ours_lora) != set(trl_lora):
        raise SystemExit(f"LoRA parameter names differ: {sorted(set(ours_lora) ^ set(trl_lora))[:4]}")
    generator = torch.Generator().manual_seed(1)

    def set_lora(scale: float) -> None:
        with torch.no_grad():
            for name, param in ours_lora.items():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * scale)
                trl_lora[name].copy_(param)

    prompt_ids, prompt_mask = rollout.queries, rollout.query_mask
    completion_ids, completion_mask = rollout.responses, rollout.mask.long()
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention = torch.cat([prompt_mask, completion_mask], dim=1)
    width = completion_ids.shape[1]
    rewards = rollout.rewards
    if not bool((rewards.view(-1, CONFIG["group_size"]).std(dim=1) > 0).any()):
        # every group graded alike: advantages 0 would check only the KL term, so use a fixed 0/1 pattern
        rewards = (torch.arange(len(rewards)) % 2).to(rewards.dtype)
    advantages, _ = P.group_advantages(rewards, CONFIG["group_size"], "group")

    def trl_logps() -> torch.Tensor:
        with torch.no_grad():
            return trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention, width)[0]

    set_lora(0.02)  # the policy that "sampled" the batch
    with torch.no_grad():
        ours_old = engine._logps(rollout)[0]
    trl_old = trl_logps()
    set_lora(0.05)  # the policy being updated
    with torch.no_grad(), recipe.models.reference():
        ours_ref = engine._logps(rollout)[0]
    with trainer.model.disable_adapter():
        trl_ref = trl_logps()
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": trl_old,
              "ref_per_token_logps": trl_ref, "num_items_in_batch": completion_mask.sum()}
    trainer.model.train()
    # set by Trainer's training loop (the micro-batches of the step); _compute_loss normalises by it
    trainer.current_gradient_accumulation_steps = 1
    trl_loss = trainer._compute_loss(trainer.model, inputs)
    trl_loss.backward()
    with recipe.models.using(POLICY):
        logps, _ = engine._logps(rollout)
        ours = P.group_loss(logps, ours_old, advantages, completion_mask, epsilon=0.2, epsilon_high=0.28,
                            loss_type="dapo", total_sequences=len(rollout), total_tokens=int(completion_mask.sum()),
                            max_completion_length=CONFIG["max_new_tokens"], beta=0.04, ref_logps=ours_ref)
        ours.loss.backward()
    grad_diff = max(float((ours_lora[n].grad - trl_lora[n].grad).abs().max()) for n in ours_lora  # type: ignore[operator]
                    if ours_lora[n].grad is not None and trl_lora[n].grad is not None)
    grad_scale = max(float(p.grad.abs().max()) for p in trl_lora.values() if p.grad is not None)
    return {"alignd_loss": float(ours.loss.detach()), "trl_loss": float(trl_loss.detach()),
            "grad_diff": grad_diff, "grad_scale": grad_scale, "rewards_mean": float(rollout.rewards.mean()),
            "logps_diff": float(((ours_old - trl_old).abs() * completion_mask).max())}


def _time_alignd(workdir: Path, steps: int, model: str) -> dict[str, Any]:
    recipe = _alignd_recipe(workdir, steps, model)
    result = recipe.train()
    reporter = recipe.ctx.reporter
    assert result.status == "succeeded", result
    return {"step_times": [b - a for a, b in zip(reporter.stamps, reporter.stamps[1:], strict=False)],
            "generation_share": reporter.series("timing/generation_share"),
            "lengths": reporter.series("completions/mean_length"), "rewards": reporter.series("reward")}


def _time_trl(workdir: Path, steps: int, model: str, device: str) -> dict[str, Any]:
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    class Clock(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.stamps: list[float] = []
            self.lengths: list[float] = []
            self.rewards: list[float] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.stamps = [time.perf_counter()]

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.stamps.append(time.perf_counter())

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "completions/mean_length" in logs:
                self.lengths.append(float(logs["completions/mean_length"]))
                self.rewards.append(float(logs.get("reward", math.nan)))

    clock = Clock()
    trainer = _trl_trainer(workdir, steps, model, device, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return {"step_times": [b - a for a, b in zip(clock.stamps, clock.stamps[1:], strict=False)],
            "lengths": clock.lengths, "rewards": clock.rewards}


def _child(kind: str, steps: int, model: str, device: str, threads: int | None, queue: Any) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    if threads:
        torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    if device == "cuda":
        os.environ.setdefault("ALIGND_MIXED_PRECISION", "bf16")
    with tempfile.TemporaryDirectory(prefix=f"grpo-bench-{kind}-") as tmp:
        workdir = Path(tmp)
        if kind == "check":
            out = _check(workdir, model, device)
        elif kind == "alignd":
            out = _time_alignd(workdir, steps, model)
        else:
            out = _time_trl(workdir, steps, model, device)
    queue.put(out)


def _run(kind: str, steps: int, model: str, device: str, threads: int | None) -> dict[str, Any]:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(kind, steps, model, device, threads, queue))
    process.start()
    out = queue.get()
    process.join()
    if process.exitcode:
        raise SystemExit(f"{kind} child exited with {process.exitcode}")
    return out  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds: TRL, alignd, alignd, TRL, ...")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per child (default: torch)")
    parser.add_argument("--check-only", action="store_true", help="run the loss check and stop")
    args = parser.parse_args()
    from workers.base_models import resolve_base_model

    resolve_base_model(args.model, _settings())  # converts the GGUF once, before any child needs it
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs",
          flush=True)
    check = _run("check", args.steps, args.model, args.device, args.threads)
    loss_diff = abs(check["alignd_loss"] - check["trl_loss"])
    print(f"check: fixed batch (mean reward {check['rewards_mean']:.3f}), beta 0.04, epsilon_high 0.28: loss alignd "
          f"{check['alignd_loss']:.7f}, TRL {check['trl_loss']:.7f}; max |log-prob difference| "
          f"{check['logps_diff']:.2e}; max |LoRA gradient difference| {check['grad_diff']:.2e} "
          f"(largest gradient {check['grad_scale']:.2e})", flush=True)
    if args.check_only:
        print(f"grpo_vs_trl loss_diff={loss_diff:.2e} grad_diff={check['grad_diff']:.2e}")
        return
    order = []
    for round_ in range(args.rounds):
        order += ["trl", "alignd"] if round_ % 2 == 0 else ["alignd", "trl"]
    times: dict[str, list[float]] = {"alignd": [], "trl": []}
    shares, lengths = [], {"alignd": [], "trl": []}  # type: ignore[var-annotated]
    for kind in order:
        out = _run(kind, args.steps, args.model, args.device, args.threads)
        times[kind] += out["step_times"][1:]
        lengths[kind] += out["lengths"]
        if kind == "alignd":
            shares += out["generation_share"][1:]
        print(f"{kind}: steps {', '.join(f'{t:.2f}s' for t in out['step_times'])}; mean completion length "
              f"{statistics.mean(out['lengths']):.1f}; rewards {[round(r, 3) for r in out['rewards']]}", flush=True)
    alignd_rate = 1 / statistics.mean(times["alignd"])
    trl_rate = 1 / statistics.mean(times["trl"])
    print(f"mean completion length: alignd {statistics.mean(lengths['alignd']):.1f}, "
          f"TRL {statistics.mean(lengths['trl']):.1f} tokens", flush=True)
    print(f"grpo_vs_trl speedup={alignd_rate / trl_rate:.3f} loss_diff={loss_diff:.2e} "
          f"alignd_steps_per_s={alignd_rate:.4f} trl_steps_per_s={trl_rate:.4f} "
          f"alignd_generation_share={statistics.mean(shares):.3f}")


if __name__ == "__main__":
    main()
