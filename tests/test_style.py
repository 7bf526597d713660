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
