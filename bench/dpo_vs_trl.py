"""alignd's DPO recipe against TRL's ``DPOTrainer``: same model, data, batches, initial weights and optimizer.

Set-up (both sides): SmolLM2-135M-Instruct in fp32 on the CPU, LoRA r=8 / alpha=16 / dropout 0 on
``q_proj`` and ``v_proj``, 64 concise-vs-verbose pairs (``bench/data.py``), batch 8, max_length 128,
beta 0.1, sigmoid loss, AdamW lr 5e-5 with a linear schedule, max_grad_norm 1, 8 optimizer steps,
no gradient checkpointing, no precomputed reference log-probs (both run a reference forward every
step), no evaluation, metrics logged every step, no reporting, no dataloader workers.

Three timed arms: ``trl`` (TRL's ``DPOTrainer``), ``alignd`` (the recipe as a job runs it: on the CPU
the shared-prompt layout, one row per pair) and ``plain`` (the same recipe with
``DPORecipe(plain_layout=True)``: chosen and rejected as separate padded rows, like TRL). ``trl /
plain`` is what the rest of the recipe buys (completion-only LM head, no per-micro-batch host syncs),
``plain / alignd`` what the layout buys; their product is the speedup.

Same data, token for token. TRL's conversational path would train on the ``"\\n"`` the SmolLM2 chat
template writes after ``<|im_end|>`` (it takes everything after the rendered prompt as the
completion), a token alignd leaves out (``workers/data.py``). So TRL gets the *standard* (text) form
of the same pairs: the prompt rendered by the tokenizer's chat template with the assistant header,
and each completion as its text followed by ``<|im_end|>`` (TRL then adds no EOS of its own).

Same batches. TRL's dataset is put in the order of alignd's first-epoch batches (length-bucketed)
and read with ``train_sampling_strategy="sequential"``, so step ``k`` of both sides sees the same 8
pairs padded to the same width: the timing compares the compute paths, not the batching.

Same initial weights. The check child saves alignd's seeded LoRA initialisation (A random, B zero)
and every timed child, TRL's included, copies it into its adapter before training, so the three
8-step loss curves must agree (asserted: ``LOSS_CURVE_ATOL``).

The check (one child process, both sides built in it; any mismatch exits non-zero):
1. TRL's collated ``input_ids`` and ``completion_mask`` equal alignd's for every batch.
2. With equal *non-zero* LoRA weights (B drawn from a seeded normal, A copied; at B = 0 policy ==
   reference and the loss is ln 2 whatever the code does), on the first batch: the per-sequence
   policy and reference log-probs of alignd (both layouts) against TRL's (``fused_lm_head`` over every
   position; reference with the adapter disabled), within ``LOGPS_ATOL``; the loss; and the LoRA
   gradients of one backward through ``DPORecipe._loss`` against one through TRL's ``compute_loss``,
   relative error ``|g_alignd - g_trl| / |g_trl|`` over all LoRA parameters within ``GRAD_RTOL``.

Timing. Each block of 8 steps runs in its own process (multiprocessing "spawn": fork + exec, a fresh
address space), and its peak memory is that process's ``VmHWM`` (peak resident set: imports, model,
optimizer, activations) from ``/proc/self/status``. Not ``ru_maxrss``: Linux carries it across
exec, so every child would report at least the parent's peak. Blocks run in the order TRL, alignd,
plain, plain, alignd, TRL (``--rounds 2``; the mirror order cancels a linear drift in machine speed).
A step's time is the wall time between the ends of consecutive optimizer steps (TRL:
``on_step_end`` callbacks; alignd: the reporter's per-step call), so it covers collation, both
forwards, backward, clipping, the optimizer and scheduler steps and logging. Step 1 (warm-up) is
left out of the means; an arm's mean pools steps 2..8 of its blocks.

The last line printed is
``dpo_vs_trl: speedup=<trl_step / alignd_step> plain_speedup=<trl_step / plain_step>
layout_speedup=<plain_step / alignd_step> alignd_step=<s> trl_step=<s> plain_step=<s>
peak_mib alignd=<MiB> trl=<MiB> plain=<MiB> logps_diff=<max abs> grad_rel=<rel> loss_curve_diff=<max abs>``.

Run: ``make bench-dpo`` or ``.venv/bin/python bench/dpo_vs_trl.py [--rounds N] [--steps N] [--device
cpu|cuda] [--model NAME]`` (``--rounds 0``: the check only). ``--device cuda`` runs both sides in bf16
(a bf16 frozen base under bf16 autocast, as alignd's LoRA runs on a bf16 GPU), reports the CUDA
allocator's peak, and checks with bf16's tolerances (``TOLERANCES``); ``--model`` takes any model name
alignd resolves, e.g. the random-init Llama-3-8B-shaped one ``bench/random_model.py`` writes.
The CPU is shared with whatever else runs on the machine: timings on a busy machine are noisy (the
load average is printed).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ALIGND_MODEL_CACHE", str(REPO / ".alignd" / "models"))

#: the device and base model of every child (spawned children read them from the environment main sets)
DEVICE = os.environ.get("ALIGND_BENCH_DEVICE", "cpu")
MODEL = os.environ.get("ALIGND_BENCH_MODEL", "SmolLM2-135M-Instruct")
#: tolerances by device. CPU, fp32: per-sequence log-prob sums (nats) measured ~6e-5 apart (summation
#: order), LoRA gradients ~3e-6 (relative), 8-step loss curves ~1.4e-6. CUDA runs both sides in bf16
#: (a bf16 frozen base, bf16 autocast): an 8-bit mantissa, so the bounds are bf16's, not fp32's
TOLERANCES = {"cpu": {"logps": 1e-3, "grad": 1e-4, "curve": 1e-4},
              "cuda": {"logps": 0.5, "grad": 0.1, "curve": 0.05}}
LOGPS_ATOL = TOLERANCES[DEVICE]["logps"]
GRAD_RTOL = TOLERANCES[DEVICE]["grad"]
LOSS_CURVE_ATOL = TOLERANCES[DEVICE]["curve"]
ARMS = ("trl", "alignd", "plain")

# --------------------------------------------------------------------------- pure helpers


def vm_hwm_bytes(status: str | None = None) -> int:
    """This process's peak resident set (``VmHWM``) from ``/proc/self/status`` text, in bytes."""
    if status is None:
        status = Path("/proc/self/status").read_text()
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            value, unit = line.split()[1:3]
            if unit != "kB":
                raise ValueError(f"unexpected VmHWM unit {unit!r}")
            return int(value) * 1024
    raise ValueError("no VmHWM line in /proc/self/status")


def mirrored_order(arms: Sequence[str], rounds: int) -> list[str]:
    """``arms`` forwards in even rounds, backwards in odd ones (ABC CBA ...): a linear drift cancels."""
    order: list[str] = []
    for round_ in range(rounds):
        order += list(arms) if round_ % 2 == 0 else list(reversed(arms))
    return order


def max_abs_diff(a: Sequence[float], b: Sequence[float]) -> float:
    """Largest ``|a[i] - b[i]|``; curves of different lengths are a mismatch, not a shorter comparison."""
    if len(a) != len(b) or not a:
        raise ValueError(f"curves of lengths {len(a)} and {len(b)}")
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def relative_error(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> float:
    """``|ours - theirs| / |theirs|`` over all tensors together (Frobenius norms), same names required."""
    import torch

    if set(ours) != set(theirs):
        raise ValueError(f"names differ: {sorted(set(ours) ^ set(theirs))[:4]}")
    diff = torch.stack([(ours[n].double() - theirs[n].double()).norm() for n in theirs]).norm()
    scale = torch.stack([theirs[n].double().norm() for n in theirs]).norm()
    if scale == 0:
        raise ValueError("the reference tensors are all zero: nothing to compare")
    return float(diff / scale)


# --------------------------------------------------------------------------- shared set-up


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


def _alignd_recipe(workdir: Path, steps: int, plain_layout: bool = False) -> Any:
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
    recipe = DPORecipe(ctx, plain_layout=plain_layout)
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
    # alignd's LoRA keeps its frozen base in bf16 on a bf16 GPU (workers/precision.py): TRL's gets the same
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    args = DPOConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=CONFIG["batch_size"],
        max_length=CONFIG["max_length"], beta=CONFIG["beta"], loss_type=["sigmoid"],
        learning_rate=CONFIG["learning_rate"], lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=CONFIG["max_grad_norm"], optim="adamw_torch", max_steps=steps,
        gradient_checkpointing=False, precompute_ref_log_probs=False, logging_steps=1, report_to="none",
        dataloader_num_workers=0, save_strategy="no", eval_strategy="no", use_cpu=DEVICE == "cpu",
        bf16=DEVICE == "cuda",
        fp16=False, train_sampling_strategy="sequential", seed=SEED, disable_tqdm=True,
    )
    peft_config = LoraConfig(r=CONFIG["lora_r"], lora_alpha=CONFIG["lora_alpha"],
                             lora_dropout=CONFIG["lora_dropout"], task_type="CAUSAL_LM", bias="none",
                             target_modules=list(CONFIG["target_modules"]))
    return DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(_trl_rows(tokenizer, batches)),
                      processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)


# --------------------------------------------------------------------------- child processes


def _alignd_lora(recipe: Any) -> dict[str, Any]:
    return {n: p for n, p in recipe.accelerator.unwrap_model(recipe.policy).model.named_parameters()
            if "lora_" in n}


def _trl_lora(trainer: Any) -> dict[str, Any]:
    return {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}


def _load_lora(params: dict[str, Any], path: Path) -> None:
    """Copy the saved initial LoRA weights into ``params`` (the same names on both sides)."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(path))
    if set(saved) != set(params):
        raise SystemExit(f"LoRA parameter names differ from the saved init: {sorted(set(saved) ^ set(params))[:4]}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])


def _trl_sequence_logps(trainer: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """TRL's per-sequence policy and reference log-prob sums ``[chosen..., rejected...]``: the policy
    forward as ``DPOTrainer._compute_loss`` runs it, the reference through ``compute_ref_log_probs``."""
    import torch

    kwargs = {k: v for k, v in batch.items() if k not in {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        out = trainer.model(**kwargs, use_cache=False, labels=labels, fused_lm_head=True)
        policy = out.log_probs[:, -(batch["completion_mask"].shape[1] - 1):].sum(dim=1)
        ref = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
    return policy, ref


def _check(workdir: Path, init_path: Path) -> dict[str, Any]:
    """Same tokens; with equal non-zero LoRA, the same per-sequence log-probs, loss and gradients.
    Saves alignd's initial LoRA weights to ``init_path`` for the timed children."""
    import torch
    from safetensors.torch import save_file

    from workers.recipes.dpo import collate_plain

    recipe = _alignd_recipe(workdir, steps=1)
    tokenizer, batches = _tokenizer_and_batches()
    if batches != recipe.batches_by_epoch[0]:
        raise SystemExit("the bench's batch order is not the recipe's")
    trainer = _trl_trainer(tokenizer, batches, workdir, steps=1)
    # 1. Tokens: every TRL batch equals alignd's plain [chosen..., rejected...] batch.
    same_tokens = True
    for indices, trl_batch in zip(batches, trainer.get_train_dataloader(), strict=True):
        ours = collate_plain([recipe.pairs[i] for i in indices], recipe.tokenizer.pad_token_id)
        ours_mask = torch.zeros_like(ours.input_ids)
        ours_mask.view(-1)[ours.src + 1] = 1  # targets at their own index, as TRL's completion_mask
        same_tokens &= torch.equal(trl_batch["input_ids"].cpu(), ours.input_ids)
        same_tokens &= torch.equal(trl_batch["completion_mask"].cpu(), ours_mask)
    # 2. The initial weights for the timed children, then equal non-zero LoRA weights on both sides.
    ours_lora, trl_lora = _alignd_lora(recipe), _trl_lora(trainer)
    if set(ours_lora) != set(trl_lora):
        raise SystemExit(f"LoRA parameter names differ: {sorted(set(ours_lora) ^ set(trl_lora))[:4]}")
    save_file({n: p.detach().contiguous() for n, p in ours_lora.items()}, str(init_path))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in ours_lora.items():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator).to(param.device) * 0.05)
            trl_lora[name].copy_(param)
    # 3. Per-sequence log-probs on the first batch: alignd's two layouts against TRL.
    first = [recipe.pairs[i] for i in batches[0]]
    trl_batch = next(iter(trainer.get_train_dataloader()))
    trl_policy, trl_ref = _trl_sequence_logps(trainer, trl_batch)
    logps_diff: dict[str, float] = {}
    for layout, shared in (("shared", True), ("plain", False)):
        batch = recipe._collate(first, shared=shared)
        with torch.no_grad():
            policy, _ = recipe.policy(batch)
            ref, _ = recipe._reference_logps(batch)
        logps_diff[f"{layout}_policy"] = float((policy - trl_policy).abs().max())
        logps_diff[f"{layout}_ref"] = float((ref - trl_ref).abs().max())
    # 4. One backward each: alignd's loss (the layout it runs) and TRL's compute_loss.
    for params in (ours_lora, trl_lora):
        for param in params.values():
            param.grad = None
    ours_loss, _ = recipe._loss(recipe._collate(first))
    ours_loss.backward()
    trl_loss = trainer.compute_loss(trainer.model, trl_batch)
    trl_loss.backward()
    mode = "train" if trainer.model.training else "eval"
    trl_metrics = {k: v[-1] for k, v in trainer._metrics[mode].items() if v}
    grad_rel = relative_error({n: p.grad for n, p in ours_lora.items()}, {n: p.grad for n, p in trl_lora.items()})
    half = len(first)
    return {
        "same_tokens": bool(same_tokens), "shared_layout": bool(recipe.shared_layout),
        "alignd_loss": float(ours_loss), "trl_loss": float(trl_loss),
        "logps_diff": logps_diff, "grad_rel": grad_rel,
        "trl_logps": [float(trl_policy[:half].mean()), float(trl_policy[half:].mean())],
        # what compute_loss itself logged: our replay of TRL's forward must be TRL's forward
        "trl_metric_logps": [float(trl_metrics.get("logps/chosen", math.nan)),
                             float(trl_metrics.get("logps/rejected", math.nan))],
    }


def _peak_bytes() -> int:
    """The process's peak: ``VmHWM`` on the CPU, the CUDA allocator's peak on a GPU (the model included)."""
    import torch

    if DEVICE == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return vm_hwm_bytes()


def _time_alignd(workdir: Path, steps: int, init_path: Path, plain_layout: bool) -> dict[str, Any]:
    recipe = _alignd_recipe(workdir, steps, plain_layout=plain_layout)
    _load_lora(_alignd_lora(recipe), init_path)
    result = recipe.train()
    reporter = recipe.ctx.reporter
    assert result.status == "succeeded", result
    return {"step_times": [b - a for a, b in zip(reporter.stamps, reporter.stamps[1:], strict=False)],
            "losses": reporter.series("loss"), "peak": _peak_bytes(), "layout": recipe.layout.name}


def _time_trl(workdir: Path, steps: int, init_path: Path) -> dict[str, Any]:
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
    _load_lora(_trl_lora(trainer), init_path)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # logs still computed every step, just not printed
    trainer.train()
    return {"step_times": [b - a for a, b in zip(clock.stamps, clock.stamps[1:], strict=False)],
            "losses": clock.losses, "peak": _peak_bytes(), "layout": "trl"}


def _child(kind: str, steps: int, threads: int | None, init_path: Path, queue: Any) -> None:
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
            out = _check(workdir, init_path)
        elif kind in ("alignd", "plain"):
            out = _time_alignd(workdir, steps, init_path, plain_layout=kind == "plain")
        else:
            out = _time_trl(workdir, steps, init_path)
    queue.put(out)


def _run(kind: str, steps: int, threads: int | None, init_path: Path) -> dict[str, Any]:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(kind, steps, threads, init_path, queue))
    process.start()
    out = queue.get()
    process.join()
    if process.exitcode:
        raise SystemExit(f"{kind} child exited with {process.exitcode}")
    return out  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- main


def _report_check(check: dict[str, Any]) -> tuple[float, float]:
    """Print the check; exit non-zero on any mismatch. Returns (max log-prob diff, gradient rel. error)."""
    diffs = check["logps_diff"]
    logps_diff = max(diffs.values())
    print(f"check: tokens identical={check['same_tokens']}, shared-prompt layout={check['shared_layout']}; "
          f"first batch with equal non-zero LoRA: loss alignd {check['alignd_loss']:.7f}, TRL "
          f"{check['trl_loss']:.7f} (ln 2 = {math.log(2):.7f}); per-sequence max |logps diff| vs TRL: "
          + ", ".join(f"{k} {v:.2g}" for k, v in diffs.items())
          + f"; LoRA grads relative error {check['grad_rel']:.2g}; TRL logps/chosen,rejected "
          f"{check['trl_logps'][0]:.4f},{check['trl_logps'][1]:.4f} (its metrics "
          f"{check['trl_metric_logps'][0]:.4f},{check['trl_metric_logps'][1]:.4f})", flush=True)
    failures = []
    if not check["same_tokens"]:
        failures.append("TRL and alignd tokenised the pairs differently")
    if not check["shared_layout"]:
        failures.append("alignd did not run its shared-prompt layout")
    if logps_diff > LOGPS_ATOL:
        failures.append(f"per-sequence log-probs differ by {logps_diff:.3g} > {LOGPS_ATOL}")
    if not check["grad_rel"] <= GRAD_RTOL:
        failures.append(f"LoRA gradients differ by {check['grad_rel']:.3g} (relative) > {GRAD_RTOL}")
    if not abs(check["alignd_loss"] - check["trl_loss"]) <= LOGPS_ATOL:
        failures.append("the first-batch losses differ")
    if max_abs_diff(check["trl_logps"], check["trl_metric_logps"]) > 1e-4:
        failures.append("the replayed TRL forward is not what TRL's compute_loss computed")
    if failures:
        raise SystemExit("dpo_vs_trl: CHECK FAILED: " + "; ".join(failures))
    return logps_diff, check["grad_rel"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2,
                        help="mirrored rounds: TRL, alignd, plain, plain, alignd, TRL, ... (0: the check only)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per block (max 8: one epoch)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per child (default: torch)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=DEVICE,
                        help="cuda: both sides in bf16 on the GPU (peaks from torch.cuda.max_memory_allocated)")
    parser.add_argument("--model", default=MODEL, help="a built-in or ALIGND_MODELS name (bench/random_model.py "
                        "writes a random-init Llama-3-8B-shaped one for the GPU)")
    args = parser.parse_args()
    if (args.device, args.model) != (DEVICE, MODEL):  # the children read them at import: start again with them set
        os.environ["ALIGND_BENCH_DEVICE"], os.environ["ALIGND_BENCH_MODEL"] = args.device, args.model
        os.execv(sys.executable, [sys.executable, *sys.argv])
    from workers.base_models import resolve_base_model

    resolve_base_model(MODEL, _settings())  # converts the GGUF once, before any child needs it

    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"on {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as shared:
        init_path = Path(shared) / "lora_init.safetensors"
        logps_diff, grad_rel = _report_check(_run("check", args.steps, args.threads, init_path))
        if args.rounds < 1:
            return
        times: dict[str, list[float]] = {arm: [] for arm in ARMS}
        peaks: dict[str, int] = dict.fromkeys(ARMS, 0)
        curves: dict[str, list[list[float]]] = {arm: [] for arm in ARMS}
        for kind in mirrored_order(ARMS, args.rounds):
            began = time.perf_counter()
            out = _run(kind, args.steps, args.threads, init_path)
            steady = out["step_times"][1:]
            times[kind] += steady
            peaks[kind] = max(peaks[kind], out["peak"])
            curves[kind].append(out["losses"])
            print(f"{kind:6s} block ({out['layout']}): steps {' '.join(f'{t:.2f}' for t in out['step_times'])} s "
                  f"(steady mean {statistics.mean(steady):.3f} s), losses "
                  f"{' '.join(f'{v:.6f}' for v in out['losses'])}, peak (VmHWM) {out['peak'] / 2**20:.0f} MiB, "
                  f"block wall {time.perf_counter() - began:.0f} s, load {os.getloadavg()[0]:.2f}", flush=True)

    curve_diff = max(max_abs_diff(ours, theirs) for arm in ("alignd", "plain")
                     for ours in curves[arm] for theirs in curves["trl"])
    step = {arm: statistics.mean(times[arm]) for arm in ARMS}
    mib = {arm: peaks[arm] / 2**20 for arm in ARMS}
    print(f"per-step mean over steps 2..{args.steps} of {args.rounds} blocks each: "
          + ", ".join(f"{arm} {step[arm]:.3f} s (median {statistics.median(times[arm]):.3f})" for arm in ARMS)
          + "; peak VmHWM " + ", ".join(f"{arm} {mib[arm]:.0f} MiB" for arm in ARMS)
          + f"; loss curves max |diff| vs TRL {curve_diff:.3g}", flush=True)
    print(f"dpo_vs_trl: speedup={step['trl'] / step['alignd']:.3f} plain_speedup={step['trl'] / step['plain']:.3f} "
          f"layout_speedup={step['plain'] / step['alignd']:.3f} alignd_step={step['alignd']:.3f}s "
          f"trl_step={step['trl']:.3f}s plain_step={step['plain']:.3f}s peak_mib alignd={mib['alignd']:.0f} "
          f"trl={mib['trl']:.0f} plain={mib['plain']:.0f} logps_diff={logps_diff:.2g} grad_rel={grad_rel:.2g} "
          f"loss_curve_diff={curve_diff:.2g}", flush=True)
    if curve_diff > LOSS_CURVE_ATOL:
        raise SystemExit(f"dpo_vs_trl: CHECK FAILED: the loss curves differ by {curve_diff:.3g} > {LOSS_CURVE_ATOL}")


if __name__ == "__main__":
    main()
