"""The alert rules and the Grafana dashboard against a real Prometheus (Debian's ``prometheus`` package).

* ``promtool check rules`` and ``promtool test rules`` run the unit tests in
  ``k8s/base/monitoring/tests/``: for every alert, series that fire it and series that do not (and
  the test fails when an alert has no such pair).
* A Prometheus server (free port, temporary storage, 1 s scrapes, the alert rules loaded) scrapes a
  live ``alignd serve`` — the API's ``/metrics`` and its worker's own port, with the API keeping only
  the service-wide series as in production — while real jobs run on tiny-random-llama: one that
  succeeds, a long one that is scraped while it trains and then cancelled, and a second that
  succeeds (so the duration histogram has an increase to take quantiles of). Then every PromQL
  expression of the dashboard runs through Prometheus's HTTP API over that time range, ``$job_id``
  set to the long job: each must parse and return data. The one exception is the CUDA panel, which
  has no sample without a GPU (and must have one with). The dashboard's ``job_id`` variable, every
  alert expression and every series name the alerts read are checked the same way.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import MODEL_CACHE, PREFERENCE_ROWS, jsonl
from tests.processes import alignd, free_port, stop, wait_http

REPO = Path(__file__).resolve().parent.parent
MONITORING = REPO / "k8s" / "base" / "monitoring"
DASHBOARD = MONITORING / "alignd-dashboard.json"
RULES = MONITORING / "prometheusrule.yaml"
RULE_TESTS = MONITORING / "tests"
PER_JOB = ("alignd_job_step", "alignd_job_loss", "alignd_job_kl", "alignd_job_reward", "alignd_job_reward_accuracy",
           "alignd_job_tokens_per_second", "alignd_job_gpu_memory_bytes", "alignd_job_host_memory_bytes",
           "alignd_job_completions_clipped_ratio", "alignd_job_reward_zero_std_ratio",
           "alignd_job_likelihood_displacement", "alignd_job_logps_drift", "alignd_job_margin_growth")
CUDA_ONLY = {"alignd_job_gpu_memory_bytes"}  # peak CUDA memory: no sample on a CPU worker
#: series only a reinforcement job has: their panels are shown with ``$job_id`` = the reinforcement job
RFT_ONLY = {"alignd_job_completions_clipped_ratio", "alignd_job_reward_zero_std_ratio"}
RFT_GRADER = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
              "reference": "{{item.answer}}", "operation": "eq"}


def binary(name: str) -> str:
    """Debian's prometheus package (.ci/run installs it): required in CI, a visible skip elsewhere."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: apt-get install prometheus")
        pytest.skip(f"{name} is missing (apt-get install prometheus)")
    return path


def rule_groups() -> dict[str, Any]:
    return yaml.safe_load(RULES.read_text())["spec"]  # type: ignore[no-any-return]


def alert_names() -> set[str]:
    return {r["alert"] for g in rule_groups()["groups"] for r in g["rules"] if "alert" in r}


def write_rules(directory: Path) -> Path:
    path = directory / "alignd.rules.yaml"
    path.write_text(yaml.safe_dump(rule_groups()))
    return path


# ---------------------------------------------------------------------------------- promtool


def test_promtool_checks_the_rules_and_runs_a_unit_test_for_every_alert(tmp_path: Path) -> None:
    promtool = binary("promtool")
    write_rules(tmp_path)
    checked = subprocess.run([promtool, "check", "rules", str(tmp_path / "alignd.rules.yaml")],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in checked.stdout
    tests = sorted(RULE_TESTS.glob("*.yaml"))
    assert tests
    fires: set[str] = set()
    quiet: set[str] = set()
    for test_file in tests:
        doc = yaml.safe_load(test_file.read_text())
        assert doc["rule_files"] == ["alignd.rules.yaml"], test_file
        for case in doc["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
        shutil.copy(test_file, tmp_path / test_file.name)
    assert alert_names() - fires == set(), "alerts with no test that fires them"
    assert alert_names() - quiet == set(), "alerts with no test where they stay quiet"
    ran = subprocess.run([promtool, "test", "rules", *(str(tmp_path / t.name) for t in tests)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "SUCCESS" in ran.stdout


def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    """The same tests against a KL alert with a lower bound: the quiet PPO job at 15 now fires."""
    promtool = binary("promtool")
    spec = rule_groups()
    for group in spec["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "AligndKLExploding":
                rule["expr"] = rule["expr"].replace("> 20", "> 10")
    (tmp_path / "alignd.rules.yaml").write_text(yaml.safe_dump(spec))
    for test_file in RULE_TESTS.glob("*.yaml"):
        shutil.copy(test_file, tmp_path / test_file.name)
    ran = subprocess.run([promtool, "test", "rules", *(t.name for t in RULE_TESTS.glob("*.yaml"))],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert ran.returncode != 0 and 'alertname="AligndKLExploding", job_id="ftjob-b"' in ran.stdout + ran.stderr


# ------------------------------------------------------------------------------ the dashboard


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel."""
    return [(panel.get("title", "?"), target["expr"]) for panel in dashboard()["panels"]
            for target in panel.get("targets", []) if target.get("expr")]


def test_the_dashboard_shows_every_per_job_series_and_the_service_panels() -> None:
    names = {n for _, expr in panel_queries() for n in re.findall(r"\balignd_[a-z_]+\b", expr)}
    assert set(PER_JOB) <= names
    assert {"alignd_queue_depth", "alignd_queue_jobs", "alignd_jobs", "alignd_job_duration_seconds_bucket",
            "alignd_http_request_duration_seconds_bucket", "alignd_http_requests_total"} <= names
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["job_id"]["query"]["query"] == "label_values(alignd_job_step, job_id)"


@dataclass
class Live:
    prometheus: str
    start: float
    end: float
    long_job: str
    jobs: list[str]
    log: Path
    rft_job: str = ""

    def query_range(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.prometheus}/api/v1/query_range", timeout=30,
                      params={"query": expr, "start": self.start, "end": self.end, "step": "1s"})
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]  # type: ignore[no-any-return]

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=30)
        body = r.json()
        assert body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]  # type: ignore[no-any-return]


def _finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(v)) for series in result for _, v in series.get("values", []))


def _wait(predicate: Any, what: str, timeout: float, log: Path) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"{what} within {timeout}s\n{log.read_text(errors='replace')[-4000:]}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    prometheus_bin = binary("prometheus")
    root = tmp_path_factory.mktemp("prometheus")
    api_port, worker_port, prom_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")}
    env |= {"ALIGND_DATA_DIR": str(root / "data"), "ALIGND_MODEL_CACHE": str(MODEL_CACHE),
            "ALIGND_WORKER_METRICS_PORT": str(worker_port), "ALIGND_API_JOB_METRICS": "false"}
    key = alignd("keys", "create", "--org", "acme", env=env).strip()
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
        "rule_files": [str(write_rules(root))],
        "scrape_configs": [
            {"job_name": "alignd-api", "static_configs": [{"targets": [f"127.0.0.1:{api_port}"]}]},
            {"job_name": "alignd-workers", "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"]}]},
        ],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    serve_log, prom_log = root / "serve.log", root / "prometheus.log"
    with serve_log.open("wb") as serve_out, prom_log.open("wb") as prom_out:
        serve = subprocess.Popen([str(Path(sys.executable).parent / "alignd"), "serve", "--port", str(api_port)],
                                 env=env, stdout=serve_out, stderr=subprocess.STDOUT, start_new_session=True)
        prom = subprocess.Popen([prometheus_bin, f"--config.file={root / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={root / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}",
                                 "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                                stdout=prom_out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            base, prom_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{prom_port}"
            wait_http(f"{base}/healthz")
            wait_http(f"{prom_url}/-/ready")
            start = time.time()
            http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
            f = http.post("/v1/files", files={"file": ("p.jsonl", jsonl(PREFERENCE_ROWS * 8))},
                          data={"purpose": "fine-tune"}).json()

            def create(hp: dict[str, Any]) -> str:
                r = http.post("/v1/fine_tuning/jobs", json={
                    "model": "tiny-random-llama", "training_file": f["id"],
                    "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 2, "beta": 0.5, **hp}}}})
                assert r.status_code == 200, r.text
                return str(r.json()["id"])

            def status(job_id: str) -> str:
                return str(http.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"])

            def live_view() -> Live:
                return Live(prom_url, start, time.time(), "", [], serve_log)

            first = create({"max_steps": 2})
            _wait(lambda: status(first) == "succeeded", f"{first} succeeds", 300, serve_log)
            long_job = create({"n_epochs": 50, "learning_rate": 1e-3})
            _wait(lambda: http.get(f"/v1/fine_tuning/jobs/{long_job}").json()["progress"]["step"] >= 3,
                  f"{long_job} reaches step 3", 300, serve_log)
            # several scrapes of the running job's series from the worker's port
            _wait(lambda: bool(live_view().query(f'count_over_time(alignd_job_step{{job_id="{long_job}"}}[1m]) >= 4')),
                  "Prometheus scrapes the running job", 60, serve_log)
            _wait(lambda: bool(live_view().query(f'max_over_time(alignd_job_step{{job_id="{long_job}"}}[1m]) >= 3')),
                  "Prometheus sees the running job at step 3", 120, serve_log)
            assert http.post(f"/v1/fine_tuning/jobs/{long_job}/cancel").status_code == 200
            _wait(lambda: status(long_job) == "cancelled", f"{long_job} is cancelled", 60, serve_log)
            second = create({"max_steps": 2})
            _wait(lambda: status(second) == "succeeded", f"{second} succeeds", 300, serve_log)
            # a reinforcement job whose completions are all cut at one token: scraped while it runs
            rft_file = http.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("rft.jsonl", jsonl(
                [{"messages": [{"role": "user", "content": f"{a}+1?"}], "answer": str(a + 1)} for a in range(8)]))}
                ).json()
            r = http.post("/v1/fine_tuning/jobs", json={
                "model": "tiny-random-llama", "training_file": rft_file["id"],
                "method": {"type": "reinforcement", "reinforcement": {"grader": RFT_GRADER, "hyperparameters": {
                    "batch_size": 2, "group_size": 2, "max_new_tokens": 1, "n_epochs": 200}}}})
            assert r.status_code == 200, r.text
            rft_job = str(r.json()["id"])
            _wait(lambda: bool(live_view().query(
                f'count_over_time(alignd_job_completions_clipped_ratio{{job_id="{rft_job}"}}[1m]) >= 3')),
                "Prometheus scrapes the reinforcement job", 300, serve_log)
            assert http.post(f"/v1/fine_tuning/jobs/{rft_job}/cancel").status_code == 200
            _wait(lambda: status(rft_job) == "cancelled", f"{rft_job} is cancelled", 60, serve_log)
            _wait(lambda: bool(live_view().query(
                'alignd_job_duration_seconds_count{method="dpo",status="succeeded"} == 2')),
                "Prometheus sees both finished jobs", 30, serve_log)
            time.sleep(2)  # a couple more scrapes after the last change
            yield Live(prom_url, start, time.time(), long_job, [first, long_job, second, rft_job], serve_log, rft_job)
        finally:
            stop(prom)
            stop(serve, timeout=20)


def test_prometheus_scrapes_the_api_and_the_worker(live: Live) -> None:
    targets = httpx.get(f"{live.prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    assert {t["labels"]["job"]: t["health"] for t in targets} == {"alignd-api": "up", "alignd-workers": "up"}
    # the per-job series came from the worker's port, not the API (ALIGND_API_JOB_METRICS=false)
    by_target = live.query_range(f'group by (job) (alignd_job_loss{{job_id="{live.long_job}"}})')
    assert [s["metric"]["job"] for s in by_target] == ["alignd-workers"]


def _substitute(expr: str, live: Live) -> str:
    job = live.rft_job if set(re.findall(r"\balignd_[a-z_]+\b", expr)) & RFT_ONLY else live.long_job
    variables = {"$job_id": job, "${job_id}": job}  # ids are [a-z0-9-]: no regex escapes
    for name, value in variables.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unsubstituted template variable in {expr}"
    return expr


def test_every_dashboard_query_returns_data(live: Live) -> None:
    import torch

    empty, failures = [], []
    for title, expr in panel_queries():
        result = live.query_range(_substitute(expr, live))
        names = set(re.findall(r"\balignd_[a-z_]+\b", expr))
        if names & CUDA_ONLY and not torch.cuda.is_available():
            assert result == [], f"{title}: CUDA series on a CPU worker?"
            empty.append(title)
            continue
        if not _finite(result):
            failures.append(f"{title}: {expr} -> {result[:2]}")
    assert failures == [], "dashboard queries without data:\n" + "\n".join(failures)
    assert len(empty) <= 1  # only the GPU memory panel may be empty, and only without CUDA
    # and the per-job panels really show the long job
    steps = live.query_range(_substitute('max by (job_id, method) (alignd_job_step{job_id=~"$job_id"})', live))
    assert [s["metric"] for s in steps] == [{"job_id": live.long_job, "method": "dpo"}]
    assert max(float(v) for _, v in steps[0]["values"]) >= 3


def test_the_job_variable_lists_the_jobs_that_were_scraped_while_running(live: Live) -> None:
    """The long DPO job and the reinforcement job were seen by several scrapes; the 2-step jobs may
    start and end between two 1 s scrapes on a busy machine, so they are not required here."""
    r = httpx.get(f"{live.prometheus}/api/v1/label/job_id/values", timeout=10,
                  params={"match[]": "alignd_job_step", "start": live.start, "end": live.end})
    listed = set(r.json()["data"])
    assert {live.long_job, live.rft_job} <= listed
    assert listed <= set(live.jobs)  # and nothing that did not run here


def test_every_alert_evaluates_and_reads_series_alignd_exports(live: Live) -> None:
    rules = httpx.get(f"{live.prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    evaluated = {r["name"]: r for g in rules for r in g["rules"]}
    assert alert_names() <= evaluated.keys()
    for name in alert_names():
        assert evaluated[name]["health"] == "ok", evaluated[name]
    for group in rule_groups()["groups"]:
        for rule in group["rules"]:
            live.query_range(rule["expr"])  # parses and evaluates over the run
            for series in set(re.findall(r"\balignd_[a-z_]+\b", rule["expr"])):
                assert live.query_range(f"count({series})"), f"{rule['alert']} reads {series}, which was never scraped"
