"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for full fine-tunes on several ranks.

A job whose ``resources.strategy`` is ``fsdp`` (the planner picks it for a full fine-tune that DDP
cannot fit on one node, and for every full fine-tune on several nodes) shards its trainable model,
and the frozen DPO reference with it, over all ranks. Each rank keeps 1/N of every weight, gradient
and AdamW moment; a layer's weights are all-gathered just before its forward (and again for its
backward) and freed after, and gradients are reduce-scattered layer by layer.

Why ``fully_shard`` here and not accelerate's FSDP plugin:

* the recipes call their wrapper module (``PairLogps``, ``TokenLogps``, ``SequenceScores``), which
  runs the decoder and the head separately, so the FSDP root must be that wrapper, not the
  transformers model an auto-wrap policy would pick;
* multi-node ranks run under plain ``torchrun`` (``workers.jobset.rank_command``), with no
  ``accelerate launch`` configuration to turn a plugin on; the job's own ``strategy`` decides;
* the frozen reference is sharded on the same mesh, with no optimizer;
* checkpoints are written with ``torch.distributed.checkpoint`` into alignd's object store
  (``workers.sharded_checkpoints``), not accelerate's ``save_state`` directory.

accelerate still does what it does for every recipe: the process group, autocast contexts, the
optimizer/scheduler wrappers and ``backward``.

Units: every decoder layer is one FSDP unit; untied input and output embeddings are one unit each
(the largest single tensors of most models); the wrapper is the root and holds what is left (norms,
tied embeddings, a reward model's score head).

Precision: the master weights stay fp32 (``workers.modeling.choose_precision``); on a GPU with bf16
``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` gathers weights in bf16 for compute
and reduces gradients in fp32, and the root forward runs under the same autocast as accelerate's
prepared models. On the CPU (gloo, the tests) everything is fp32.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from service.jobs.spec import LoraTraining, TrainingType
from workers.context import JobFailure
from workers.distributed import is_main_process, rank_and_world

FSDP = "fsdp"


def wants_fsdp(strategy: str | None, training_type: TrainingType) -> bool:
    """Shard this job's model? Only a full fine-tune whose strategy says so, and only on several ranks
    (a 1-process run of the same job, e.g. a resume elsewhere, trains unsharded)."""
    return strategy == FSDP and not isinstance(training_type, LoraTraining) and rank_and_world()[1] > 1


def mixed_precision_policy(mixed: str) -> MixedPrecisionPolicy:
    if mixed == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()  # fp32 everywhere; fp16 keeps accelerate's autocast and loss scaler


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: modules whose class transformers marks as not to be split."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules) to shard")
    return layers


@dataclass
class Sharding:
    """One mesh over every rank and the precision policy, applied to each model the recipe trains or
    keeps frozen beside it."""

    mesh: DeviceMesh
    mixed: str
    compute: torch.dtype

    @classmethod
    def over_all_ranks(cls, device: torch.device, mixed: str, compute: torch.dtype) -> Sharding:
        return cls(init_device_mesh(device.type, (rank_and_world()[1],)), mixed, compute)

    def shard(self, wrapper: nn.Module, model: nn.Module) -> nn.Module:
        """Shard ``model`` (inside ``wrapper``) in place; ``wrapper`` becomes the FSDP root and is returned.

        Parameters are replaced by sharded ``DTensor`` parameters: build the optimizer afterwards."""
        policy = mixed_precision_policy(self.mixed)
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=self.mesh, mp_policy=policy)
        lm = getattr(model, "get_base_model", lambda: model)()
        get_in, get_out = getattr(lm, "get_input_embeddings", None), getattr(lm, "get_output_embeddings", None)
        embeddings = get_in() if get_in else None
        head = get_out() if get_out else None
        tied = head is not None and embeddings is not None and head.weight is embeddings.weight
        if not tied:  # tied: the shared weight must stay in one unit, the root
            for unit in (embeddings, head):
                if isinstance(unit, nn.Module) and any(True for _ in unit.parameters()):
                    fully_shard(unit, mesh=self.mesh, mp_policy=policy)
        fully_shard(wrapper, mesh=self.mesh, mp_policy=policy)
        if self.mixed != "no":
            _autocast_forward(wrapper, self.mesh.device_type, self.compute)
        return wrapper


def _autocast_forward(module: nn.Module, device_type: str, dtype: torch.dtype) -> None:
    """What ``Accelerator.prepare`` does to a model's forward, for a module it does not prepare."""
    forward = module.forward

    @functools.wraps(forward)
    def autocast_forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type=device_type, dtype=dtype):
            return forward(*args, **kwargs)

    module.forward = autocast_forward  # type: ignore[method-assign]


def is_sharded(params: list[nn.Parameter]) -> bool:
    return any(isinstance(p, DTensor) for p in params)


def clip_grad_norm_(accelerator: Any, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """The global gradient norm of sharded parameters (before clipping), then clip to ``max_norm``.

    Each rank holds a shard of every gradient: the norm of the local shards is a partial result that
    ``full_tensor()`` reduces over the mesh, so every rank clips with the same global norm."""
    accelerator.unscale_gradients()
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


# --------------------------------------------------------------------------- weights


@dataclass
class ShardedModelWeights:
    """A sharded full fine-tune as the loop's ``Weights``: checkpoints are sharded (model and optimizer
    through ``torch.distributed.checkpoint``, see ``workers.sharded_checkpoints``); the result archive
    is the gathered model as ordinary safetensors with its config and tokenizer (``from_pretrained``
    loads it). Every rank takes part in both (``collective``); rank 0 writes the files."""

    model: nn.Module           # the transformers model inside the FSDP root
    tokenizer: Any
    optimizer: Any             # the torch optimizer over the sharded parameters
    sharded = True
    collective = True

    def write(self, directory: Path) -> None:
        """Gathered full weights (a collective: every rank calls it); rank 0 saves them."""
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not is_main_process():
            return
        self.model.save_pretrained(str(directory), state_dict=full, safe_serialization=True)  # type: ignore[operator]
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory))

    def write_config(self, directory: Path) -> None:
        """What a sharded checkpoint's archive holds beside the shards: config and tokenizer."""
        self.model.config.save_pretrained(str(directory))  # type: ignore[operator,union-attr]
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory))

    def restore(self, directory: Path) -> None:
        """Only sharded checkpoints resume a sharded run (``load_resume_point`` reads those itself): an
        unsharded one holds its optimizer state by parameter position, which does not map onto shards."""
        raise JobFailure("checkpoint_incompatible", "this job's latest checkpoint is not sharded, so it cannot "
                         "resume a sharded (FSDP) run; its resources changed since it was written")
