"""The API image stays small: importing ``service.app`` (and building the app) loads no training stack.

Checked at run time in a fresh interpreter, so an import hidden behind a function, a plugin or a
transitive dependency counts as much as one at the top of a module."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN = ("torch", "transformers", "peft", "accelerate", "workers")

PROBE = """
import json, sys, tempfile
import service.app
from service.app import create_app
from service.settings import Settings
with tempfile.TemporaryDirectory() as tmp:
    create_app(Settings.from_env(tmp), migrate=True)
roots = {name.split(".")[0] for name in sys.modules}
print(json.dumps(sorted(roots & set(sys.argv[1:]))))
"""


def test_importing_the_api_loads_no_torch_transformers_peft_or_workers(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", PROBE, *FORBIDDEN], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_the_probe_would_see_a_forbidden_import(tmp_path: Path) -> None:
    """The same probe, with the worker's task module imported too, does see ``workers``."""
    probe = PROBE.replace("import service.app", "import service.app, workers.tasks")
    result = subprocess.run([sys.executable, "-c", probe, *FORBIDDEN], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "workers" in json.loads(result.stdout.strip().splitlines()[-1])
