"""Training speed, MFU and peak memory of SFT, DPO, reinforcement (GRPO) and PPO steps on a GPU, in bf16.

Random-init models built from real configs (speed does not depend on the weights, and model files
cannot travel to the GPU machine): SmolLM2-135M (``service/model_configs/SmolLM2-135M-Instruct.json``),
a Llama-3-8B-shaped one (``service/model_configs/llama-3-8b.json``) and a Qwen2.5-7B-shaped one
(``QWEN25_7B`` below). Sizes a user would pick: 8 × 2048 tokens for SFT, 8 pairs of 2048-token
sequences for DPO, 8 prompts × 4 samples × 512 new tokens for GRPO, 16 prompts × 512 new tokens with 2
mini-batches for PPO. Every step uses the recipes' own pieces: ``workers.modeling`` (precision, LoRA,
activation checkpointing for the 7-8B models), ``workers.token_logps.TokenLogps`` (SFT),
``workers.pairs.PairLogps`` and ``workers.losses.dpo_loss`` (DPO, the reference is the base with the
adapter disabled), ``workers.recipes.rl.sampling.sample_groups`` (the static cache with a compiled
decode step on CUDA), ``workers.recipes.rl.models.SharedBase`` (policy and value adapters on one base)
and ``workers.recipes.rl.core`` (GRPO's and PPO's losses). It imports neither the API nor Celery nor TRL
(the GPU machine has torch, transformers, accelerate and peft; ``tests/test_gpu_bench.py`` checks it).

One line per method and model::

    gpu_bench method=<sft|dpo|reinforcement|ppo> model=<name> tokens_per_s=<x> mfu=<x>
              peak_memory_bytes=<n> estimate_bytes=<n> generation_share=<x or 0>

**FLOPs** (N = the parameters of every matmul: all but the input embedding; attention's ``s²`` term is
left out, as usual): LoRA SFT 4N a token (forward 2N, backward through the activations 2N; the frozen
weights get no gradient); LoRA DPO 6N a token (the policy's 4N plus the reference's forward 2N);
GRPO 2N a generated token (sampling) plus 4N a trained token (prompt + completion through the policy's
forward and backward; ``kl_coef`` 0: no reference); PPO 2N a generated token plus 6N a trained token for
scoring the rollout (policy, reference and value forwards) and 8N for the update (policy and value
forward and backward). Recomputation under activation checkpointing is not counted (MFU counts useful
work). **MFU** = FLOPs / (step time × 989 TFLOP/s, the H100/H200 bf16 dense peak). **tokens_per_s**: the
trained tokens (all sequence tokens of the step) per second. **peak_memory_bytes**: on CUDA
``torch.cuda.max_memory_allocated`` over the steps (the model included), on the CPU the peak RSS above
the RSS before the model was built. **estimate_bytes**: ``service.resources.estimate_memory`` for the
same job (the device's precision: bf16 on a GPU, ``CPU_FP32`` on the CPU). The first step warms up
(compilation, allocator) and is not timed.

Run: ``python bench/gpu.py [--models smollm2-135m llama3-8b qwen2.5-7b] [--methods sft dpo reinforcement
ppo] [--steps 3]``; ``--smoke`` runs every method once on a tiny config on the CPU (seconds) so the
script never rots (``tests/test_gpu_bench.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from service.jobs.spec import LoraTraining  # noqa: E402
from service.resources import CPU_FP32, RECIPE_PRECISION, JobShape, ModelShape, estimate_memory  # noqa: E402
from workers.losses import dpo_loss, selective_log_softmax  # noqa: E402
from workers.memory import PeakMeter  # noqa: E402
from workers.modeling import apply_training_type, choose_precision, enable_activation_checkpointing  # noqa: E402
from workers.pairs import PairBatch, PairLogps  # noqa: E402
from workers.recipes.rl import core as P  # noqa: E402
from workers.recipes.rl.models import POLICY, VALUE, SharedBase  # noqa: E402
from workers.recipes.rl.sampling import sample_groups  # noqa: E402
from workers.token_logps import TokenLogps, token_nll  # noqa: E402

PEAK_FLOPS = 989e12
CONFIGS = REPO / "service" / "model_configs"
QWEN25_7B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "hidden_act": "silu", "use_sliding_window": False,
}
TINY: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
    "max_position_embeddings": 2048, "tie_word_embeddings": True,
}


def model_config(name: str) -> dict[str, Any]:
    if name == "smollm2-135m":
        return dict(json.loads((CONFIGS / "SmolLM2-135M-Instruct.json").read_text()))
    if name == "llama3-8b":
        return dict(json.loads((CONFIGS / "llama-3-8b.json").read_text()))
    if name == "qwen2.5-7b":
        return dict(QWEN25_7B)
    if name == "tiny":
        return dict(TINY)
    raise SystemExit(f"unknown model {name!r}")


@dataclass(frozen=True)
class Sizes:
    batch: int = 8            # SFT sequences, DPO pairs
    length: int = 2048        # SFT/DPO tokens a sequence
    micro: int = 2            # sequences (SFT) or pairs (DPO) a forward; gradients accumulate
    prompts: int = 8          # GRPO prompts
    group: int = 4            # GRPO samples a prompt
    ppo_prompts: int = 16
    ppo_mini: int = 8
    prompt_length: int = 128
    new_tokens: int = 512


FULL = Sizes()
SMOKE = Sizes(batch=2, length=32, micro=1, prompts=2, group=2, ppo_prompts=2, ppo_mini=1, prompt_length=8,
              new_tokens=8)


@dataclass
class Bench:
    device: torch.device
    dtype: torch.dtype            # the frozen base's storage
    autocast: Callable[[], Any]   # the compute precision
    sizes: Sizes
    vocab: int

    def ids(self, rows: int, length: int) -> torch.Tensor:
        return torch.randint(3, self.vocab, (rows, length), device=self.device)


def build(config: dict[str, Any], bench: Bench, checkpointing: bool) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(config)
    cfg = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device(bench.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=bench.dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    model.requires_grad_(False)
    if checkpointing:
        enable_activation_checkpointing(model)
    return model  # type: ignore[no-any-return]


def matmul_parameters(model: torch.nn.Module) -> int:
    """N: every parameter but the input embedding (a tied head's matmul still counts, once)."""
    total = sum(p.numel() for p in model.parameters())
    lm: Any = model
    tied = lm.get_input_embeddings().weight is lm.get_output_embeddings().weight
    return total - (0 if tied else lm.get_input_embeddings().weight.numel())


def _optimizer(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-5)


# --------------------------------------------------------------------------- one step of each method


def sft_step(model: Any, bench: Bench, opt: torch.optim.Optimizer) -> tuple[int, float, float]:
    s = bench.sizes
    compute = TokenLogps(model)
    for _ in range(s.batch // s.micro):
        ids = bench.ids(s.micro, s.length)
        mask = torch.ones_like(ids)
        with bench.autocast():
            loss, _ = token_nll(compute(ids, mask, mask))
        (loss * s.micro / s.batch).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return s.batch * s.length, 4.0, 0.0


def _pair_batch(bench: Bench, pairs: int, length: int) -> PairBatch:
    ids = bench.ids(2 * pairs, length)
    completion = torch.zeros_like(ids, dtype=torch.bool)
    completion[:, length // 4:] = True  # a quarter prompt, three quarters completion
    targets_mask = completion[:, 1:]
    rows, cols = targets_mask.nonzero(as_tuple=True)
    return PairBatch(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=None,
                     src=rows * length + cols, targets=ids[:, 1:][targets_mask], seq=rows,
                     counts=targets_mask.sum(dim=1), tokens=ids.numel())


def dpo_step(model: Any, bench: Bench, opt: torch.optim.Optimizer) -> tuple[int, float, float]:
    s = bench.sizes
    compute = PairLogps(model)
    for _ in range(s.batch // s.micro):
        batch = _pair_batch(bench, s.micro, s.length)
        with torch.no_grad(), model.disable_adapter(), bench.autocast():
            ref, _ = compute(batch)
        with bench.autocast():
            logps, counts = compute(batch)
        n = s.micro
        out = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta=0.1)
        (out.losses.mean() * n / s.batch).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return 2 * s.batch * s.length, 6.0, 0.0


def _response_logps(models: SharedBase, ids: torch.Tensor, attention: torch.Tensor, width: int) -> torch.Tensor:
    hidden = models.hidden(ids, attention)[:, width - 1:-1]
    return selective_log_softmax(models.lm_head()(hidden), ids[:, width:])


def _sample(models: SharedBase, bench: Bench, prompts: int, group: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    s = bench.sizes
    queries = bench.ids(prompts, s.prompt_length)
    query_mask = torch.ones_like(queries)
    with bench.autocast():  # eos -1 never comes: every row samples all new tokens, as the sizes say
        samples = sample_groups(models.peft, queries, query_mask, group_size=group, max_new_tokens=s.new_tokens,
                                temperature=1.0, top_p=1.0, eos_ids=[-1], pad_token_id=0)
    ids = torch.cat([queries.repeat_interleave(group, dim=0), samples.responses], dim=1)
    return ids, torch.ones_like(ids), samples.responses.numel()


def grpo_step(models: SharedBase, bench: Bench, opt: torch.optim.Optimizer) -> tuple[int, float, float]:
    s = bench.sizes
    began = time.perf_counter()
    ids, attention, generated = _sample(models, bench, s.prompts, s.group)
    _sync(bench)
    generation = time.perf_counter() - began
    rewards = torch.rand(ids.shape[0], device=bench.device)
    advantages, _ = P.group_advantages(rewards, s.group)
    mask = torch.ones(ids.shape[0], s.new_tokens, dtype=torch.bool, device=bench.device)
    for rows in torch.arange(ids.shape[0], device=bench.device).split(s.group):
        with bench.autocast():
            logps = _response_logps(models, ids[rows], attention[rows], s.prompt_length).float()
        out = P.group_loss(logps, logps.detach(), advantages[rows], mask[rows], epsilon=0.2, epsilon_high=0.2,
                           loss_type="dapo", total_sequences=ids.shape[0], total_tokens=int(mask.sum()),
                           max_completion_length=s.new_tokens)
        out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    trained = ids.numel()
    flops_per_trained = 4.0 + 2.0 * generated / trained
    return trained, flops_per_trained, generation


def ppo_step(models: SharedBase, bench: Bench, opt: torch.optim.Optimizer) -> tuple[int, float, float]:
    s = bench.sizes
    began = time.perf_counter()
    ids, attention, generated = _sample(models, bench, s.ppo_prompts, 1)
    _sync(bench)
    generation = time.perf_counter() - began
    width, mask = s.prompt_length, torch.ones(ids.shape[0], s.new_tokens, dtype=torch.bool, device=bench.device)
    with torch.no_grad(), bench.autocast():
        old = _response_logps(models, ids, attention, width).float()
        with models.reference():
            ref = _response_logps(models, ids, attention, width).float()
        with models.using(VALUE):
            old_values = models.values(ids, attention, s.new_tokens)
    rewards, _ = P.per_token_rewards(old - ref, torch.rand(ids.shape[0], device=bench.device), mask, 0.05)
    advantages, returns = P.gae(rewards, old_values, mask, 1.0, 0.95)
    for rows in torch.arange(ids.shape[0], device=bench.device).split(s.ppo_mini):
        with models.using(POLICY), bench.autocast():
            logps = _response_logps(models, ids[rows], attention[rows], width).float()
            P.policy_loss(logps, old[rows], advantages[rows], mask[rows], 0.2).loss.backward()
        with models.using(VALUE), bench.autocast():
            values = models.values(ids[rows], attention[rows], s.new_tokens)
            P.value_loss(values, old_values[rows], returns[rows], mask[rows], 0.2).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    trained = ids.numel()
    return trained, 14.0 + 2.0 * generated / trained, generation


def _sync(bench: Bench) -> None:
    if bench.device.type == "cuda":
        torch.cuda.synchronize(bench.device)


# --------------------------------------------------------------------------- the runs


def estimate(method: str, config: dict[str, Any], bench: Bench) -> int:
    s = bench.sizes
    kind = {"sft": "supervised", "dpo": "dpo", "reinforcement": "reinforcement", "ppo": "ppo"}[method]
    length = s.length if method in ("sft", "dpo") else s.prompt_length + s.new_tokens
    job = JobShape(method=kind, lora=True, batch_size=s.micro if method in ("sft", "dpo") else s.group,
                   max_length=length, gradient_checkpointing=_checkpointing(config),
                   rollout_batch_size=s.prompts * s.group if method == "reinforcement" else s.ppo_prompts,
                   mini_batch_size=s.ppo_mini, reward_adapter=True)  # no reward model: one base copy
    precision = RECIPE_PRECISION if bench.device.type == "cuda" else CPU_FP32
    return estimate_memory(ModelShape.from_config(config), job, precision=precision).bytes


def _checkpointing(config: dict[str, Any]) -> bool:
    return int(config["hidden_size"]) >= 2048  # the 7-8B shapes: what a user of them turns on


def run(method: str, name: str, bench: Bench, steps: int) -> dict[str, Any]:
    config = model_config(name)
    meter = PeakMeter(bench.device).start()
    model = build(config, bench, _checkpointing(config))
    n = matmul_parameters(model)
    lora = LoraTraining(r=16)
    if method in ("sft", "dpo"):
        target: Any = apply_training_type(model, lora, seed=0)  # type: ignore[arg-type]
        params = [p for p in target.parameters() if p.requires_grad]
        step: Callable[..., tuple[int, float, float]] = sft_step if method == "sft" else dpo_step
    else:
        target = SharedBase(model, lora, seed=0, with_value=method == "ppo").to(bench.device)  # type: ignore[arg-type]
        params = target.trainable
        step = grpo_step if method == "reinforcement" else ppo_step
    opt = _optimizer(params)
    tokens = flops = seconds = generation = 0.0
    for i in range(steps + 1):
        _sync(bench)
        began = time.perf_counter()
        t, per_token, gen = step(target, bench, opt)
        _sync(bench)
        if i == 0:
            continue  # warm-up: compilation, allocator
        seconds += time.perf_counter() - began
        tokens, flops, generation = tokens + t, flops + per_token * n * t, generation + gen
    out = {"method": method, "model": name, "tokens_per_s": tokens / seconds,
           "mfu": flops / seconds / PEAK_FLOPS, "peak_memory_bytes": meter.peak(),
           "estimate_bytes": estimate(method, config, bench),
           "generation_share": generation / seconds if method in ("reinforcement", "ppo") else 0.0}
    del target, model, opt
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def line(r: dict[str, Any]) -> str:
    return (f"gpu_bench method={r['method']} model={r['model']} tokens_per_s={r['tokens_per_s']:.6g} "
            f"mfu={r['mfu']:.6g} peak_memory_bytes={r['peak_memory_bytes']} estimate_bytes={r['estimate_bytes']} "
            f"generation_share={r['generation_share']:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=["smollm2-135m", "llama3-8b", "qwen2.5-7b"])
    parser.add_argument("--methods", nargs="*", default=["sft", "dpo", "reinforcement", "ppo"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="every method once on a tiny config, on the CPU")
    args = parser.parse_args(argv)
    if args.smoke:
        device, models, steps, sizes = torch.device("cpu"), ["tiny"], 1, SMOKE
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench/gpu.py needs CUDA (use --smoke on the CPU)")
        device, models, steps, sizes = torch.device("cuda", 0), args.models, args.steps, FULL
        print(f"gpu_bench device={torch.cuda.get_device_name(device).replace(' ', '_')}", flush=True)
    precision = choose_precision(LoraTraining(), device.type)
    compute = precision.compute

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=compute, enabled=compute != torch.float32)

    torch.manual_seed(0)
    for name in models:
        bench = Bench(device, precision.weights, autocast, sizes, int(model_config(name)["vocab_size"]))
        for method in args.methods:
            print(line(run(method, name, bench, steps)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
