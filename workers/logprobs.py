"""Log-probabilities of target tokens from hidden states, without a ``[tokens × vocabulary]`` tensor.

Why: the LM head's output is the largest tensor of a fine-tuning step. For Llama-3's 128,256-token
vocabulary, 8 × 2,048 trained tokens give 16,384 × 128,256 fp32 logits = 8.4 GB, and autograd keeps
them (and their softmax) for the backward. Every recipe that needs ``log p(target)`` (SFT's loss,
DPO's sequence log-probs, PPO's and GRPO's policy log-probs) only needs one number per token, so
:func:`target_logps` runs the head on a chunk of hidden states at a time: head -> logsumexp ->
gather -> free. Under autograd each chunk is wrapped in ``torch.utils.checkpoint`` (non-reentrant):
the forward keeps only the chunk's inputs (hidden states, a view) and its ``[chunk]`` result, and
the backward recomputes one chunk's logits at a time. Peak memory then grows with
``chunk × vocabulary`` instead of ``tokens × vocabulary``; the price is a second head matmul per
chunk in the backward (about 1/(2·layers) of a step's FLOPs for a LoRA run).

Gradients are those of the unchunked computation: the same function, recomputed.

Assumption (as before): the causal LM's logits are ``lm_head(hidden)`` (no soft-capping or
``logit_scale``; see ``workers.modeling``). ``temperature`` divides the logits as sampling does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

#: Logit elements one chunk may hold (fp32: 4 bytes each): 2**25 = 128 MiB, e.g. 261 tokens of a
#: 128K vocabulary or 682 of SmolLM2's 49K. Large enough that the head matmul stays efficient.
CHUNK_ELEMENTS = 2**25


class HeadOutputs(NamedTuple):
    """Per target token, in the order given: ``logps`` (fp32 for half-precision logits, with gradients),
    and if asked ``correct`` (argmax == target) and ``entropy`` (of the softmax, detached)."""

    logps: Tensor
    correct: Tensor | None
    entropy: Tensor | None


def chunk_tokens(vocab_size: int, budget: int = CHUNK_ELEMENTS) -> int:
    """Tokens per chunk so that one chunk's logits hold at most ``budget`` elements."""
    return max(1, budget // max(vocab_size, 1))


def _chunk(head: nn.Module, hidden: Tensor, targets: Tensor, temperature: float, with_correct: bool,
           with_entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    logits = head(hidden)
    if logits.dtype in (torch.bfloat16, torch.float16):  # fp32 for the logsumexp; fp64 stays fp64
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    empty = logps.new_empty(0)
    with torch.no_grad():
        correct = logits.argmax(dim=-1) == targets if with_correct else empty
        entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1) if with_entropy else empty
    return logps, correct, entropy


def target_logps(hidden: Tensor, head: nn.Module, targets: Tensor, *, temperature: float = 1.0,
                 with_correct: bool = False, with_entropy: bool = False, chunk: int | None = None) -> HeadOutputs:
    """``log softmax(head(hidden) / temperature)[target]`` per token, ``chunk`` tokens at a time.

    ``hidden`` is ``[..., H]`` and ``targets`` ``[...]`` (valid token ids); outputs have ``targets``'
    shape. ``chunk`` defaults to :func:`chunk_tokens` of the head's output size.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must match hidden {tuple(hidden.shape[:-1])}")
    shape = targets.shape
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).long()
    weight = getattr(head, "weight", None)
    size = chunk or chunk_tokens(int(weight.shape[0]) if isinstance(weight, Tensor) else 1)
    needs_graph = torch.is_grad_enabled() and (
        flat_hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    parts: list[tuple[Tensor, Tensor, Tensor]] = []
    for start in range(0, flat_targets.shape[0], size):
        args = (head, flat_hidden[start:start + size], flat_targets[start:start + size], temperature,
                with_correct, with_entropy)
        if needs_graph:
            parts.append(checkpoint(_chunk, *args, use_reentrant=False))
        else:
            parts.append(_chunk(*args))
    if not parts:
        empty = flat_hidden.new_empty(0, dtype=torch.float32)
        parts = [(empty, empty.bool(), empty)]
    logps = torch.cat([p[0] for p in parts]).reshape(shape)
    correct = torch.cat([p[1] for p in parts]).reshape(shape) if with_correct else None
    entropy = torch.cat([p[2] for p in parts]).reshape(shape) if with_entropy else None
    return HeadOutputs(logps, correct, entropy)


__all__ = ["CHUNK_ELEMENTS", "HeadOutputs", "chunk_tokens", "target_logps"]
