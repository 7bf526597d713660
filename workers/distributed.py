"""What a recipe's process needs to know when ``accelerate launch`` runs it as one of N ranks.

Only rank 0 writes to the database (events, metric points, progress, checkpoints); every rank
calls the reporter at the same points of the loop, so the reporter can combine the ranks' step
metrics with one ``all_gather_object`` and share rank 0's cancel/pause decision with one
``broadcast_object_list``. With a single process, or before the process group exists, these are
plain pass-throughs, and torch is never imported here.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from typing import Any

#: Summed over ranks (each rank counts its own share); everything else is averaged, except names
#: ending in ``min``/``max`` and per-device GPU peaks (the extreme).
SUMMED = frozenset({"num_tokens", "tokens_per_second", "memory/host_peak_rss_bytes", "_trained_tokens"})


def _group() -> Any | None:
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size: from the process group, else from the launcher's env."""
    dist = _group()
    if dist is not None:
        return int(dist.get_rank()), int(dist.get_world_size())
    world = int(os.environ.get("WORLD_SIZE") or 1)
    return (int(os.environ.get("RANK") or 0) if world > 1 else 0), world


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def combine_ranks(per_rank: Sequence[dict[str, float]]) -> dict[str, float]:
    """One rank's view of a step from every rank's metrics (see ``SUMMED``)."""
    combined: dict[str, float] = {}
    names = list(dict.fromkeys(name for values in per_rank for name in values))
    for name in names:
        values = [float(r[name]) for r in per_rank if name in r and math.isfinite(float(r[name]))]
        if not values:
            continue
        if name in SUMMED:
            combined[name] = sum(values)
        elif name.endswith("min"):
            combined[name] = min(values)
        elif name.endswith("max") or name.startswith("memory/gpu"):
            combined[name] = max(values)
        else:
            combined[name] = sum(values) / len(values)
    return combined


#: What a collective raises when a peer went away: gloo's transport errors (``Connection closed by
#: peer``, ``Connection reset``, its timeouts), NCCL's aborted communicators and watchdog timeouts.
_LOST_PEER_MARKERS = ("gloo/transport/", "Connection closed by peer", "Connection reset by peer", "Broken pipe",
                      "NCCL communicator was aborted", "Watchdog caught collective operation timeout")


def lost_connection(exc: BaseException) -> bool:
    """``exc`` (or what caused it) is torch.distributed failing because another rank is gone."""
    torch = sys.modules.get("torch")
    dist_error = getattr(getattr(torch, "distributed", None), "DistError", None) if torch is not None else None
    seen: BaseException | None = exc
    for _ in range(8):  # the exception and its causes
        if seen is None:
            return False
        if dist_error is not None and isinstance(seen, dist_error):
            return True
        if any(marker in str(seen) for marker in _LOST_PEER_MARKERS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def shard_batches(batches: list[list[int]]) -> list[list[int]]:
    """This rank's slice (``batch[rank::world]``) of every global batch; unchanged for one process.

    Every rank gets the same number of batches, so they step together. A batch smaller than the
    world (the last one of an epoch) gives a rank with nothing left one of its examples again.
    """
    rank, world = rank_and_world()
    if world == 1:
        return batches
    return [batch[rank::world] or [batch[rank % len(batch)]] for batch in batches if batch]


def gather_metrics(values: dict[str, float]) -> dict[str, float]:
    """Every rank calls this with its own metrics; every rank gets the combination."""
    dist = _group()
    if dist is None:
        return values
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    return combine_ranks(gathered)


def from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a collective: every rank must call it at the same point)."""
    dist = _group()
    if dist is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
