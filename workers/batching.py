"""Collation and batching: tokenised examples into padded tensors, and index batches planned from a seed.

Masks follow ``workers.data``'s convention (``loss_mask[t] == 1``: token ``t`` is a target at its own
position). Training batches are right-padded; prompts that a model continues (sampling) are
left-padded with position ids that count real tokens only.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from workers.data import IGNORE_INDEX, TokenizedExample, TokenizedPair, TokenizedSequence
from workers.distributed import shard_batches

#: How many batches' worth of examples are sorted together when bucketing by length: large enough
#: to find similar lengths, small enough that batches still differ from one epoch to the next.
BUCKET_BATCHES = 50

# --------------------------------------------------------------------------- collation


def collate_pairs(
    batch: Sequence[TokenizedPair], pad_token_id: int, *, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """One right-padded batch ``[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]``.

    One forward pass serves both sides (and the reference model); split the outputs at ``B``.
    ``loss_mask`` marks target tokens at their own position (see the module docstring).
    ``margin`` (shape ``[B]``) is present when any pair has one; missing margins count as 0.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    sequences = [pair.chosen for pair in batch] + [pair.rejected for pair in batch]
    out = _pad(sequences, pad_token_id, pad_to_multiple_of)
    if any(pair.margin is not None for pair in batch):
        out["margin"] = torch.tensor([pair.margin or 0.0 for pair in batch], dtype=torch.float32)
    return out


def collate_supervised(
    batch: Sequence[TokenizedExample], pad_token_id: int, *, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``loss_mask`` and HF-style ``labels``.

    ``labels`` is ``input_ids`` with ``-100`` where ``loss_mask`` is 0, unshifted, so
    ``model(input_ids, attention_mask, labels=labels)`` computes the same masked loss.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    out = _pad(batch, pad_token_id, pad_to_multiple_of)
    out["labels"] = out["input_ids"].masked_fill(out["loss_mask"] == 0, IGNORE_INDEX)
    return out


def _pad(
    sequences: Sequence[TokenizedSequence], pad_token_id: int, pad_to_multiple_of: int | None
) -> dict[str, torch.Tensor]:
    width = max(len(seq) for seq in sequences)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    loss_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        length = len(seq)
        input_ids[row, :length] = torch.tensor(seq.input_ids, dtype=torch.long)
        attention_mask[row, :length] = 1
        loss_mask[row, :length] = torch.tensor(seq.loss_mask, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts for sampling: ``(ids, attention_mask)`` padded on the left so every row ends together."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, so a left-padded prompt sees the positions it would alone."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


# --------------------------------------------------------------------------- batching


def length_bucketed_batches(
    lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool = True
) -> list[list[int]]:
    """Index batches of similar lengths, to cut padding; each index appears exactly once.

    With ``shuffle``, indices are shuffled with ``seed``, sorted by length within chunks of
    ``BUCKET_BATCHES`` batches (so epochs with different seeds still mix examples), cut into
    batches, and the batch order is shuffled. Without it, all indices are sorted longest first
    (evaluation: the largest batch runs first, so an out-of-memory shows up at once).

    Under ``accelerate launch`` with N ranks, ``batch_size`` is the global batch and each rank gets
    its slice of every batch (``workers.distributed.shard_batches``): same steps, same examples per
    step as one process.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    order = list(range(len(lengths)))
    if not shuffle:
        order.sort(key=lambda i: -lengths[i])
        return shard_batches([order[i : i + batch_size] for i in range(0, len(order), batch_size)])
    rng = random.Random(seed)
    rng.shuffle(order)
    chunk = batch_size * BUCKET_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        group = sorted(order[start : start + chunk], key=lambda i: lengths[i])  # stable: ties stay random
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return shard_batches(batches)
