"""Sampling for online RL: each prompt runs through the model once, however many samples it gets.

``generate(num_return_sequences=G)`` copies every prompt G times before the first forward, so a
group of G samples pays for its prompt G times. Here the B prompts are prefilled once, the KV cache
is expanded to B·G rows (``Cache.batch_repeat_interleave``), and a short decode loop samples every
row with the cache: the LM head runs on the last position only (``logits_to_keep=1``), each row
stops at its first end-of-turn token, and the loop ends as soon as every row has stopped (a batch
of short answers does not run to ``max_new_tokens``). ``should_stop`` is polled between tokens so a
cancel or pause does not wait for a long generation to finish.

**Static cache on CUDA.** On a GPU the cache is transformers' ``StaticCache``, allocated once per call at
its full size (prompt width + ``max_new_tokens``), and the decode step (one token for every row) runs
through ``torch.compile`` (``mode="reduce-overhead"``: CUDA graphs), so a step of a 7-8B model is one
graph launch instead of hundreds of kernel launches from Python. The step's inputs keep their shapes
(the attention mask is allocated at full width and filled in place), so it compiles once per cache size.
On the CPU, where kernel launches cost little and compiling would cost more than it saves, the
cache stays transformers' dynamic one (``cache="dynamic"``); ``cache="static"`` forces the static
cache without compiling, which is how the CPU tests check that both give the same tokens.

Sampling follows ``logits / temperature`` with nucleus (``top_p``) filtering, as transformers'
``TemperatureLogitsWarper`` and ``TopPLogitsWarper`` do, and draws each token by the inverse CDF
(``categorical``: one uniform a row, not ``torch.multinomial``'s one exponential per vocabulary entry)
from torch's global generator (so a resumed job, whose RNG state comes back from its checkpoint,
samples what the uninterrupted job would).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from workers.batching import position_ids

log = logging.getLogger("alignd.worker")


class Interrupted(Exception):
    """A stop (cancel, pause, preemption) arrived while a step was sampling: the step is abandoned."""


@dataclass
class Samples:
    """``B·G`` rows, prompt ``b``'s samples at rows ``b·G .. b·G + G - 1``."""

    responses: Tensor  # [B·G, T] sampled ids, ``pad`` after the end-of-turn token
    mask: Tensor       # [B·G, T] bool: real tokens (up to and including the end-of-turn token)
    has_eos: Tensor    # [B·G] bool: stopped by an end-of-turn token (else truncated)
    stopped: bool = False  # ``should_stop`` answered True before the end


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of tokens whose probability reaches ``top_p`` (the most likely always),
    written as transformers' ``TopPLogitsWarper`` is: drop the least likely tokens while their
    cumulative probability stays within ``1 - top_p``."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


CacheKind = Literal["auto", "dynamic", "static"]


def cache_kind(device: torch.device, cache: CacheKind = "auto") -> Literal["dynamic", "static"]:
    """``auto``: the static cache (compiled decode step) on CUDA, the dynamic cache elsewhere."""
    if cache == "auto":
        return "static" if device.type == "cuda" else "dynamic"
    return cache


def _static_cache(model: nn.Module, max_cache_len: int) -> Any:
    from transformers import StaticCache

    config: Any = model.config  # a PeftModel's is its base's
    return StaticCache(config=config.get_text_config(), max_cache_len=max_cache_len)


def _repeat_static(cache: Any, repeats: int) -> None:
    """The prompt's KV to every sample of its group (``StaticLayer`` has no ``batch_repeat_interleave``);
    the new tensors are tagged as fixed addresses again, as the static cache does (CUDA graphs)."""
    for layer in cache.layers:
        if repeats > 1:
            layer.keys = layer.keys.repeat_interleave(repeats, dim=0)
            layer.values = layer.values.repeat_interleave(repeats, dim=0)
            layer.batch_size = layer.keys.shape[0]
        torch._dynamo.mark_static_address(layer.keys)
        torch._dynamo.mark_static_address(layer.values)


def _decode_step(model: nn.Module, compiled: bool) -> Callable[..., Any]:
    def step(input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, past_key_values: Any) -> Tensor:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=past_key_values, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    if not compiled or model.__dict__.get("_alignd_compile_failed"):
        return step
    # one compiled step per model, kept on it: the graph is reused across steps and calls of the same shapes
    cached = model.__dict__.get("_alignd_compiled_decode")
    if cached is None:
        cached = torch.compile(step, mode="reduce-overhead", fullgraph=False, dynamic=False)
        model.__dict__["_alignd_compiled_decode"] = cached

    def guarded(*args: Any) -> Tensor:
        """Compiling can fail on an unusual model or torch build: sample eagerly then, and say so once."""
        if model.__dict__.get("_alignd_compile_failed"):
            return step(*args)
        try:
            return cached(*args)  # type: ignore[no-any-return]
        except Exception:  # noqa: BLE001 - the eager step computes the same tokens
            log.warning("compiling the decode step failed; sampling without torch.compile", exc_info=True)
            model.__dict__["_alignd_compile_failed"] = True
            return step(*args)

    return guarded


def categorical(probs: Tensor) -> Tensor:
    """One token per row of ``probs`` [rows, vocab], by the inverse of each row's cumulative distribution.

    Why not ``torch.multinomial``: for one sample it draws an exponential variate for every vocabulary
    entry (the exponential race), 786k of them for 16 rows of SmolLM2's 49k vocabulary, which takes
    ~25 ms a token on a 2-core CPU, about a sixth of a decode step. The inverse CDF needs one uniform a
    row and a cumulative sum (~0.5 ms) and draws from the same distribution. The sum runs in float64 so
    its rounding cannot shift mass between tokens; a token with probability 0 (cut by ``top_p``) is never
    drawn, since ``searchsorted(right=True)`` lands on the first entry whose cumulative sum exceeds the
    target, and that entry's own probability is what took the sum past it. The target is kept strictly
    below the total (``uniform x total`` can round up to it), so some entry always exceeds it, with no
    host sync for the rare case."""
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    target = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device) * total
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


def _draw(logits: Tensor, temperature: float, top_p: float, greedy: bool) -> Tensor:
    if greedy:
        return logits.argmax(dim=-1)
    scores = top_p_filter(logits / temperature, top_p)
    return categorical(scores.softmax(dim=-1))


@torch.no_grad()
def sample_groups(model: nn.Module, queries: Tensor, query_mask: Tensor, *, group_size: int, max_new_tokens: int,
                  temperature: float, top_p: float, eos_ids: Sequence[int], pad_token_id: int,
                  should_stop: Callable[[], bool] | None = None, cache: CacheKind = "auto",
                  greedy: bool = False) -> Samples:
    """``group_size`` samples of up to ``max_new_tokens`` tokens for each left-padded prompt row.

    ``cache``: see the module docstring; ``greedy`` takes the most likely token (tests compare caches)."""
    device = queries.device
    kind = cache_kind(device, cache)
    eos = torch.tensor(list(eos_ids), device=device)
    width = queries.shape[1]
    kv = _static_cache(model, width + max_new_tokens) if kind == "static" else None
    prefill = model(input_ids=queries, attention_mask=query_mask, position_ids=position_ids(query_mask),
                    past_key_values=kv, use_cache=True, logits_to_keep=1)
    kv = prefill.past_key_values
    if kind == "static":
        _repeat_static(kv, group_size)
    elif group_size > 1:
        kv.batch_repeat_interleave(group_size)
    prompt_mask = query_mask.repeat_interleave(group_size, dim=0)
    rows = prompt_mask.shape[0]
    if kind == "static":
        # full width from the start, filled in place: the compiled step sees the same shapes every token
        attention = torch.zeros(rows, width + max_new_tokens, dtype=prompt_mask.dtype, device=device)
        attention[:, :width] = prompt_mask
    else:
        attention = prompt_mask
    decode = _decode_step(model, compiled=kind == "static" and device.type == "cuda")
    next_position = prompt_mask.sum(dim=1, keepdim=True)  # real prompt length: the next token's position
    logits = prefill.logits[:, -1].float().repeat_interleave(group_size, dim=0)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    tokens: list[Tensor] = []
    stopped = False
    for step in range(max_new_tokens):
        drawn = _draw(logits, temperature, top_p, greedy).masked_fill(finished, pad_token_id)
        tokens.append(drawn)
        finished |= torch.isin(drawn, eos)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        if should_stop is not None and should_stop():
            stopped = True
            break
        if kind == "static":
            attention[:, width + step] = 1
        else:
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        logits = decode(drawn[:, None].clone(), attention, next_position.clone(), kv).clone()
        next_position = next_position + 1
    responses = torch.stack(tokens, dim=1)
    is_eos = torch.isin(responses, eos)
    # real tokens: everything up to and including the first end-of-turn token
    before_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) == 0
    return Samples(responses.masked_fill(~before_eos, pad_token_id), before_eos, is_eos.any(dim=1), stopped)
