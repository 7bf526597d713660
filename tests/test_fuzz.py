"""Schemathesis against the generated OpenAPI document on a live ``alignd api``: no 5xx, and every
response (status, content type, body) conforms to the spec. Bounded: a fixed seed and example count."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import MODEL_CACHE, PREFERENCE_ROWS, jsonl
from tests.processes import alignd, free_port, stop, wait_http

SPEC = Path(__file__).resolve().parent.parent / "openapi" / "openapi.json"
MAX_EXAMPLES = int(os.environ.get("ALIGND_FUZZ_EXAMPLES", "12"))  # the coverage phase adds ~8000 cases


def test_schemathesis_finds_no_server_errors(tmp_path: Path) -> None:
    import httpx

    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")}
    env |= {"ALIGND_DATA_DIR": str(tmp_path / "data"), "ALIGND_MODEL_CACHE": str(MODEL_CACHE),
            "ALIGND_JOB_CREATES_PER_MINUTE": "100000"}
    key = alignd("keys", "create", "--org", "fuzz", env=env).strip()
    port = free_port()
    log = (tmp_path / "api.log").open("wb")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "alignd"), "api", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz")
        # some real objects, so that not every generated id is a 404
        httpx.post(f"{base}/v1/files", headers={"Authorization": f"Bearer {key}"},
                   files={"file": ("p.jsonl", jsonl(PREFERENCE_ROWS))}, data={"purpose": "fine-tune"})
        report = tmp_path / "report.json"
        result = subprocess.run(
            [str(Path(sys.executable).parent / "st"), "run", str(SPEC), "-u", base,
             "-H", f"Authorization: Bearer {key}", "-n", str(MAX_EXAMPLES), "--seed", "7", "--workers", "1",
             "--phases", "examples,coverage,fuzzing",
             "-c", "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance",
             "--report", "json", "--report-json-path", str(report)],
            capture_output=True, text=True, timeout=600, env=env,
            cwd=tmp_path,  # schemathesis keeps its cache in ./.schemathesis: never in the work tree
        )
        out = result.stdout + result.stderr
        summary = re.search(r"(\d+) generated, (\d+) passed", out)
        print(out[-3000:])
        assert result.returncode == 0, out[-6000:]
        assert summary and summary.group(1) == summary.group(2) and int(summary.group(1)) > 100
        log.flush()
        assert b"Traceback" not in (tmp_path / "api.log").read_bytes()
        if report.exists():
            json.loads(report.read_text())  # the machine-readable report is well-formed
    finally:
        stop(proc)
        log.close()
