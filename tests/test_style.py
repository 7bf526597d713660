"""Style is part of the build: ruff and mypy must pass on the shipped code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("command", [
    [str(BIN / "ruff"), "check", "service", "workers", "tests", "bench"],
    [str(BIN / "mypy"), "service", "workers"],
], ids=["ruff", "mypy"])
def test_static_checks_pass(command: list[str]) -> None:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_the_heavy_first_order_names_only_test_files_that_exist() -> None:
    """A renamed or removed file left in ``HEAVY_FIRST`` would silently stop being scheduled first."""
    from tests.conftest import HEAVY_FIRST

    tests = Path(__file__).resolve().parent
    assert [name for name in HEAVY_FIRST if not (tests / name).is_file()] == []
    assert len(set(HEAVY_FIRST)) == len(HEAVY_FIRST)
