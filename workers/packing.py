"""Padding-free batches: examples packed into rows of a fixed token budget (SFT, reward models).

Why: a right-padded batch is as wide as its longest example, so every shorter one pays for tokens
that are computed and thrown away (a third to a half of the tokens on chat data, even after length
bucketing). Packing puts several examples in one row, each with its own position ids (restarting at
0, so RoPE sees the positions it would alone) and a document mask so that no example attends to
another: every example's hidden states, hence its log-probs, equal the unpacked ones up to float
rounding.

- Rows are filled by best-fit decreasing (:func:`best_fit_decreasing`): longest example first, each
  into the open row with the least room that still fits it, a new row when none does. The budget is
  at most the job's ``max_length`` (so attention never spans more tokens than one example may
  have). Rows are as wide as the fullest one, so a nearly empty last row would cost a full row:
  :func:`plan_rows` tries the budgets that give 1, 2, ... n rows of equal share and keeps the one
  with the fewest slots (never more than the padded batch's). Widths are rounded up to a shape
  bucket where flex attention compiles per shape (``workers.attention.bucket_length``).
- Packing happens per micro-batch: the same examples make up each micro-batch and optimizer step as
  without packing, and SFT's loss stays the mean over the step's trained tokens (each micro-batch
  weighted by its trained-token share), so packing changes the shape of the work, not the loss.
- The document mask: on CUDA a flex-attention block mask from ``documents``; on SDPA (CPU) none is
  passed and transformers derives the same mask from the restarting ``position_ids``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from workers.attention import bucket_length, document_block_mask
from workers.data import TokenizedSequence


def best_fit_decreasing(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows of at most ``budget`` tokens (a longer item gets a row
    of its own). Deterministic: ties keep index order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        fits = [r for r, free in enumerate(room) if free >= lengths[i]]
        if fits:
            best = min(fits, key=lambda r: room[r])
            rows[best].append(i)
            room[best] -= lengths[i]
        else:
            rows.append([i])
            room.append(budget - lengths[i])
    return rows


def plan_rows(lengths: Sequence[int], budget: int, *, bucket: bool = False) -> tuple[list[list[int]], int]:
    """Rows (best-fit decreasing) and their width, for the budget ``<= max(budget, longest)`` that
    computes the fewest token slots (rows x width)."""
    longest, total = max(lengths), sum(lengths)
    cap = max(budget, longest)
    best: tuple[int, list[list[int]], int] | None = None
    for k in range(1, len(lengths) + 1):
        target = min(cap, max(longest, -(-total // k)))
        rows = best_fit_decreasing(lengths, target)
        width = max(sum(lengths[i] for i in row) for row in rows)
        if bucket:
            width = bucket_length(width)
        if best is None or len(rows) * width < best[0]:
            best = (len(rows) * width, rows, width)
    assert best is not None
    return best[1], best[2]


@dataclass
class PackedBatch:
    """Packed rows ``[R, W]``. ``documents``: which sequence (index into the sequences given) each
    position holds, -1 for padding; ``last``: flat index (``row * W + t``) of each sequence's last
    token, in the order given; ``tokens``: real tokens; ``attention_mask``: None (SDPA derives the
    mask from ``position_ids``) or a flex ``BlockMask``, set by :meth:`to`."""

    input_ids: Tensor
    position_ids: Tensor
    loss_mask: Tensor
    documents: Tensor
    last: Tensor
    tokens: int
    attention_mask: Any = None

    @property
    def slots(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device: torch.device, *, flex: bool = False) -> PackedBatch:
        moved = PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.loss_mask.to(device),
                            self.documents.to(device), self.last.to(device), self.tokens)
        if flex:
            moved.attention_mask = document_block_mask(moved.documents)
        return moved


def pack(sequences: Sequence[TokenizedSequence], budget: int, pad_token_id: int, *,
         bucket: bool = False) -> PackedBatch:
    """``sequences`` packed into rows of at most ``max(budget, longest)`` tokens (:func:`plan_rows`)."""
    if not sequences:
        raise ValueError("cannot pack an empty batch")
    lengths = [len(s) for s in sequences]
    rows, width = plan_rows(lengths, budget, bucket=bucket)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.long)
    documents = torch.full((len(rows), width), -1, dtype=torch.long)
    last = [0] * len(sequences)
    for r, row in enumerate(rows):
        at = 0
        for i in sorted(row):  # index order inside a row: reproducible layouts
            seq, n = sequences[i], lengths[i]
            input_ids[r, at:at + n] = torch.tensor(seq.input_ids, dtype=torch.long)
            loss_mask[r, at:at + n] = torch.tensor(seq.loss_mask, dtype=torch.long)
            position_ids[r, at:at + n] = torch.arange(n)
            documents[r, at:at + n] = i
            last[i] = r * width + at + n - 1
            at += n
        position_ids[r, at:] = torch.arange(width - at)  # padding: one more "document", never read
    return PackedBatch(input_ids, position_ids, loss_mask, documents, torch.tensor(last, dtype=torch.long),
                       sum(lengths))


@dataclass(frozen=True)
class PaddingShare:
    """Share of computed token slots that are padding, padded batches vs packed rows."""

    padded: float
    packed: float

    def as_data(self) -> dict[str, float]:
        return {"padding_share_padded": self.padded, "padding_share_packed": self.packed}


def padding_share(batches: Sequence[Sequence[int]], budget: int, *, bucket: bool = False) -> PaddingShare:
    """For ``batches`` of micro-batches of sequence lengths: the padding share of right-padded batches
    (each as wide as its longest) and of :func:`pack`'s rows."""
    tokens = padded = packed = 0
    for lengths in batches:
        if not lengths:
            continue
        tokens += sum(lengths)
        padded += len(lengths) * max(lengths)
        rows, width = plan_rows(lengths, budget, bucket=bucket)
        packed += len(rows) * width
    return PaddingShare(1 - tokens / max(padded, 1), 1 - tokens / max(packed, 1))


__all__ = ["PackedBatch", "PaddingShare", "best_fit_decreasing", "pack", "padding_share", "plan_rows"]
