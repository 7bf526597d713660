"""``alignd serve`` as a subprocess on a free port, for tests that need a real HTTP server (CLI, browser)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import MODEL_CACHE
from tests.processes import alignd, free_port, stop, wait_http


@dataclass
class Served:
    base_url: str
    key: str
    env: dict[str, str]  # the server's environment, plus ALIGND_BASE_URL and ALIGND_API_KEY for clients
    log: Path

    def log_tail(self, n: int = 5000) -> str:
        return self.log.read_text(errors="replace")[-n:]


@contextmanager
def embedded_server(root: Path, org: str = "acme", extra_env: dict[str, str] | None = None) -> Iterator[Served]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")}
    env |= {"ALIGND_DATA_DIR": str(root / "data"), "ALIGND_MODEL_CACHE": str(MODEL_CACHE), **(extra_env or {})}
    key = alignd("keys", "create", "--org", org, env=env).strip()
    port = free_port()
    log = root / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "alignd"), "serve", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(f"{base}/healthz")
            yield Served(base, key, {**env, "ALIGND_BASE_URL": base, "ALIGND_API_KEY": key}, log)
        finally:
            stop(proc)
