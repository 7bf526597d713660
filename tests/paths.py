"""Where the tests find the repository and the model cache. Kept apart from ``conftest.py`` (which
imports the service) so the GPU tests (``-m gpu --noconftest``) import on a machine without it."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL_CACHE = Path(os.environ.get("ALIGND_TEST_MODEL_CACHE", REPO / ".alignd" / "models")).resolve()
