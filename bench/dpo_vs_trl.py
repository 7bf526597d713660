"""alignd's DPO recipe against TRL's ``DPOTrainer``: same model, data, batches and optimizer.

Set-up (both sides): SmolLM2-135M-Instruct in fp32 on the CPU, LoRA r=8 / alpha=16 / dropout 0 on
``q_proj`` and ``v_proj``, 64 concise-vs-verbose pairs (``bench/data.py``), batch 8, max_length 128,
beta 0.1, sigmoid loss, AdamW lr 5e-5 with a linear schedule, max_grad_norm 1, 8 optimizer steps,
no gradient checkpointing, no precomputed reference log-probs (both run a reference forward every
step), no evaluation, metrics logged every step, no reporting, no dataloader workers.

Same data, token for token. TRL's conversational path would train on the ``"\\n"`` the SmolLM2 chat
template writes after ``<|im_end|>`` (it takes everything after the rendered prompt as the
completion), a token alignd leaves out (``workers/data.py``). So TRL gets the *standard* (text) form
of the same pairs: the prompt rendered by the tokenizer's chat template with the assistant header,
and each completion as its text followed by ``<|im_end|>`` (TRL then adds no EOS of its own). The
check below asserts that TRL's collated ``input_ids`` and ``completion_mask`` equal alignd's for every
batch.

Same batches. TRL's dataset is put in the order of alignd's first-epoch batches (length-bucketed)
and read with ``train_sampling_strategy="sequential"``, so step ``k`` of both sides sees the same 8
pairs padded to the same width: the timing compares the compute paths, not the batching.

Loss check (``loss_diff``). At step 1 both losses are ln 2 whatever the code does (policy ==
reference), so that would be no check. Instead one child process builds both sides, gives them the
same non-zero LoRA weights (B drawn from a seeded normal, A copied), and compares the loss TRL's
``compute_loss`` and alignd's ``DPORecipe._loss`` give on the first batch: that exercises the
tokenisation, the shared-prompt layout, the completion-only LM head and the log-prob sums against
TRL's independent implementation (``fused_lm_head`` over every position on CPU).

Timing. Each block of 8 steps runs in its own process (multiprocessing "spawn"), which is the clean
way to give each side its own peak RSS (``ru_maxrss`` of the child: imports, model, optimizer and
activations). Blocks run in the order TRL, alignd, alignd, TRL (``--rounds 2``; ABBA cancels a
linear drift in machine speed). A step's time is the wall time between the ends of consecutive
optimizer steps (TRL: ``on_step_end`` callbacks; alignd: the reporter's per-step call), so it covers
collation, both forwards, backward, clipping, the optimizer and scheduler steps and logging. Step 1
(warm-up) is left out of the means; the per-side mean pools steps 2..8 of its blocks.

The last line printed is
``dpo_vs_trl speedup=<alignd steps/s / TRL steps/s> loss_diff=<|loss difference|>
alignd_steps_per_s=<x> trl_steps_per_s=<y> peak_rss_ratio=<alignd / TRL>``.

Run: ``make bench-dpo`` or ``.venv/bin/python bench/dpo_vs_trl.py [--rounds N] [--steps N]``.
The CPU is shared with whatever else runs on the machine: timings on a busy machine are noisy.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import resource
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

MODEL = "SmolLM2-135M-Instruct"
N_PAIRS = 64
SEED = 0
CONFIG: dict[str, Any] = {"batch_size": 8, "max_length": 128, "beta": 0.1, "learning_rate": 5e-5,
                          "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                          "target_modules": ["q_proj", "v_proj"], "max_grad_norm": 1.0}


# --------------------------------------------------------------------------- shared set-up


def _settings() -> Any:
    from service.settings import Settings

    return Settings.from_env(Path(tempfile.gettempdir()) / "alignd-bench")


def _rows() -> list[dict[str, Any]]:
    from bench.data import preference_pairs

    return preference_pairs(N_PAIRS, split="train", seed=SEED)


def _alignd_recipe(workdir: Path, steps: int) -> Any:
    """alignd's DPO recipe, set up in-process on a local object store (no service, no database)."""
    from service.jobs.spec import DpoHyperparameters, LoraTraining
    from workers.local import MemoryReporter, local_context, method_of
    from workers.recipes.dpo import DPORecipe

    hp = DpoHyperparameters(batch_size=CONFIG["batch_size"], max_length=CONFIG["max_length"],
                            beta=CONFIG["beta"], loss_type="sigmoid", learning_rate=CONFIG["learning_rate"],
                            max_steps=steps, lr_scheduler="linear", max_grad_norm=CONFIG["max_grad_norm"],
                            gradient_checkpointing=False, precompute_ref_log_probs=False)
    ctx = local_context(
        workdir, model=MODEL, method=method_of("dpo", hp), job_id="ftjob-bench", seed=SEED,
        training_type=LoraTraining(r=CONFIG["lora_r"], alpha=CONFIG["lora_alpha"], dropout=CONFIG["lora_dropout"],
                                   target_modules=list(CONFIG["target_modules"])),
        training_rows=_rows(), settings=_settings(), reporter=MemoryReporter())
    recipe = DPORecipe(ctx)
    recipe.setup()
    return recipe


def _tokenizer_and_batches() -> tuple[Any, list[list[int]]]:
    """alignd's tokenizer and first-epoch batches, as the recipe builds them, without loading a model
    (the TRL child must not hold alignd's copy of the weights)."""
    from workers import data as D
    from workers.base_models import load_tokenizer, resolve_base_model
    from workers.batching import length_bucketed_batches

    tokenizer = load_tokenizer(resolve_base_model(MODEL, _settings()))
    pairs = [D.tokenize_preference(D.normalize_preference(row), tokenizer, CONFIG["max_length"])
             for row in _rows()]
    lengths = [len(p) for p in pairs if p is not None]
    assert len(lengths) == N_PAIRS
    return tokenizer, length_bucketed_batches(lengths, CONFIG["batch_size"], seed=SEED)


def _trl_rows(tokenizer: Any, batches: list[list[int]]) -> list[dict[str, str]]:
    """The pairs as TRL standard-format text, in the order of alignd's first-epoch batches."""
    from workers import data as D

    eot = tokenizer.eos_token  # "<|im_end|>": the end-of-turn token the chat template writes
    rows = []
    for indices in batches:
        for i in indices:
            pair = D.normalize_preference(_rows()[i])
            prompt = tokenizer.apply_chat_template(pair.prompt, tokenize=False, add_generation_prompt=True)
            rows.append({"prompt": prompt, "chosen": pair.chosen[-1]["content"] + eot,
                         "rejected": pair.rejected[-1]["content"] + eot})
    return rows


def _trl_trainer(tokenizer: Any, batches: list[list[int]], workdir: Path, steps: int,
                 callbacks: list[Any] | None = None) -> Any:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from workers.base_models import resolve_base_model

    path = resolve_base_model(MODEL, _settings())
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    args = DPOConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=CONFIG["batch_size"],
        max_length=CONFIG["max_length"], beta=CONFIG["beta"], loss_type=["sigmoid"],
        learning_rate=CONFIG["learning_rate"], lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=CONFIG["max_grad_norm"], optim="adamw_torch", max_steps=steps,
        gradient_checkpointing=False, precompute_ref_log_probs=False, logging_steps=1, report_to="none",
        dataloader_num_workers=0, save_strategy="no", eval_strategy="no", use_cpu=True, bf16=False,
        fp16=False, train_sampling_strategy="sequential", seed=SEED, disable_tqdm=True,
    )
    peft_config = LoraConfig(r=CONFIG["lora_r"], lora_alpha=CONFIG["lora_alpha"],
                             lora_dropout=CONFIG["lora_dropout"], task_type="CAUSAL_LM", bias="none",
                             target_modules=list(CONFIG["target_modules"]))
    return DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(_trl_rows(tokenizer, batches)),
                      processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# --------------------------------------------------------------------------- child processes


def _check(workdir: Path) -> dict[str, Any]:
    """Same tokens on both sides, and the loss of both on the first batch with equal non-zero LoRA."""
    import torch

    from workers.recipes.dpo import collate_plain

    recipe = _alignd_recipe(workdir, steps=1)
    tokenizer, batches = _tokenizer_and_batches()
    if batches != recipe.batches_by_epoch[0]:
        raise SystemExit("the bench's batch order is not the recipe's")
    trainer = _trl_trainer(tokenizer, batches, workdir, steps=1)
    # 1. Tokens: every TRL batch equals alignd's plain [chosen..., rejected...] batch.
    loader = trainer.get_train_dataloader()
    same_tokens = True
    for indices, trl_batch in zip(batches, loader, strict=False):
        ours = collate_plain([recipe.pairs[i] for i in indices], recipe.tokenizer.pad_token_id)
        ours_mask = torch.zeros_like(ours.input_ids)
        ours_mask.view(-1)[ours.src + 1] = 1  # targets at their own index, as TRL's completion_mask
        same_tokens &= torch.equal(trl_batch["input_ids"].cpu(), ours.input_ids)
        same_tokens &= torch.equal(trl_batch["completion_mask"].cpu(), ours_mask)
    # 2. Equal non-zero LoRA weights.
    generator = torch.Generator().manual_seed(1)
    ours_lora = {n: p for n, p in recipe.accelerator.unwrap_model(recipe.policy).model.named_parameters()
                 if "lora_" in n}
    trl_lora = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    if set(ours_lora) != set(trl_lora):
        raise SystemExit(f"LoRA parameter names differ: {sorted(set(ours_lora) ^ set(trl_lora))[:4]}")
    with torch.no_grad():
        for name, param in ours_lora.items():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
            trl_lora[name].copy_(param)
    # 3. The first batch through both.
    first = batches[0]
    with torch.no_grad():
        ours_loss, stats = recipe._loss(recipe._collate([recipe.pairs[i] for i in first]))
        trl_batch = next(iter(trainer.get_train_dataloader()))
        trl_loss = trainer.compute_loss(trainer.model, trl_batch)
    mode = "train" if trainer.model.training else "eval"
    trl_metrics = {k: v[-1] for k, v in trainer._metrics[mode].items() if v}
    return {
        "same_tokens": bool(same_tokens),
        "alignd_loss": float(ours_loss), "trl_loss": float(trl_loss),
        "alignd_logps_chosen": float(stats["logps_chosen"].mean()),
        "trl_logps_chosen": float(trl_metrics.get("logps/chosen", math.nan)),
        "alignd_logps_rejected": float(stats["logps_rejected"].mean()),
        "trl_logps_rejected": float(trl_metrics.get("logps/rejected", math.nan)),
        "shared_layout": bool(recipe.shared_layout),
    }


def _time_alignd(workdir: Path, steps: int) -> dict[str, Any]:
    recipe = _alignd_recipe(workdir, steps)
    result = recipe.train()
    reporter = recipe.ctx.reporter
    assert result.status == "succeeded", result
    return {"step_times": [b - a for a, b in zip(reporter.stamps, reporter.stamps[1:], strict=False)],
            "losses": reporter.series("loss"),
            "peak_rss": _peak_rss_bytes(), "shared_layout": bool(recipe.shared_layout)}


def _time_trl(workdir: Path, steps: int) -> dict[str, Any]:
    from transformers import TrainerCallback

    class Clock(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.stamps: list[float] = []
            self.losses: list[float] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.stamps = [time.perf_counter()]

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.stamps.append(time.perf_counter())

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    clock = Clock()
    tokenizer, batches = _tokenizer_and_batches()
    trainer = _trl_trainer(tokenizer, batches, workdir, steps, callbacks=[clock])
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # logs still computed every step, just not printed
    trainer.train()
    return {"step_times": [b - a for a, b in zip(clock.stamps, clock.stamps[1:], strict=False)],
            "losses": clock.losses, "peak_rss": _peak_rss_bytes()}


def _child(kind: str, steps: int, threads: int | None, queue: Any) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    if threads:
        torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if kind != "alignd":
        import datasets

        datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix=f"dpo-bench-{kind}-") as tmp:
        workdir = Path(tmp)
        if kind == "check":
            out = _check(workdir)
        elif kind == "alignd":
            out = _time_alignd(workdir, steps)
        else:
            out = _time_trl(workdir, steps)
    queue.put(out)


def _run(kind: str, steps: int, threads: int | None) -> dict[str, Any]:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(kind, steps, threads, queue))
    process.start()
    out = queue.get()
    process.join()
    if process.exitcode:
        raise SystemExit(f"{kind} child exited with {process.exitcode}")
    return out  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds: TRL, alignd, alignd, TRL, ...")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per block (max 8: one epoch)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per child (default: torch)")
    args = parser.parse_args()
    from workers.base_models import resolve_base_model

    resolve_base_model(MODEL, _settings())  # converts the GGUF once, before any child needs it

    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"on {os.cpu_count()} CPUs", flush=True)
    check = _run("check", args.steps, args.threads)
    loss_diff = abs(check["alignd_loss"] - check["trl_loss"])
    print(f"check: tokens identical={check['same_tokens']}, shared-prompt layout={check['shared_layout']}; "
          f"first-batch loss with equal non-zero LoRA: alignd {check['alignd_loss']:.7f}, "
          f"TRL {check['trl_loss']:.7f} (ln 2 = {math.log(2):.7f}); "
          f"logps/chosen {check['alignd_logps_chosen']:.4f} vs {check['trl_logps_chosen']:.4f}, "
          f"logps/rejected {check['alignd_logps_rejected']:.4f} vs "
          f"{check['trl_logps_rejected']:.4f}", flush=True)
    if not check["same_tokens"]:
        raise SystemExit("TRL and alignd tokenised the pairs differently; the comparison would be unfair")

    order = []
    for round_ in range(args.rounds):
        order += ["trl", "alignd"] if round_ % 2 == 0 else ["alignd", "trl"]
    times: dict[str, list[float]] = {"trl": [], "alignd": []}
    rss: dict[str, int] = {"trl": 0, "alignd": 0}
    for kind in order:
        began = time.perf_counter()
        out = _run(kind, args.steps, args.threads)
        steady = out["step_times"][1:]
        times[kind] += steady
        rss[kind] = max(rss[kind], out["peak_rss"])
        print(f"{kind:6s} block: steps {' '.join(f'{t:.2f}' for t in out['step_times'])} s "
              f"(steady mean {statistics.mean(steady):.3f} s), losses "
              f"{' '.join(f'{v:.4f}' for v in out['losses'])}, peak RSS {out['peak_rss'] / 2**20:.0f} MiB, "
              f"block wall {time.perf_counter() - began:.0f} s, load {os.getloadavg()[0]:.2f}", flush=True)

    trl_step, alignd_step = statistics.mean(times["trl"]), statistics.mean(times["alignd"])
    print(f"per-step mean over steps 2..{args.steps} of {args.rounds} blocks each: "
          f"alignd {alignd_step:.3f} s "
          f"(median {statistics.median(times['alignd']):.3f}), TRL {trl_step:.3f} s "
          f"(median {statistics.median(times['trl']):.3f}); peak RSS alignd {rss['alignd'] / 2**20:.0f} MiB, "
          f"TRL {rss['trl'] / 2**20:.0f} MiB", flush=True)
    print(f"dpo_vs_trl speedup={trl_step / alignd_step:.3f} loss_diff={loss_diff:.3g} "
          f"alignd_steps_per_s={1 / alignd_step:.4f} trl_steps_per_s={1 / trl_step:.4f} "
          f"peak_rss_ratio={rss['alignd'] / rss['trl']:.3f}")


if __name__ == "__main__":
    main()
