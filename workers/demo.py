"""``alignd demo``: a real DPO job on SmolLM2-135M-Instruct through the real API, queue and worker.

It starts the embedded service (``alignd serve``) as a child process, uploads the built-in
concise-vs-verbose preference set, trains, follows progress, prints the loss curve, downloads the
adapter and compares a few generations before and after. Everything runs offline.

The job uses the DPO defaults (only ``max_length`` and checkpointing are set) and the retention probe
(``workers/demo_data.py``: facts the base answers right): the last 8 pairs are the validation file,
the probe the ``retention_file``, and the demo prints, beside each probe answer before and after,
whether the fact is still there, and the job's ``eval/retention`` at the end.

What it prints comes from :mod:`service.console` (rich in a terminal, plain lines in a pipe or a log),
the same progress bar and sparklines as ``alignd jobs follow``. The training stack's own output
(tqdm bars, warnings, library logging) and the embedded service's go to ``<data dir>/demo.log``; an
unexpected error is one line on the screen and its traceback in that log.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from service.auth import create_key
from service.client import Client
from service.console import Output, drop_library_stderr_handlers, event_line, quiet_libraries, sparkline
from service.db.engine import make_engine, make_session_factory, migrate, session_scope
from service.settings import Settings
from workers.demo_data import HELD_OUT_PROMPTS, RETENTION_FACTS, RETENTION_GRADER, preference_rows, retention_rows

log = logging.getLogger("alignd.demo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _api_key(settings: Settings) -> str:
    engine = make_engine(settings.database)
    migrate(engine)
    with session_scope(make_session_factory(engine)) as session:
        return create_key(session, "demo")[1]


#: the last pairs of the built-in set are the validation file (the probe runs at each evaluation)
VALIDATION_PAIRS = 8


def _generate(model_dir: Path, adapter_dir: Path | None, prompts: list[str], max_new_tokens: int = 48) -> list[str]:
    import torch
    from peft import PeftModel

    from workers.base_models import load_tokenizer
    from workers.modeling import load_causal_lm

    drop_library_stderr_handlers()  # transformers added its stderr handler on import: its records go to the log
    tokenizer: Any = load_tokenizer(model_dir)
    model: Any = load_causal_lm(model_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    outputs: list[str] = []
    for prompt in prompts:
        ids: Any = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        outputs.append(str(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)).strip())
    return outputs


def run(args: argparse.Namespace, out: Output, log_path: Path) -> int:
    started = time.time()
    settings = Settings.from_env()
    out.line(f"alignd demo — data dir {settings.data_dir}", style="bold")
    key = _api_key(settings)
    port = _free_port()
    env = {**os.environ, "ALIGND_DATA_DIR": str(settings.data_dir)}
    alignd = Path(sys.executable).parent / "alignd"
    serve_log = log_path.open("ab")
    server = subprocess.Popen([str(alignd), "serve", "--port", str(port)], env=env, start_new_session=True,
                              stdout=serve_log, stderr=subprocess.STDOUT)
    out.line(f"service on http://127.0.0.1:{port} (API + worker; log: {log_path})")
    try:
        client = Client(f"http://127.0.0.1:{port}", key)
        for _ in range(300):
            try:
                if client.http.get("/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        rows = preference_rows()
        training = client.upload_rows(rows[:-VALIDATION_PAIRS], "concise_vs_verbose.jsonl")
        validation = client.upload_rows(rows[-VALIDATION_PAIRS:], "concise_vs_verbose_validation.jsonl")
        probe = client.upload_rows(retention_rows(), "retention_probe.jsonl")
        out.line(f"uploaded {training['id']}: {training['examples']} {training['format']} pairs "
                 f"({training['status']}), {validation['examples']} validation pairs, "
                 f"{probe['examples']} retention-probe facts")
        job = client.create_job({
            "model": args.model, "training_file": training["id"], "validation_file": validation["id"],
            "suffix": "concise", "seed": 0,
            "method": {"type": "dpo", "dpo": {"hyperparameters": {  # the DPO defaults, plus the probe
                "max_length": 256, "checkpoint_every_steps": 10, **({"n_epochs": args.epochs} if args.epochs else {}),
                "retention_file": probe["id"], "retention_grader": RETENTION_GRADER}}},
        })
        out.line(f"created {job['id']} (status {job['status']}); the worker converts {args.model} once on first use")
        job = _follow(client, job["id"], out)
        if job["status"] != "succeeded":
            error = job.get("error") or {}
            out.line(f"job ended {job['status']}: {error.get('code')}: {error.get('message')} (log: {log_path})")
            return 1
        adapter_dir = settings.data_dir / "demo-adapter" / job["id"]
        client.download_adapter(job["id"], adapter_dir)
        _report_training(client, job, adapter_dir, out)
        base_dir = settings.model_cache_dir / args.model
        out.line("generating answers to held-out questions with the base model and with the adapter …")
        before = _generate(base_dir, None, HELD_OUT_PROMPTS)
        after = _generate(base_dir, adapter_dir, HELD_OUT_PROMPTS)
        _report_answers(HELD_OUT_PROMPTS, before, after, out)
        out.line("asking the retention probe's questions before and after …")
        questions = [q for q, _ in RETENTION_FACTS]
        before = _generate(base_dir, None, questions, max_new_tokens=32)
        after = _generate(base_dir, adapter_dir, questions, max_new_tokens=32)
        retention = [p["value"] for p in client.metrics(job["id"], "eval/retention")]
        _report_retention(before, after, retention[-1] if retention else None, out)
        out.line(f"demo finished in {time.time() - started:.0f} s", style="bold")
        return 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        serve_log.close()


def _follow(client: Client, job_id: str, out: Output) -> dict[str, Any]:
    """The live bar and the job's events until it ends (the same progress as ``alignd jobs follow``)."""
    progress = out.job_progress()
    job: dict[str, Any] = {"status": "queued"}
    try:
        for job, events in client.follow(job_id, poll=1.0):  # noqa: B007 - the last job is returned
            for event in events:
                progress.observe(event)
                if event["type"] == "message":
                    progress.message("  " + event_line(event))
            progress.draw(job)
    finally:
        progress.finish()
    return job


def _report_training(client: Client, job: dict[str, Any], adapter_dir: Path, out: Output) -> None:
    """The curves of the finished job and where its adapter is, as one table."""
    losses = [p["value"] for p in client.metrics(job["id"], "loss")]
    margins = [p["value"] for p in client.metrics(job["id"], "rewards/margins")]
    accuracies = [p["value"] for p in client.metrics(job["id"], "rewards/accuracies")]
    tps = [p["value"] for p in client.metrics(job["id"], "tokens_per_second")]
    times = [e["created_at"] for e in client.events(job["id"], limit=1000) if e["type"] == "metrics"]
    steps = len(losses)
    span = max(times[-1] - times[0], 1) if len(times) > 1 else 1
    rows = [
        ["loss", sparkline(losses), f"{losses[0]:.4f} → {losses[-1]:.4f} over {steps} steps"],
        ["margin", sparkline(margins), f"{margins[0]:.3f} → {margins[-1]:.3f}"],
        ["accuracy", sparkline(accuracies), f"{accuracies[-1]:.2f} at the last step"],
        ["speed", "", f"{(steps - 1) / span:.2f} steps/s, {sum(tps) / max(len(tps), 1):.0f} tokens/s (CPU)"],
        ["adapter", "", f"{adapter_dir} ({', '.join(sorted(p.name for p in adapter_dir.iterdir()))})"],
        ["model", "", str(job["fine_tuned_model"])],
    ]
    out.line()
    out.table(rows, ["", "curve", "value"], title="training")


def _report_answers(prompts: list[str], before: list[str], after: list[str], out: Output) -> None:
    """Each held-out question's answer before and after DPO, with its length in words."""
    out.line()
    out.line("held-out prompts, before → after DPO:", style="bold")
    for prompt, b, a in zip(prompts, before, after, strict=True):
        out.line()
        out.line(f"  Q: {prompt}", style="bold")
        out.line(f"  before ({len(b.split())} words): {b}")
        out.line(f"  after  ({len(a.split())} words): {a}")
    mean_before = sum(len(b.split()) for b in before) / len(before)
    mean_after = sum(len(a.split()) for a in after) / len(after)
    out.line()
    out.line(f"mean answer length {mean_before:.1f} → {mean_after:.1f} words")


def _report_retention(before: list[str], after: list[str], retention: float | None, out: Output) -> None:
    """Each probed fact's answer before and after, marked kept / lost (the probe's grader decides)."""
    from service.graders import grade

    def right(text: str, answer: str) -> bool:
        return grade(RETENTION_GRADER, text, {"answer": answer}).reward >= 0.5

    out.line()
    out.line("retention probe, before → after DPO (is the fact still there?):", style="bold")
    for (question, answer), b, a in zip(RETENTION_FACTS, before, after, strict=True):
        was, kept = right(b, answer), right(a, answer)
        mark = "kept" if was and kept else "lost" if was else "gained" if kept else "absent"
        out.line()
        out.line(f"  Q: {question} (fact: {answer}) — {mark}", style="bold")
        out.line(f"  before [{'yes' if was else 'no'}]: {b}")
        out.line(f"  after  [{'yes' if kept else 'no'}]: {a}")
    out.line()
    shown = f"{retention:.2f}" if retention is not None and retention == retention else "n/a (the base knew none)"
    out.line(f"retention: {shown} of the facts the base answered right are still answered right "
             "(eval/retention, graded by the job)", style="bold")


def main(argv: list[str] | None = None) -> int:
    """The entry point: the library noise goes to the log before anything loads; no traceback on screen."""
    parser = argparse.ArgumentParser(prog="alignd demo")
    parser.add_argument("--epochs", type=int, default=None, help="n_epochs (default: the DPO default)")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct",
                        help="base model (tests use tiny-random-llama to run the whole demo in seconds)")
    args = parser.parse_args(argv)
    log_path = Settings.from_env().data_dir / "demo.log"
    log.addHandler(quiet_libraries(log_path))
    out = Output()
    try:
        return run(args, out, log_path)
    except KeyboardInterrupt:
        out.line("demo stopped (Ctrl-C)")
        return 130
    except Exception as exc:  # one line on screen, the traceback in the log
        log.exception("demo failed")
        out.line(f"demo failed: {type(exc).__name__}: {exc} (traceback in {log_path})")
        return 1


if __name__ == "__main__":
    sys.exit(main())
