"""Sharded checkpoints of FSDP runs: ``torch.distributed.checkpoint`` (DCP) files in the object store.

A sharded run's checkpoint of step ``n`` is two things in the store:

* ``jobs/<id>/step_<n>/shards/``: what ``dcp.save`` wrote, model **and** optimizer state: one
  ``__<rank>_0.distcp`` per rank, uploaded by that rank from its own disk (ranks on different nodes
  share no filesystem), and rank 0's ``.metadata``, the index of which slice of which tensor lies
  where;
* ``jobs/<id>/step_<n>/adapter.tar.gz`` (the key the checkpoint row names, as for any checkpoint):
  ``training_state.pt`` (scheduler, RNG, step, tokens, metrics, recipe state; no optimizer, which is
  in the shards), ``sharded_checkpoint.json`` (the manifest: the shard keys, the world size that
  wrote them) and the model's ``config.json`` and tokenizer.

The archive is written after every rank has uploaded its shard (a barrier), and the row after the
archive, so a checkpoint whose row exists is complete. Because DCP stores tensors by name with
their global shapes, a checkpoint loads into any number of ranks: FSDP on a different world size,
or one process with plain tensors. Loading needs the optimizer's state to exist;
``get_state_dict`` creates it (one zero-learning-rate step) when the optimizer has not stepped yet.

Every rank downloads every shard file before ``dcp.load`` (each reads only the slices it needs, but
which files those are is known only from the metadata); for very large models a node-local cache
of the prefix would save the repeated downloads.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from workers.archives import STATE_FILE, checkpoint_key, store_dir_archive
from workers.distributed import is_main_process, rank_and_world

if TYPE_CHECKING:
    from service.storage import ObjectStore
    from workers.context import JobContext
    from workers.fsdp import ShardedModelWeights

MANIFEST = "sharded_checkpoint.json"
FORMAT = "torch.distributed.checkpoint"


def shards_prefix(job_id: str, step: int, attempt: int) -> str:
    return f"jobs/{job_id}/attempt_{attempt}/step_{step}/shards/"


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """accelerate's wrapper keeps the torch optimizer in ``.optimizer``."""
    inner = getattr(optimizer, "optimizer", optimizer)
    assert isinstance(inner, torch.optim.Optimizer), type(inner)
    return inner


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_gather(value: Any) -> list[Any]:
    if not _distributed():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def save_sharded_checkpoint(ctx: JobContext, weights: ShardedModelWeights, step: int, state: dict[str, Any]) -> str:
    """Every rank saves and uploads its shard; rank 0 then writes the archive. Returns the archive's key."""
    key = checkpoint_key(ctx.job_id, step, attempt=ctx.attempt)
    prefix = shards_prefix(ctx.job_id, step, ctx.attempt)
    model_state, optim_state = get_state_dict(weights.model, _torch_optimizer(weights.optimizer))
    with tempfile.TemporaryDirectory(dir=ctx.workdir) as tmp:
        local = Path(tmp) / "shards"
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(local))
        uploaded = []
        for path in sorted(p for p in local.iterdir() if p.is_file()):  # this rank's files only
            ctx.store.put_file(prefix + path.name, path)
            uploaded.append(prefix + path.name)
        files = sorted(k for keys in _all_gather(uploaded) for k in keys)  # a barrier: every shard is up
        if is_main_process():
            out = Path(tmp) / "archive"
            out.mkdir()
            weights.write_config(out)
            torch.save(state, out / STATE_FILE)
            manifest = {"format": FORMAT, "prefix": prefix, "files": files, "world_size": rank_and_world()[1]}
            (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
            store_dir_archive(ctx.store, out, key)
    return key


def is_sharded_checkpoint(directory: Path) -> bool:
    return (directory / MANIFEST).is_file()


def load_sharded_checkpoint(store: ObjectStore, directory: Path, model: nn.Module, optimizer: Any) -> None:
    """Model and optimizer state from the shards the manifest in ``directory`` names, into ``model``
    (sharded or not) and its ``optimizer``; every rank calls it."""
    manifest = json.loads((directory / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"unknown sharded checkpoint format {manifest.get('format')!r}")
    prefix = str(manifest["prefix"])
    local = directory / "shards"
    local.mkdir(exist_ok=True)
    for key in manifest["files"]:
        if not key.startswith(prefix) or "/" in key[len(prefix):]:
            raise ValueError(f"shard {key!r} is not under {prefix!r}")
        store.download_file(key, local / key[len(prefix):])
    torch_optimizer = _torch_optimizer(optimizer)
    model_state, optim_state = get_state_dict(model, torch_optimizer)
    with warnings.catch_warnings():  # one process reading what N wrote is the point
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=str(local))
    set_state_dict(model, torch_optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    _barrier()
