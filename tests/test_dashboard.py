"""The web dashboard at ``/ui`` in headless Chromium against a live ``alignd serve``.

Logs in with a pasted key, downloads a finished job's adapter with the button, watches a running
DPO job's loss curve gain points, takes a screenshot (``.alignd/screenshots/``), cancels the job.
"""

from __future__ import annotations

import json
import os
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from service.client import Client
from tests.browser import CHROMIUM, Chromium
from tests.conftest import PREFERENCE_ROWS, REPO
from tests.processes import wait_for_job
from tests.served import embedded_server


def require_chromium() -> None:
    """Skips on a developer's machine without Chromium; fails in CI (``CI`` set), where a skip would hide it."""
    if CHROMIUM.exists():
        return
    reason = f"{CHROMIUM} is missing (Debian: apt-get install -y chromium)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the dashboard test")
    pytest.skip(reason)

STATUS = "document.querySelector('#job-status [data-status]').dataset.status"
LOSS_POINTS = "+document.querySelector('#chart-loss').dataset.points"

SCREENSHOTS = REPO / ".alignd" / "screenshots"


def dpo(file_id: str, max_steps: int, every: int) -> dict[str, object]:
    return {"model": "tiny-random-llama", "training_file": file_id, "seed": 1, "suffix": "ui",
            "method": {"type": "dpo", "dpo": {"hyperparameters": {
                "batch_size": 4, "n_epochs": 1000, "max_steps": max_steps, "checkpoint_every_steps": every,
                "learning_rate": 1e-3}}}}


def points(browser: Chromium, chart: str) -> int:
    return int(browser.js(f"+document.querySelector('#chart-{chart}')?.dataset.points || 0"))


def test_dashboard_login_live_curves_download_cancel(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    require_chromium()
    with embedded_server(tmp_path) as served:
        page = httpx.get(f"{served.base_url}/ui", timeout=10)  # the page itself needs no key
        assert page.status_code == 200 and "<title>alignd</title>" in page.text
        client = Client(served.base_url, served.key)
        f = client.upload_rows(PREFERENCE_ROWS, "prefs.jsonl")
        done = client.create_job(dpo(f["id"], 4, 2))
        done = wait_for_job(client.http.get, done["id"], timeout=300)
        assert done["status"] == "succeeded", served.log_tail()
        running = client.create_job(dpo(f["id"], 100000, 25))

        with Chromium() as browser:
            downloads = tmp_path / "downloads"
            downloads.mkdir()
            browser.send("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
            browser.goto(f"{served.base_url}/ui")
            browser.wait_for("!!document.querySelector('#api-key')")
            browser.js("document.querySelector('#api-key').value = 'sk-alignd-wrong'; "
                       "document.querySelector('#login').click(); true")
            assert "refused" in browser.wait_for("document.querySelector('#login-error').textContent")
            browser.js(f"document.querySelector('#api-key').value = {json.dumps(served.key)}; "
                       "document.querySelector('#login').click(); true")

            # jobs list, with both jobs and their status
            browser.wait_for(f"!!document.querySelector('tr[data-job=\"{running['id']}\"]')")
            assert browser.js(f"document.querySelector('tr[data-job=\"{done['id']}\"] [data-status]')"
                              ".dataset.status") == "succeeded"

            # the finished job: curves, checkpoints, and the adapter through the download button
            browser.js(f"document.querySelector('a[href=\"#/jobs/{done['id']}\"]').click(); true")
            browser.wait_for("document.querySelectorAll('#checkpoints-body button').length === 2")
            assert points(browser, "loss") == 4 and points(browser, "reward") >= 4
            browser.wait_for("!document.querySelector('#download-adapter').disabled")
            browser.js("document.querySelector('#download-adapter').click(); true")
            size = int(browser.wait_for("document.querySelector('#download-adapter').dataset.bytes",
                                        timeout=30))
            archive = downloads / f"{done['id']}-adapter.tar.gz"
            deadline = time.time() + 20
            while not (archive.exists() and archive.stat().st_size == size) and time.time() < deadline:
                time.sleep(0.2)
            with tarfile.open(archive) as tar:
                names = {Path(n).name for n in tar.getnames()}
            assert {"adapter_config.json", "adapter_model.safetensors"} <= names

            # the running job: the loss curve gains points while we watch
            browser.js("location.hash = '#/'; true")
            browser.wait_for(f"!!document.querySelector('a[href=\"#/jobs/{running['id']}\"]')")
            browser.js(f"document.querySelector('a[href=\"#/jobs/{running['id']}\"]').click(); true")
            browser.wait_for(f"{LOSS_POINTS} >= 2", timeout=240)
            first = points(browser, "loss")
            second = int(browser.wait_for(f"{LOSS_POINTS} > {first} && {LOSS_POINTS}", timeout=60))
            assert second > first
            assert browser.js(STATUS) == "running"
            assert browser.js("document.querySelectorAll('#events-body tr').length") >= 3
            assert browser.js("document.querySelector('#chart-loss polyline').dataset.series") == "loss"
            browser.wait_for("document.querySelectorAll('#chart-reward polyline').length >= 1")
            shot = browser.screenshot(SCREENSHOTS / f"dashboard-{running['id']}.png")
            with capsys.disabled():
                print(f"\ndashboard screenshot: {shot} (loss curve {first} -> {second} points)")

            # cancel from the page
            browser.js("document.querySelector('#cancel').click(); true")
            browser.wait_for(f"{STATUS} === 'cancelled'")
        assert client.job(running["id"])["status"] == "cancelled"
