"""The pure helpers of ``bench/dpo_vs_trl.py``, fast: the per-process peak memory reader against
children that allocate a known amount, the block order and the curve/gradient comparisons.

This module imports no torch at the top: the spawned children import it, and a small baseline keeps
freed import-time memory out of the comparison."""

from __future__ import annotations

import multiprocessing as mp
import resource
from typing import Any

import pytest

from bench.dpo_vs_trl import max_abs_diff, mirrored_order, relative_error, vm_hwm_bytes

MIB = 2**20


def _peak_after(n_bytes: int, queue: Any) -> None:
    buffer = b"\x01" * n_bytes  # written, so every page is resident
    queue.put((vm_hwm_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, len(buffer)))


def _spawned_peak(n_bytes: int) -> tuple[int, int]:
    """(VmHWM, ru_maxrss) in bytes of a spawned child that touched ``n_bytes``."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_peak_after, args=(n_bytes, queue))
    process.start()
    hwm, maxrss, size = queue.get(timeout=60)
    process.join(timeout=60)
    assert process.exitcode == 0 and size == n_bytes
    return hwm, maxrss


def test_vm_hwm_of_a_spawned_child_counts_what_it_touched_and_not_the_parents_peak() -> None:
    parent_buffer = b"\x02" * (300 * MIB)  # the parent's peak is now at least 300 MiB
    baseline, baseline_maxrss = _spawned_peak(0)
    allocating, _ = _spawned_peak(200 * MIB)
    assert len(parent_buffer) == 300 * MIB
    # 200 MiB more, give or take the ~0.1 MiB by which two interpreters' start-up peaks differ (measured
    # 199.91 to 200.11 MiB): the allocating child's peak is its RSS when it allocates plus the buffer
    assert 199 * MIB <= allocating - baseline < 210 * MIB
    # why not ru_maxrss: Linux carries the parent's peak across fork + exec, VmHWM starts afresh
    assert baseline_maxrss >= 300 * MIB > baseline


def test_vm_hwm_parses_proc_status_text() -> None:
    status = "Name:\tpython\nVmPeak:\t  900000 kB\nVmHWM:\t  123456 kB\nVmRSS:\t  100000 kB\n"
    assert vm_hwm_bytes(status) == 123456 * 1024
    assert vm_hwm_bytes() > 10 * MIB  # this process, read from /proc/self/status
    with pytest.raises(ValueError, match="no VmHWM"):
        vm_hwm_bytes("Name:\tpython\n")


def test_mirrored_order_cancels_a_linear_drift() -> None:
    assert mirrored_order(("trl", "alignd", "plain"), 2) == ["trl", "alignd", "plain", "plain", "alignd", "trl"]
    assert mirrored_order(("a", "b"), 3) == ["a", "b", "b", "a", "a", "b"]
    assert mirrored_order(("a", "b"), 0) == []
    # each arm's mean position is the same over two rounds: a drift of +1 per block adds equally
    order = mirrored_order(("trl", "alignd", "plain"), 2)
    means = {arm: sum(i for i, a in enumerate(order) if a == arm) / 2 for arm in set(order)}
    assert set(means.values()) == {2.5}


def test_max_abs_diff_refuses_curves_of_different_lengths() -> None:
    assert max_abs_diff([0.69, 0.68, 0.60], [0.69, 0.675, 0.61]) == pytest.approx(0.01)
    with pytest.raises(ValueError):
        max_abs_diff([0.69, 0.68], [0.69])
    with pytest.raises(ValueError):
        max_abs_diff([], [])


def test_relative_error_is_over_all_tensors_together() -> None:
    import torch  # here, not at the top: the spawned children import this module, and torch is ~200 MiB

    theirs = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[0.0], [4.0]])}  # |theirs| = 5
    ours = {"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([[0.0], [4.0]])}  # |diff| = 1
    assert relative_error(ours, theirs) == pytest.approx(0.2)
    assert relative_error(theirs, theirs) == 0.0
    with pytest.raises(ValueError, match="names differ"):
        relative_error({"a": theirs["a"]}, theirs)
    with pytest.raises(ValueError, match="zero"):
        relative_error(ours, {n: torch.zeros_like(t) for n, t in theirs.items()})
