"""Which attention kernel a batch layout runs on, and the block masks of the non-plain layouts.

Why: DPO's shared-prompt rows and packed SFT/reward-model rows need masks that are not "causal +
padding": tokens of one completion (or one example) must not see another's. As a dense 4D mask,
SDPA takes such a mask only on its math / memory-efficient kernels (no flash), and the mask itself
is ``rows × T × T``. ``torch.nn.attention.flex_attention`` takes the same rule as a *block mask*
(``BlockMask``: which 128×128 tiles are empty, full or partial) and skips empty tiles, so a
document mask costs what the documents cost, on a fused kernel.

What this module provides
- :data:`SDPA_OR_FLEX`, an attention implementation registered with transformers
  (``AttentionInterface``): flex attention when the layer is handed a ``BlockMask``, transformers'
  own SDPA path for everything else (padding masks, 4D tensors, generation with a KV cache). One
  implementation for both, so activation checkpointing's recomputation (which runs at backward
  time) always sees the kernel its forward used. transformers passes a 4D mask or a ``BlockMask``
  through to the layers untouched (``masking_utils._preprocess_mask_arguments``).
- On CUDA the flex kernel is ``torch.compile(flex_attention, dynamic=False)``, compiled once per
  shape; batch widths are rounded up to :func:`bucket_length` so a run compiles a handful of
  shapes, not one per batch. On the CPU it is flex attention's eager reference (forward only:
  torch has no CPU backward for it), which the tests use to check the masks.
- :func:`choose_layout`: the layout a recipe runs, with the reason for the event it reports.

transformers' own ``attn_implementation="flex_attention"`` compiles on every device (the CPU
needs a C++ toolchain and minutes on 2 cores) and builds its mask from 2D inputs; it does accept a
prepared ``BlockMask``, which is what we hand ours. For packed rows on SDPA, transformers detects
the packing from ``position_ids`` that restart at 0 (``find_packed_sequence_indices``) when no
attention mask is given and builds the document mask itself: the "position-id" layout.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

SDPA_OR_FLEX = "alignd_sdpa_flex"
#: flex attention's tile: block masks are built in 128×128 blocks, so bucket widths are multiples of it
FLEX_BLOCK = 128
#: segment ids of the shared-prompt layout (``workers.pairs``)
SEG_SHARED, SEG_CHOSEN, SEG_REJECTED, SEG_PAD = 0, 1, 2, 3


def bucket_length(n: int) -> int:
    """``n`` rounded up to a shape bucket: multiples of 128 up to 1024, then of 512 (at most ~12%
    extra padding past 1024 tokens, and ~20 shapes up to 8K, each compiled once)."""
    step = FLEX_BLOCK if n <= 1024 else 512
    return max(step, math.ceil(n / step) * step)


@cache
def _flex_kernel(device_type: str) -> Callable[..., Tensor]:
    if device_type == "cuda":
        import torch._dynamo

        # one compiled graph per (rows, width) bucket; the default limit of 8 would fall back to eager
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        return torch.compile(flex_attention, dynamic=False)  # type: ignore[return-value]
    return flex_attention  # type: ignore[return-value]


def sdpa_or_flex(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                 attention_mask: Tensor | BlockMask | None, scaling: float | None = None,
                 dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, None]:
    """The registered attention function: flex for a ``BlockMask``, transformers' SDPA otherwise."""
    if not isinstance(attention_mask, BlockMask):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask,  # type: ignore[no-any-return]
                                      scaling=scaling, dropout=dropout, **kwargs)
    if dropout and module.training:
        raise ValueError("flex attention has no attention dropout; such models use the plain layout")
    gqa = query.shape[1] != key.shape[1]
    with warnings.catch_warnings():  # the CPU's unfused reference warns on every call
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        out = _flex_kernel(query.device.type)(query, key, value, block_mask=attention_mask, scale=scaling,
                                              enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make :data:`SDPA_OR_FLEX` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SDPA_OR_FLEX, sdpa_or_flex)
    AttentionMaskInterface.register(SDPA_OR_FLEX, sdpa_mask)  # 2D masks become SDPA's


def use_flex(model: Any) -> None:
    """Switch a loaded (``sdpa``) model to :data:`SDPA_OR_FLEX`: same results on plain batches."""
    register()
    model.set_attn_implementation(SDPA_OR_FLEX)


def flex_available() -> bool:
    """Flex attention trains on CUDA only (no CPU backward)."""
    return torch.cuda.is_available()


def custom_masks_supported(config: Any) -> tuple[bool, str]:
    """Whether a model takes a mask of ours: SDPA-family attention, full attention in every layer (a
    sliding window would be overridden by our mask), no attention dropout (flex has none)."""
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in ("sdpa", "eager", SDPA_OR_FLEX):
        return False, f"attention {implementation!r}"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        return False, "layers with sliding-window or linear attention"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False, "a sliding window"
    if getattr(config, "attention_dropout", 0.0):
        return False, "attention dropout"
    return True, ""


@dataclass(frozen=True)
class Layout:
    """``name``: ``plain`` | ``shared_mask`` | ``shared_flex`` (DPO), ``padded`` | ``packed_positions`` |
    ``packed_flex`` (SFT, reward model); ``reason``: why, for the event."""

    name: str
    reason: str

    @property
    def flex(self) -> bool:
        return self.name.endswith("_flex")


def choose_layout(kind: str, config: Any, device: torch.device, *, wanted: bool = True) -> Layout:
    """``kind`` "pairs" (DPO) or "packed" (SFT / reward model; ``wanted`` = the ``packing`` setting).

    CUDA with a model that takes our masks: the flex layouts (fused, tiles of other documents
    skipped). CPU: the shared-prompt 4D mask and position-id packing on SDPA (measured faster on the
    CPU than the plain layout: no second copy of the prompt, no padding). Otherwise the plain layouts.
    """
    if kind == "packed" and not wanted:
        return Layout("padded", "packing is off in the hyperparameters")
    ok, why = custom_masks_supported(config)
    plain = "plain" if kind == "pairs" else "padded"
    if not ok:
        return Layout(plain, f"the model's {why} does not take a custom mask")
    if device.type == "cuda" and flex_available():
        name = "shared_flex" if kind == "pairs" else "packed_flex"
        return Layout(name, "CUDA: flex attention with a block mask, compiled once per length bucket")
    name = "shared_mask" if kind == "pairs" else "packed_positions"
    return Layout(name, f"{device.type}: SDPA with a "
                        + ("4D mask" if kind == "pairs" else "document mask from restarting position ids"))


# --------------------------------------------------------------------------- block masks


def _block_mask(mask_mod: Callable[..., Tensor], rows: int, width: int, device: torch.device) -> BlockMask:
    """On CUDA the mask is built by a compiled kernel: uncompiled, evaluating ``mask_mod`` over
    ``rows × width × width`` materialises int64 intermediates (4 GB for 8 rows of 8K tokens)."""
    return create_block_mask(mask_mod, rows, None, width, width, device=device, _compile=device.type == "cuda")


def shared_prompt_block_mask(segments: Tensor) -> BlockMask:
    """The shared-prompt rule (``workers.pairs.collate_shared``) as a block mask: causal, a key is the
    shared prefix or the query's own completion, never padding; padding queries see themselves."""

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        seg_q, seg_k = segments[b, q], segments[b, k]
        allowed = (k <= q) & ((seg_k == SEG_SHARED) | (seg_k == seg_q)) & (seg_k != SEG_PAD)
        return allowed | (q == k)

    rows, width = segments.shape
    return _block_mask(mask_mod, rows, width, segments.device)


def document_block_mask(documents: Tensor) -> BlockMask:
    """Packed rows: causal within a document (``documents[row, t]``, -1 = padding, which sees itself)."""

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        doc_q, doc_k = documents[b, q], documents[b, k]
        return ((k <= q) & (doc_q == doc_k) & (doc_k >= 0)) | (q == k)

    rows, width = documents.shape
    return _block_mask(mask_mod, rows, width, documents.device)


__all__ = ["FLEX_BLOCK", "SDPA_OR_FLEX", "SEG_CHOSEN", "SEG_PAD", "SEG_REJECTED", "SEG_SHARED", "Layout",
           "bucket_length", "choose_layout", "custom_masks_supported",
           "document_block_mask", "flex_available", "register", "sdpa_or_flex", "shared_prompt_block_mask",
           "use_flex"]
