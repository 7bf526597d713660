"""Per-token log-probabilities and argmax hits on trained positions only (SFT's loss and accuracy).

The token-level sibling of :class:`workers.pairs.PairLogps`: the decoder runs on the whole
batch, the LM head only on the hidden states that predict a ``loss_mask`` token (see the mask
convention in :mod:`workers.data`), a chunk of tokens at a time (``workers.logprobs``), so no
``[tokens, V]`` logits tensor is ever built.

Packed rows (``workers.packing``) come with ``position_ids`` that restart per example and a document
mask; the loss is the same per-token mean, so packing changes the batch shape, not the loss.

Assumption shared with ``PairLogps``: the causal LM's logits are ``lm_head(last_hidden_state)``.
Models that post-process logits in their own ``forward`` (Gemma-2 soft-capping, Cohere's
``logit_scale``) would need that step added here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor, nn

from workers.logprobs import target_logps
from workers.modeling import causal_lm_of


class TokenPredictions(NamedTuple):
    """One entry per trained token of a batch, in row-major order."""

    logps: Tensor    # [N] log p(target), fp32 for half-precision logits; carries gradients
    correct: Tensor  # [N] bool: argmax of the logits == target
    rows: Tensor     # [N] the batch row each token belongs to


def token_predictions(logits: Tensor, targets: Tensor, rows: Tensor) -> TokenPredictions:
    """``logits`` ``[N, V]`` at the positions that predict ``targets`` ``[N]`` (already computed logits:
    the same per-token path as :class:`TokenLogps`, with the identity as the head)."""
    out = target_logps(logits, nn.Identity(), targets, with_correct=True)
    assert out.correct is not None
    return TokenPredictions(out.logps, out.correct, rows)


def token_nll(predictions: TokenPredictions) -> tuple[Tensor, dict[str, float]]:
    """Mean negative log-likelihood over the tokens given, and the share predicted exactly.

    ``loss = -sum(logps) / N``; ``mean_token_accuracy = #(argmax == target) / N`` (TRL's SFT metric).
    No tokens gives a zero loss (still attached to the graph) and accuracy 0.
    """
    n = predictions.logps.numel()
    loss = -predictions.logps.sum() / max(n, 1)
    accuracy = float(predictions.correct.float().sum()) / max(n, 1)
    return loss, {"loss": float(loss.detach()), "mean_token_accuracy": accuracy}


class TokenLogps(nn.Module):
    """``forward(input_ids, attention_mask, loss_mask) -> TokenPredictions`` over ``loss_mask`` targets.

    A module so that accelerate/DDP wraps the whole computation (DDP syncs gradients only through the wrapper).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Any, loss_mask: Tensor,
                position_ids: Tensor | None = None, rows: Tensor | None = None) -> TokenPredictions:
        """``attention_mask``: the padding mask, or a packed batch's document mask (``workers.attention``);
        ``rows``: the example each position belongs to (packed), else the batch row."""
        lm = causal_lm_of(self.model)
        decoder = getattr(lm, lm.base_model_prefix)
        head = lm.get_output_embeddings()
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids).last_hidden_state
        targets_mask = loss_mask[:, 1:].bool()
        row_of = targets_mask.nonzero(as_tuple=True)[0] if rows is None else rows[:, 1:][targets_mask]
        targets = input_ids[:, 1:][targets_mask]
        out = target_logps(hidden[:, :-1][targets_mask], head, targets, with_correct=True)
        assert out.correct is not None
        return TokenPredictions(out.logps, out.correct, row_of)


__all__ = ["TokenLogps", "TokenPredictions", "token_nll", "token_predictions"]
