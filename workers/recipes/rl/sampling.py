"""Sampling for online RL: each prompt runs through the model once, however many samples it gets.

``generate(num_return_sequences=G)`` copies every prompt G times before the first forward, so a
group of G samples pays for its prompt G times. Here the B prompts are prefilled once, the KV cache
is expanded to B·G rows (``Cache.batch_repeat_interleave``), and a short decode loop samples every
row with the cache: the LM head runs on the last position only (``logits_to_keep=1``), each row
stops at its first end-of-turn token, and the loop ends as soon as every row has stopped (a batch
of short answers does not run to ``max_new_tokens``). ``should_stop`` is polled between tokens so a
cancel or pause does not wait for a long generation to finish.

Sampling follows ``logits / temperature`` with nucleus (``top_p``) filtering, as transformers'
``TemperatureLogitsWarper`` and ``TopPLogitsWarper`` do, drawing from torch's global generator (so a
resumed job, whose RNG state comes back from its checkpoint, samples what the uninterrupted job would).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from workers.batching import position_ids


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


@torch.no_grad()
def sample_groups(model: nn.Module, queries: Tensor, query_mask: Tensor, *, group_size: int, max_new_tokens: int,
                  temperature: float, top_p: float, eos_ids: Sequence[int], pad_token_id: int,
                  should_stop: Callable[[], bool] | None = None) -> Samples:
    """``group_size`` samples of up to ``max_new_tokens`` tokens for each left-padded prompt row."""
    device = queries.device
    eos = torch.tensor(list(eos_ids), device=device)
    prefill = model(input_ids=queries, attention_mask=query_mask, position_ids=position_ids(query_mask),
                    use_cache=True, logits_to_keep=1)
    cache = prefill.past_key_values
    if group_size > 1:
        cache.batch_repeat_interleave(group_size)
    attention = query_mask.repeat_interleave(group_size, dim=0)
    next_position = attention.sum(dim=1, keepdim=True)  # real prompt length: the next token's position
    logits = prefill.logits[:, -1].float().repeat_interleave(group_size, dim=0)
    rows = attention.shape[0]
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    tokens: list[Tensor] = []
    stopped = False
    for step in range(max_new_tokens):
        scores = top_p_filter(logits / temperature, top_p)
        drawn = torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)
        drawn = drawn.masked_fill(finished, pad_token_id)
        tokens.append(drawn)
        finished |= torch.isin(drawn, eos)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        if should_stop is not None and should_stop():
            stopped = True
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        out = model(input_ids=drawn[:, None], attention_mask=attention, position_ids=next_position,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        next_position = next_position + 1
        logits = out.logits[:, -1].float()
    responses = torch.stack(tokens, dim=1)
    is_eos = torch.isin(responses, eos)
    # real tokens: everything up to and including the first end-of-turn token
    before_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) == 0
    return Samples(responses.masked_fill(~before_eos, pad_token_id), before_eos, is_eos.any(dim=1), stopped)
