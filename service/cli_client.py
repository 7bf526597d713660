"""``alignd files …`` and ``alignd jobs …``: the API from the command line, over HTTP only.

Reads ``ALIGND_BASE_URL`` (default ``http://127.0.0.1:8000``) and ``ALIGND_API_KEY`` (or
``--base-url`` / ``--api-key``). Built on :mod:`service.client`. API errors print
``error: <message> (param: <field>)`` on stderr and exit 1, never a traceback.

``jobs follow`` exits with the job's outcome: 0 succeeded, 1 failed, 2 cancelled (130 on Ctrl-C,
which stops following, not the job). Progress bars and tables come from :mod:`service.console`: rich in
a terminal; otherwise (a log, a pipe) plain lines, one per change.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import httpx

from service.client import TERMINAL, AligndError, Client
from service.console import Output, event_line

METHODS = ("dpo", "supervised", "reward_model", "ppo", "reinforcement", "generate_preferences")
EXIT_CODES = {"succeeded": 0, "failed": 1, "cancelled": 2}


class UsageError(Exception):
    """A mistake on the command line (not the API's): printed as ``error: …``, exit 1."""


# --- helpers ----------------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    key = args.api_key or os.environ.get("ALIGND_API_KEY")
    if not key:
        raise UsageError("no API key: set ALIGND_API_KEY (or pass --api-key); `alignd keys create --org ORG` "
                         "makes one")
    return Client(args.base_url or os.environ.get("ALIGND_BASE_URL"), key, timeout=args.timeout)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


def _table(rows: list[list[str]], header: list[str]) -> None:
    Output().table(rows, header)


def _when(ts: float | int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _value(text: str) -> Any:
    """``-H key=value``: a JSON literal when it parses (numbers, true, null), otherwise the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _grader(value: str) -> dict[str, Any]:
    """``--grader``: a path to a JSON file, or the JSON itself."""
    try:
        text = Path(value).read_text() if Path(value).is_file() else value
    except OSError:  # inline JSON longer than a file name may be
        text = value
    try:
        grader = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"--grader: neither a JSON file nor JSON ({exc})") from None
    if not isinstance(grader, dict):
        raise UsageError("--grader: expected a JSON object (OpenAI's grader)")
    return grader


def _pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} expects key=value, got {item!r}")
        out[key.strip()] = value
    return out


# --- files ------------------------------------------------------------------------------------------


def _analysis_lines(analysis: dict[str, Any] | None) -> list[str]:
    if not analysis:
        return []
    tokens = analysis.get("tokens") or {}
    lines = [f"  {analysis.get('examples')} examples, ~{tokens.get('total')} tokens "
             f"(~{tokens.get('mean_per_example')} per example, estimated), "
             f"{analysis['duplicate_prompts']['count']} duplicate prompts"]
    pref = analysis.get("preference")
    if pref:
        lines.append(f"  chosen longer in {pref['chosen_longer_share']:.0%} of pairs, mean length ratio "
                     f"{pref['mean_length_ratio']:.2f}, identical prefix "
                     f"{pref['identical_prefix_share']:.0%}, "
                     f"{pref['near_duplicate_pairs']} near-duplicate pairs")
    rec = analysis.get("recommendation") or {}
    if rec.get("method"):
        lines.append(f"  recommended method: {rec['method']}")
    lines.extend(f"    - {reason}" for reason in rec.get("reasons", []))
    lines.extend(f"  warning: {warning}" for warning in rec.get("warnings", []))
    return lines


def _show_file(f: dict[str, Any]) -> None:
    print(f"{f['id']}  {f['status']}  {f.get('format') or '-'}  {f.get('examples', 0)} examples  "
          f"{f['bytes']} bytes  {f['filename']}")
    if f.get("status_details"):
        print(f["status_details"])
    for line in _analysis_lines(f.get("analysis")):
        print(line)


def cmd_files_upload(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    f = _client(args).upload_file(path)
    if args.json:
        _print_json(f)
    else:
        _show_file(f)
    return 0 if f["status"] == "processed" else 1


def cmd_files_list(args: argparse.Namespace) -> int:
    files = _client(args).list_files()
    if args.json:
        _print_json(files)
        return 0
    _table([[f["id"], f["status"], f.get("format") or "-", str(f.get("examples", 0)), str(f["bytes"]),
             _when(f["created_at"]), f["filename"]] for f in files],
           ["ID", "STATUS", "FORMAT", "EXAMPLES", "BYTES", "CREATED", "FILENAME"])
    return 0


def cmd_files_show(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.model:
        _print_json(client.file_analysis(args.file_id, args.model))
        return 0
    f = client.file(args.file_id)
    if args.json:
        _print_json(f)
    else:
        _show_file(f)
    return 0


# --- jobs -------------------------------------------------------------------------------------------


def job_body(args: argparse.Namespace, upload: Callable[[Path], str] | None = None) -> dict[str, Any]:
    """The create-job request from ``--json FILE`` and/or the flags (flags win over the file)."""
    body: dict[str, Any] = {}
    if args.json_file:
        source = sys.stdin.read() if args.json_file == "-" else Path(args.json_file).read_text()
        try:
            body = json.loads(source)
        except ValueError as exc:
            raise UsageError(f"--json {args.json_file}: not JSON ({exc})") from None
        if not isinstance(body, dict):
            raise UsageError(f"--json {args.json_file}: expected a JSON object")
    flags = (("model", args.model), ("training_file", args.training_file),
             ("validation_file", args.validation_file), ("suffix", args.suffix), ("seed", args.seed))
    for key, value in flags:
        if value is not None:
            body[key] = value
    for key in ("training_file", "validation_file"):
        value = body.get(key)
        if upload is not None and isinstance(value, str) and not value.startswith("file-") \
                and Path(value).is_file():
            body[key] = upload(Path(value))
    if args.metadata:
        body["metadata"] = {**(body.get("metadata") or {}), **_pairs(args.metadata, "--metadata")}
    method = dict(body.get("method") or {})
    method_type = args.method or method.get("type")
    if not method_type:
        raise UsageError("--method is required (" + ", ".join(METHODS[:-1]) + f" or {METHODS[-1]})")
    method["type"] = method_type
    hyper: dict[str, Any] = {}
    if args.hyperparameters:
        try:
            hyper = json.loads(args.hyperparameters)
        except ValueError as exc:
            raise UsageError(f"--hyperparameters: not JSON ({exc})") from None
        if not isinstance(hyper, dict):
            raise UsageError("--hyperparameters: expected a JSON object")
    hyper.update({k: _value(v) for k, v in _pairs(args.hyper, "-H").items()})
    grader = _grader(args.grader) if getattr(args, "grader", None) else None
    if hyper or grader is not None or method_type not in method:
        block = dict(method.get(method_type) or {})
        block["hyperparameters"] = {**(block.get("hyperparameters") or {}), **hyper}
        if grader is not None:
            block["grader"] = grader
        method[method_type] = block
    body["method"] = method
    if args.full:
        body["training_type"] = {"type": "full"}
    else:
        given = (("r", args.lora_r), ("alpha", args.lora_alpha), ("dropout", args.lora_dropout))
        lora = {k: v for k, v in given if v is not None}
        if args.target_modules:
            lora["target_modules"] = [m.strip() for m in args.target_modules.split(",") if m.strip()]
        if lora:
            base = body.get("training_type") or {}
            kept = base if base.get("type", "lora") == "lora" else {}
            body["training_type"] = {**kept, "type": "lora", **lora}
    required = (("--model", "model"), ("--training-file", "training_file"))
    missing = [flag for flag, key in required if key not in body]
    if missing:
        raise UsageError(f"{' and '.join(missing)} required (or give them in --json FILE)")
    return body


def _show_job(job: dict[str, Any]) -> None:
    progress = job.get("progress") or {}
    total = progress.get("total_steps")
    rows = [
        ("id", job["id"]), ("status", job["status"]), ("model", job["model"]),
        ("method", (job.get("method") or {}).get("type")), ("training_file", job["training_file"]),
        ("validation_file", job.get("validation_file") or "-"),
        ("progress", f"{progress.get('step', 0)}/{total if total else '?'}"),
        ("created", _when(job["created_at"])), ("finished", _when(job.get("finished_at"))),
        ("estimated_finish", _when(job.get("estimated_finish"))),
        ("fine_tuned_model", job.get("fine_tuned_model") or "-"),
        ("result_files", ", ".join(job.get("result_files") or []) or "-"),
        ("trained_tokens", job.get("trained_tokens") if job.get("trained_tokens") is not None else "-"),
        ("hyperparameters", json.dumps(job.get("hyperparameters") or {}, sort_keys=True)),
        ("training_type", json.dumps(job.get("training_type") or {}, sort_keys=True)),
    ]
    if job.get("error"):
        error = job["error"]
        param = f" (param: {error['param']})" if error.get("param") else ""
        rows.append(("error", f"{error.get('code')}: {error.get('message')}{param}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")


def cmd_jobs_create(args: argparse.Namespace) -> int:
    client = _client(args)

    def upload(path: Path) -> str:
        f = client.upload_file(path)
        print(f"uploaded {path} as {f['id']} ({f['status']})", file=sys.stderr)
        if f["status"] != "processed":
            raise UsageError(f"{path} is not a valid dataset:\n{f.get('status_details')}")
        return str(f["id"])

    job = client.create_job(job_body(args, upload), idempotency_key=args.idempotency_key)
    if args.json:
        _print_json(job)
    else:
        print(f"{job['id']}  {job['status']}  {job['model']}  {job['method']['type']}")
    if args.follow:
        return follow(client, job["id"], poll=args.poll)
    return 0


def cmd_jobs_list(args: argparse.Namespace) -> int:
    jobs = _client(args).list_jobs(limit=args.limit)
    if args.json:
        _print_json(jobs)
        return 0
    rows = []
    for j in jobs:
        p = j.get("progress") or {}
        rows.append([j["id"], j["status"], (j.get("method") or {}).get("type", "-"), j["model"],
                     f"{p.get('step', 0)}/{p.get('total_steps') or '?'}", _when(j["created_at"]),
                     j.get("fine_tuned_model") or "-"])
    _table(rows, ["ID", "STATUS", "METHOD", "MODEL", "STEP", "CREATED", "FINE-TUNED MODEL"])
    return 0


def cmd_jobs_show(args: argparse.Namespace) -> int:
    job = _client(args).job(args.job_id)
    if args.json:
        _print_json(job)
    else:
        _show_job(job)
    return 0


def _action(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        job = _client(args).job_action(args.job_id, name)
        if args.json:
            _print_json(job)
        else:
            print(f"{job['id']}  {job['status']}")
        return 0
    return run


def cmd_jobs_download(args: argparse.Namespace) -> int:
    client = _client(args)
    checkpoint = None
    if args.checkpoint:
        checkpoints = client.checkpoints(args.job_id)
        matches = [c for c in checkpoints if args.checkpoint in (c["id"], str(c["step_number"]))]
        if not matches:
            steps = ", ".join(str(c["step_number"]) for c in checkpoints) or "none"
            raise UsageError(f"job {args.job_id} has no checkpoint {args.checkpoint!r} (steps: {steps})")
        checkpoint = matches[0]
    default = f"{args.job_id}-step-{checkpoint['step_number']}" if checkpoint else f"{args.job_id}-adapter"
    target = Path(args.output or default)
    client.download_adapter(args.job_id, target, checkpoint["id"] if checkpoint else None)
    files = sorted(p.name for p in target.iterdir())
    print(f"{target}  ({', '.join(files)})")
    return 0


# --- follow -----------------------------------------------------------------------------------------


def follow(client: Client, job_id: str, *, poll: float = 1.0, out: TextIO | None = None,
           tty: bool | None = None) -> int:
    """Print progress and events until the job ends; returns 0 succeeded, 1 failed, 2 cancelled.

    The progress is :class:`service.console.JobProgress`: a rich bar in a terminal, plain lines otherwise;
    when the job has ended, a sparkline of its loss (and margin, KL or reward)."""
    output = Output(out or sys.stdout, terminal=tty)
    progress = output.job_progress()
    job: dict[str, Any] = {"status": "queued"}
    try:
        for job, events in client.follow(job_id, poll=poll):
            for event in events:
                progress.observe(event)
                if event.get("type") != "metrics":
                    progress.message(event_line(event))
            if job["status"] not in TERMINAL:
                progress.draw(job)
    except KeyboardInterrupt:
        progress.finish()
        print(f"stopped following {job_id} (the job goes on: alignd jobs follow {job_id})", file=sys.stderr)
        return 130
    progress.draw(job)
    progress.finish()
    for curve in progress.curves():
        output.line(curve)
    status = job["status"]
    if status == "succeeded":
        output.line(f"job {job_id} succeeded: {job.get('fine_tuned_model')}")
    elif status == "failed":
        error = job.get("error") or {}
        param = f" (param: {error['param']})" if error.get("param") else ""
        output.line(f"job {job_id} failed: {error.get('code')}: {error.get('message')}{param}")
    else:
        output.line(f"job {job_id} {status}")
    return EXIT_CODES.get(status, 1)


def cmd_jobs_follow(args: argparse.Namespace) -> int:
    return follow(_client(args), args.job_id, poll=args.poll)


# --- parser -----------------------------------------------------------------------------------------


def _run(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """API and usage errors as one line on stderr and exit 1; never a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except AligndError as exc:
            param = f" (param: {exc.param})" if exc.param else ""
            print(f"error: {exc.message}{param}", file=sys.stderr)
        except UsageError as exc:
            print(f"error: {exc}", file=sys.stderr)
        except httpx.HTTPError as exc:
            base = args.base_url or os.environ.get("ALIGND_BASE_URL", "http://127.0.0.1:8000")
            print(f"error: cannot reach alignd at {base}: {exc}", file=sys.stderr)
        except OSError as exc:
            print(f"error: {exc}", file=sys.stderr)
        return 1

    return run


def _common(parser: argparse.ArgumentParser, json_flag: str = "--json") -> None:
    parser.add_argument("--base-url", help="API root (default: $ALIGND_BASE_URL or http://127.0.0.1:8000)")
    parser.add_argument("--api-key", help="API key (default: $ALIGND_API_KEY)")
    parser.add_argument("--timeout", type=float, default=120, help="HTTP timeout in seconds")
    parser.add_argument(json_flag, dest="json", action="store_true",
                        help="print the API's JSON instead of a summary")


def add_client_commands(subparsers: Any) -> None:
    """Add ``files`` and ``jobs`` to ``alignd``'s parser; each sets ``client_handler``."""
    files = subparsers.add_parser("files", help="upload and list datasets (HTTP client)")
    fsub = files.add_subparsers(dest="files_command", required=True)
    p = fsub.add_parser("upload", help="upload a JSONL dataset; prints its validation and analysis")
    p.add_argument("path")
    _common(p)
    p.set_defaults(client_handler=_run(cmd_files_upload))
    p = fsub.add_parser("list", help="list files")
    _common(p)
    p.set_defaults(client_handler=_run(cmd_files_list))
    p = fsub.add_parser("show", help="a file with its dataset analysis")
    p.add_argument("file_id")
    p.add_argument("--model", help="ask for exact token counts for this base model")
    _common(p)
    p.set_defaults(client_handler=_run(cmd_files_show))

    jobs = subparsers.add_parser("jobs", help="create, follow and manage fine-tuning jobs (HTTP client)")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)
    c = jsub.add_parser("create", help="create a fine-tuning job",
                        description="Flags override the same fields of --json FILE. A --training-file that "
                                    "is a local path is uploaded first.")
    c.add_argument("--model")
    c.add_argument("--training-file")
    c.add_argument("--method", choices=METHODS)
    c.add_argument("--validation-file")
    c.add_argument("--suffix")
    c.add_argument("--seed", type=int)
    c.add_argument("--hyperparameters", help="JSON object of the method's hyperparameters")
    c.add_argument("--grader", help="reinforcement: the grader, as a JSON file or inline JSON (docs/reinforcement.md)")
    c.add_argument("-H", "--hyper", action="append", metavar="KEY=VALUE",
                   help="one hyperparameter (repeatable); VALUE is parsed as JSON when it can be")
    c.add_argument("--lora-r", type=int)
    c.add_argument("--lora-alpha", type=float)
    c.add_argument("--lora-dropout", type=float)
    c.add_argument("--target-modules", help="comma-separated LoRA target modules")
    c.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    c.add_argument("--metadata", action="append", metavar="KEY=VALUE")
    c.add_argument("--json", dest="json_file", metavar="FILE",
                   help="the request body as JSON ('-' for stdin)")
    c.add_argument("--idempotency-key")
    c.add_argument("--follow", action="store_true", help="follow the job after creating it")
    c.add_argument("--poll", type=float, default=1.0)
    _common(c, json_flag="--print-json")
    c.set_defaults(client_handler=_run(cmd_jobs_create))
    p = jsub.add_parser("list", help="list jobs, newest first")
    p.add_argument("--limit", type=int, default=20)
    _common(p)
    p.set_defaults(client_handler=_run(cmd_jobs_list))
    for name, handler, help_text in (
        ("show", cmd_jobs_show, "a job's status, progress and settings"),
        ("cancel", _action("cancel"), "cancel a job"),
        ("pause", _action("pause"), "pause a running job (it keeps its latest checkpoint)"),
        ("resume", _action("resume"), "resume a paused job"),
    ):
        p = jsub.add_parser(name, help=help_text)
        p.add_argument("job_id")
        _common(p)
        p.set_defaults(client_handler=_run(handler))
    p = jsub.add_parser("follow", help="live progress and events until the job ends (exit 0 succeeded, "
                                       "1 failed, 2 cancelled)")
    p.add_argument("job_id")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between polls")
    _common(p)
    p.set_defaults(client_handler=_run(cmd_jobs_follow))
    p = jsub.add_parser("download", help="download and extract the adapter directory")
    p.add_argument("job_id")
    p.add_argument("-o", "--output", help="directory (default: ./<job id>-adapter)")
    p.add_argument("--checkpoint", help="a checkpoint id or step number instead of the final adapter")
    _common(p)
    p.set_defaults(client_handler=_run(cmd_jobs_download))
