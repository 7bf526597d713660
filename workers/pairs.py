"""Preference pairs as model inputs: the plain padded layout and the shared-prompt layout, and
``PairLogps``, the completion log-probs of both sides from one decoder pass.

Shared-prompt layout: each pair is one row ``[prompt, chosen completion, rejected completion]``
whose attention mask keeps the two completions apart and whose position ids restart the rejected
completion where the prompt ends. Every completion token sees exactly the context it has in its own
sequence, so the log-probs equal those of the plain ``[chosen..., rejected...]`` padded batch up to
float rounding, for about half the decoder work on typical pairs (no second copy of the prompt, no
padding of the short side to the long one). The DPO recipe checks it once against the plain layout.

On CUDA the same rule runs as a flex-attention block mask (``workers.attention``; rows padded to
a length bucket so the compiled kernel is reused); the CPU keeps the dense 4D mask on SDPA. Which
layout a job runs is ``workers.attention.choose_layout``'s decision.

The LM head runs on completion tokens only (the hidden states that predict one), a chunk of
tokens at a time (``workers.logprobs``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from workers import batching as B
from workers import data as D
from workers.attention import SEG_CHOSEN as _CHOSEN
from workers.attention import SEG_PAD as _PAD
from workers.attention import SEG_REJECTED as _REJECTED
from workers.attention import SEG_SHARED as _SHARED
from workers.attention import bucket_length, shared_prompt_block_mask
from workers.logprobs import target_logps
from workers.modeling import causal_lm_of

#: Mean |difference| per completion token allowed between the shared-prompt and the plain layout at
#: the setup check. Rounding gives ~1e-6 in fp32 and ~1e-2 in bf16; a mask or position the model
#: ignores gives whole nats.
LAYOUT_TOLERANCE = 0.05


@dataclass
class PairBatch:
    """Model inputs for ``B`` pairs plus where to read each completion token's log-prob.

    Sequence ``k`` of the output is chosen ``k`` for ``k < B`` and rejected ``k - B`` after. ``src``
    indexes ``hidden.flatten(0, 1)`` at the position that predicts token ``targets[i]`` of sequence
    ``seq[i]``. ``attention_mask`` is ``[rows, T]`` (plain layout, padding mask) or ``[B, 1, T, T]``
    (shared-prompt layout, True = may attend). ``tokens``: real tokens of both sequences (host int).
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor | None
    src: Tensor
    targets: Tensor
    seq: Tensor
    counts: Tensor
    tokens: int
    segments: Tensor | None = None

    @property
    def n_pairs(self) -> int:
        return self.counts.shape[0] // 2

    def to(self, device: torch.device, mask_dtype: torch.dtype | None = None) -> PairBatch:
        """On ``device``; a 4D boolean mask becomes additive in ``mask_dtype`` if given (eager attention)."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, Tensor):
                moved[name] = value.to(device, non_blocking=True)
        if moved["segments"] is not None:
            moved["attention_mask"] = shared_prompt_block_mask(moved["segments"])
            return PairBatch(**moved)
        mask = moved["attention_mask"]
        if mask_dtype is not None and mask.dim() == 4:
            moved["attention_mask"] = torch.zeros(mask.shape, dtype=mask_dtype, device=device).masked_fill_(
                ~mask, torch.finfo(mask_dtype).min)
        return PairBatch(**moved)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def collate_plain(pairs: list[D.TokenizedPair], pad_token_id: int) -> PairBatch:
    """``[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]`` right-padded to one width."""
    batch = B.collate_pairs(pairs, pad_token_id)
    input_ids, loss_mask = batch["input_ids"], batch["loss_mask"]
    targets_mask = loss_mask[:, 1:].bool()
    rows, cols = targets_mask.nonzero(as_tuple=True)
    return PairBatch(input_ids=input_ids, attention_mask=batch["attention_mask"], position_ids=None,
                     src=rows * input_ids.shape[1] + cols, targets=input_ids[:, 1:][targets_mask], seq=rows,
                     counts=targets_mask.sum(dim=1),
                     tokens=sum(len(p.chosen) + len(p.rejected) for p in pairs))


def collate_shared(pairs: list[D.TokenizedPair], pad_token_id: int, *, flex: bool = False) -> PairBatch:
    """One row per pair: the common prefix of chosen and rejected once, then each side's remainder.

    The prefix is the longest run of identical leading tokens (the prompt, and any identical start of
    the two completions): each token's hidden state depends only on the tokens before it, so it is
    the same in both sequences. Positions of the rejected remainder restart where the prefix ends, and
    the mask lets it see the prefix and itself, never the chosen remainder.

    ``flex``: no dense mask; the width is rounded up to a length bucket and the segments travel
    instead (see :class:`PairBatch`).
    """
    n = len(pairs)
    layouts = []
    for pair in pairs:
        chosen, rejected = pair.chosen.input_ids, pair.rejected.input_ids
        shared = _common_prefix(chosen, rejected)
        layouts.append((shared, chosen + rejected[shared:],
                        list(range(len(chosen))) + list(range(shared, len(rejected)))))
    width = max(len(ids) for _, ids, _ in layouts)
    if flex:
        width = bucket_length(width)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    segment = torch.full((n, width), _PAD, dtype=torch.long)
    src: list[int] = []
    targets: list[int] = []
    seq: list[int] = []
    counts = [0] * (2 * n)
    for row, (pair, (shared, ids, positions)) in enumerate(zip(pairs, layouts, strict=True)):
        n_chosen = len(pair.chosen)
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        position_ids[row, :len(ids)] = torch.tensor(positions, dtype=torch.long)
        segment[row, shared:n_chosen] = _CHOSEN
        segment[row, n_chosen:len(ids)] = _REJECTED
        segment[row, :shared] = _SHARED
        base = row * width
        for side, sequence, offset in ((0, pair.chosen, 0), (1, pair.rejected, n_chosen - shared)):
            out = side * n + row
            for t in range(1, len(sequence)):
                if sequence.loss_mask[t]:
                    before = t - 1  # the position whose hidden state predicts token t
                    src.append(base + (before if before < shared else before + offset))
                    targets.append(sequence.input_ids[t])
                    seq.append(out)
                    counts[out] += 1
    tokens = sum(len(p.chosen) + len(p.rejected) for p in pairs)
    common: dict[str, Any] = {
        "input_ids": input_ids, "position_ids": position_ids, "src": torch.tensor(src, dtype=torch.long),
        "targets": torch.tensor(targets, dtype=torch.long), "seq": torch.tensor(seq, dtype=torch.long),
        "counts": torch.tensor(counts, dtype=torch.long), "tokens": tokens}
    if flex:
        return PairBatch(attention_mask=torch.ones(n, width, dtype=torch.long), segments=segment, **common)
    index = torch.arange(width)
    causal = index[None, :] <= index[:, None]  # [query, key]
    seg_q, seg_k = segment[:, :, None], segment[:, None, :]
    allowed = causal & ((seg_k == _SHARED) | (seg_k == seg_q)) & (seg_k != _PAD)
    allowed |= torch.eye(width, dtype=torch.bool)  # padding rows attend to themselves (no empty softmax)
    return PairBatch(attention_mask=allowed[:, None], **common)


class PairLogps(nn.Module):
    """``forward(batch) -> (sums [2B], counts [2B])``: completion log-probs of chosen then rejected.

    The decoder runs once over the batch, the LM head on completion positions only. A module so that
    accelerate/DDP wraps the whole computation (DDP syncs gradients only through the wrapper).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: PairBatch) -> tuple[Tensor, Tensor]:
        lm = causal_lm_of(self.model)
        decoder = getattr(lm, lm.base_model_prefix)
        hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=batch.position_ids).last_hidden_state
        selected = hidden.flatten(0, 1).index_select(0, batch.src)
        token_logps = target_logps(selected, lm.get_output_embeddings(), batch.targets).logps
        sums = token_logps.new_zeros(batch.counts.shape[0]).index_add(0, batch.seq, token_logps)
        return sums, batch.counts
