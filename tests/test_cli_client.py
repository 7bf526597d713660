"""``alignd files …`` / ``alignd jobs …`` against a live ``alignd serve`` (real HTTP, real worker)."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from service.console import Output
from tests.conftest import PREFERENCE_ROWS, jsonl
from tests.served import Served, embedded_server

ALIGND = str(Path(sys.executable).parent / "alignd")
FAST_DPO = ["--model", "tiny-random-llama", "--method", "dpo", "--seed", "3", "--suffix", "cli",
            "-H", "batch_size=4", "-H", "max_steps=4", "-H", "checkpoint_every_steps=2",
            "-H", "learning_rate=1e-3",
            "--lora-r", "8", "--lora-alpha", "16"]


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with embedded_server(tmp_path_factory.mktemp("cli")) as s:
        yield s


def cli(served: Served, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([ALIGND, *args], env=served.env, capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_upload_create_follow_download(served: Served, tmp_path: Path) -> None:
    data = tmp_path / "prefs.jsonl"
    data.write_bytes(jsonl(PREFERENCE_ROWS))
    up = cli(served, "files", "upload", str(data))
    assert up.returncode == 0, up.stderr
    file_id = up.stdout.split()[0]
    assert file_id.startswith("file-") and "processed" in up.stdout and "16 examples" in up.stdout
    assert "recommended method: dpo" in up.stdout and "chosen longer in 0% of pairs" in up.stdout
    assert "length bias" in up.stdout
    listed = cli(served, "files", "list")
    assert listed.returncode == 0 and file_id in listed.stdout

    created = cli(served, "jobs", "create", "--training-file", file_id, *FAST_DPO)
    assert created.returncode == 0, created.stderr
    job_id = created.stdout.split()[0]
    assert job_id.startswith("ftjob-")
    shown = json.loads(cli(served, "jobs", "show", job_id, "--json").stdout)
    assert shown["training_type"]["r"] == 8 and shown["hyperparameters"]["max_steps"] == 4
    assert shown["hyperparameters"]["learning_rate"] == 1e-3 and shown["suffix"] == "cli"

    started = time.time()
    follow = cli(served, "jobs", "follow", job_id, "--poll", "0.3")
    print(f"follow took {time.time() - started:.1f}s\n{follow.stdout}")
    assert follow.returncode == 0, follow.stdout + follow.stderr + served.log_tail()
    out = follow.stdout
    assert "[########################]  4/4  100%" in out  # not a TTY: one line per change, no \r redraws
    assert "\r" not in out and "loss " in out and "margin " in out
    assert "· Job queued" in out and "The job has successfully completed" in out
    assert out.rstrip().endswith(f"job {job_id} succeeded: ft:tiny-random-llama:acme:cli:{job_id}")
    assert "\x1b" not in out  # no ANSI codes in a pipe
    curves = [line for line in out.splitlines() if line.startswith(("loss ", "margin "))]
    assert len(curves) == 2 and all(re.fullmatch(r"\S+ +[▁▂▃▄▅▆▇█]{4}  -?\d+\.\d{4} → -?\d+\.\d{4} over 4 steps", c)
                                    for c in curves), curves
    in_terminal, status = _in_a_pty([ALIGND, "jobs", "follow", job_id], served.env)
    assert status == 0, in_terminal
    assert "\x1b[" in in_terminal and "[####" not in in_terminal  # rich's bar, not the plain one
    text = ANSI.sub("", in_terminal)
    assert "━" * 24 + " 4/4  100%" in text and "The job has successfully completed" in text
    assert text.rstrip().endswith(f"job {job_id} succeeded: ft:tiny-random-llama:acme:cli:{job_id}")

    listed = cli(served, "jobs", "list")
    assert job_id in listed.stdout and "succeeded" in listed.stdout
    target = tmp_path / "adapter"
    down = cli(served, "jobs", "download", job_id, "-o", str(target))
    assert down.returncode == 0, down.stderr
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in target.iterdir()}
    ckpt = cli(served, "jobs", "download", job_id, "--checkpoint", "2", "-o", str(tmp_path / "step2"))
    assert ckpt.returncode == 0, ckpt.stderr
    assert (tmp_path / "step2" / "adapter_config.json").exists()


def _in_a_pty(command: list[str], env: dict[str, str], timeout: float = 120) -> tuple[str, int]:
    """Run ``command`` with a pseudo-terminal as its stdin, stdout and stderr; its output and exit status."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(command, env={**env, "TERM": "xterm-256color", "COLUMNS": "120"},
                            stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return b"".join(chunks).decode(errors="replace"), proc.wait(timeout=30)


def test_failed_job_exits_1(served: Served, tmp_path: Path) -> None:
    # Every prompt is longer than max_length, so no assistant token survives truncation: the worker fails it.
    rows = [{"messages": [{"role": "user", "content": "please " * 60 + str(i)},
                          {"role": "assistant", "content": "ok"}]} for i in range(4)]
    data = tmp_path / "long.jsonl"
    data.write_bytes(jsonl(rows))
    created = cli(served, "jobs", "create", "--model", "tiny-random-llama", "--method", "supervised",
                  "--training-file", str(data), "-H", "max_length=16", "-H", "batch_size=2")
    assert created.returncode == 0, created.stderr
    assert "uploaded" in created.stderr  # a local path is uploaded first
    job_id = created.stdout.split()[0]
    follow = cli(served, "jobs", "follow", job_id, "--poll", "0.3")
    assert follow.returncode == 1, follow.stdout + follow.stderr
    assert f"job {job_id} failed: invalid_training_file" in follow.stdout
    assert "[error] Job failed" in follow.stdout


def test_pause_resume_cancel_exits_2(served: Served, tmp_path: Path) -> None:
    data = tmp_path / "prefs.jsonl"
    data.write_bytes(jsonl(PREFERENCE_ROWS))
    file_id = cli(served, "files", "upload", str(data)).stdout.split()[0]
    body = tmp_path / "job.json"
    body.write_text(json.dumps({"model": "tiny-random-llama", "training_file": file_id,
                                "method": {"type": "dpo", "dpo": {"hyperparameters": {
                                    "batch_size": 4, "n_epochs": 1000, "checkpoint_every_steps": 5}}}}))
    created = cli(served, "jobs", "create", "--json", str(body), "-H", "beta=0.2", "--print-json")
    assert created.returncode == 0, created.stderr
    job = json.loads(created.stdout)
    assert job["hyperparameters"]["beta"] == 0.2 and job["hyperparameters"]["n_epochs"] == 1000
    job_id = job["id"]
    paused = cli(served, "jobs", "pause", job_id)
    assert paused.returncode == 0, paused.stderr
    deadline = time.time() + 120
    while json.loads(cli(served, "jobs", "show", job_id, "--json").stdout)["status"] != "paused":
        assert time.time() < deadline, served.log_tail()
        time.sleep(0.5)
    resumed = cli(served, "jobs", "resume", job_id)
    assert resumed.returncode == 0 and resumed.stdout.split()[1] in ("queued", "running"), resumed.stderr
    assert cli(served, "jobs", "cancel", job_id).stdout.split()[1] == "cancelled"
    follow = cli(served, "jobs", "follow", job_id)
    assert follow.returncode == 2, follow.stdout + follow.stderr
    assert follow.stdout.rstrip().endswith(f"job {job_id} cancelled")
    again = cli(served, "jobs", "cancel", job_id)
    assert again.returncode == 1 and again.stderr.startswith("error: ") and "(param: id)" in again.stderr


def test_errors_are_one_line(served: Served, tmp_path: Path) -> None:
    bad = cli(served, "jobs", "create", "--training-file", "file-nope", *FAST_DPO, "-H", "beta=-1")
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.startswith("error: ") and "(param: method.dpo.hyperparameters.beta)" in bad.stderr
    missing = cli(served, "jobs", "show", "ftjob-missing")
    assert missing.returncode == 1 and missing.stderr.strip() == "error: No such job: 'ftjob-missing'"
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "hi", "chosen": "a"}\n')
    up = cli(served, "files", "upload", str(broken))
    assert up.returncode == 1 and "error" in up.stdout and "line 1: rejected: missing field" in up.stdout
    no_key = subprocess.run([ALIGND, "jobs", "list"], env={**served.env, "ALIGND_API_KEY": ""},
                            capture_output=True, text=True, timeout=60)
    assert no_key.returncode == 1 and no_key.stderr.startswith("error: no API key")
    wrong_key = cli(served, "jobs", "list", "--api-key", "sk-alignd-wrong")
    assert wrong_key.returncode == 1 and wrong_key.stderr.startswith("error: Missing or invalid API key")
    usage = cli(served, "jobs", "create", "--model", "tiny-random-llama", "--training-file", "file-x",
                "--method", "dpo", "-H", "beta")
    assert usage.returncode == 1 and usage.stderr.strip() == "error: -H expects key=value, got 'beta'"


def _terminal(width: int = 120) -> tuple[io.StringIO, Output]:
    buffer = io.StringIO()
    return buffer, Output(console=Console(file=buffer, force_terminal=True, width=width, color_system="standard"))


def test_progress_redraws_a_rich_bar_in_a_terminal() -> None:
    buffer, output = _terminal()
    progress = output.job_progress()
    job = {"status": "running", "progress": {"step": 1, "total_steps": 4},
           "estimated_finish": time.time() + 65}
    progress.observe({"type": "metrics", "data": {"step": 1, "loss": 0.6931, "objective/kl": 0.01}})
    progress.draw(job)
    progress.message("12:00:00 · Checkpoint saved at step 1")
    progress.draw({**job, "progress": {"step": 2, "total_steps": 4}})
    progress.finish()
    raw = buffer.getvalue()
    assert "\x1b[" in raw and "\r" in raw  # styled and redrawn in place
    text = ANSI.sub("", raw)
    # 24 cells: 1/4 → 6 filled, then the half-cell edge; 2/4 → 12 filled
    assert "━" * 6 + "╺" + "━" * 17 + " 1/4   25%  ETA 1m0" in text
    assert "loss 0.6931  kl 0.0100  running" in text
    assert text.count("12:00:00 · Checkpoint saved at step 1\n") == 1
    after_message = text.split("Checkpoint saved at step 1\n", 1)[1]
    assert "━" * 12 + "╺" + "━" * 11 + " 2/4   50%" in after_message  # the bar stays below the events
    assert "[#" not in text  # not the plain rendering


def test_progress_is_plain_lines_without_a_terminal() -> None:
    out = io.StringIO()
    output = Output(out)  # a StringIO is no terminal
    assert not output.terminal
    progress = output.job_progress()
    job = {"status": "running", "progress": {"step": 1, "total_steps": 4}}
    progress.observe({"type": "metrics", "data": {"step": 1, "loss": 0.6931, "rewards/margins": 0.0}})
    progress.draw(job)
    progress.draw(job)  # unchanged: no second line
    progress.message("12:00:00 · Checkpoint saved at step 1")
    progress.observe({"type": "metrics", "data": {"step": 2, "loss": 0.25, "rewards/margins": 0.5}})
    progress.draw({**job, "progress": {"step": 2, "total_steps": 4}})
    progress.finish()
    output.table([["ftjob-1", "succeeded"], ["ftjob-22", "running"]], ["ID", "STATUS"])
    lines = out.getvalue().splitlines()
    assert lines[:3] == ["[######..................]  1/4   25%  loss 0.6931  margin 0.0000  running",
                         "12:00:00 · Checkpoint saved at step 1",
                         "[############............]  2/4   50%  loss 0.2500  margin 0.5000  running"]
    assert lines[3:] == ["ID        STATUS", "ftjob-1   succeeded", "ftjob-22  running"]
    assert progress.curves() == ["loss    █▁  0.6931 → 0.2500 over 2 steps",
                                 "margin  ▁█  0.0000 → 0.5000 over 2 steps"]
    assert "\x1b" not in out.getvalue()


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_that_cannot_redraw_gets_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm-256color")
    assert Output(_FakeTerminal()).terminal
    monkeypatch.setenv("TERM", "dumb")  # an Emacs shell: a tty that cannot move the cursor
    out = _FakeTerminal()
    output = Output(out)
    assert not output.terminal
    output.job_progress().draw({"status": "queued", "progress": {"step": 0, "total_steps": None}})
    assert out.getvalue() == "[........................]  0/?  queued\n"


def test_a_table_is_rich_in_a_terminal_and_aligned_columns_otherwise() -> None:
    rows = [["ftjob-" + "a" * 30, "succeeded", "SmolLM2-135M-Instruct"], ["ftjob-b", "running", "tiny-random-llama"]]
    buffer, output = _terminal(width=100)
    output.table(rows, ["ID", "STATUS", "MODEL"])
    raw = buffer.getvalue()
    assert "\x1b[1m" in raw  # a bold header
    lines = [line.split() for line in ANSI.sub("", raw).splitlines() if line.strip()]
    assert lines[0] == ["ID", "STATUS", "MODEL"] and set(lines[1][0]) == {"─"} and lines[2:] == rows
    plain = io.StringIO()
    Output(plain, terminal=False).table(rows, ["ID", "STATUS", "MODEL"])
    assert plain.getvalue().splitlines() == [
        "ID" + " " * 36 + "STATUS     MODEL",
        "ftjob-" + "a" * 30 + "  succeeded  SmolLM2-135M-Instruct",
        "ftjob-b" + " " * 31 + "running    tiny-random-llama"]


def test_follow_shows_a_reinforcement_jobs_reward_and_eval_reward() -> None:
    out = io.StringIO()
    progress = Output(out, terminal=False).job_progress()
    job = {"status": "running", "progress": {"step": 3, "total_steps": 8}}
    progress.observe({"type": "metrics", "data": {"step": 3, "loss": 0.01, "reward": 0.375}})
    progress.draw(job)
    progress.observe({"type": "metrics", "data": {"step": 4, "eval/reward": 0.5}})
    progress.draw({**job, "progress": {"step": 4, "total_steps": 8}})
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("loss 0.0100  reward 0.3750  running")
    assert lines[1].endswith("loss 0.0100  reward 0.3750  eval reward 0.5000  running")
