"""``alignd`` command line: serve, api, worker, keys, demo, openapi.

``serve`` is the embedded default: API and one worker process in one command. The worker and the
demo run as child processes by module name, so this module never imports ``workers``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from service.cli_client import add_client_commands
from service.console import quiet_libraries
from service.settings import Settings


def _settings(args: argparse.Namespace) -> Settings:
    if getattr(args, "data_dir", None):
        os.environ["ALIGND_DATA_DIR"] = str(Path(args.data_dir).resolve())
    return Settings.from_env()


def worker_command(settings: Settings, concurrency: int = 1) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
            "-Q", settings.placement.worker_queue, "--concurrency", str(concurrency), "--pool", "prefork",
            "--without-mingle", "--without-gossip", "--without-heartbeat", "--loglevel", "INFO",
            "-n", f"alignd-{os.getpid()}-{secrets.token_hex(3)}@%h"]  # unique: a shutdown hands back its own jobs


def cmd_api(args: argparse.Namespace, *, with_worker: bool = False) -> int:
    import uvicorn

    from service.app import create_app

    settings = _settings(args)
    _exit_on(signal.SIGTERM, signal.SIGINT)
    # migrates before anything else touches the database, unless a migration Job owns that (k8s)
    app = create_app(settings, reconcile=True, migrate=not getattr(args, "skip_migrate", False))
    worker = None
    if with_worker:  # in our process group, and told to stop (SIGTERM) should this process die first
        worker = subprocess.Popen(worker_command(settings), env=os.environ.copy(), preexec_fn=_term_with_parent)
    try:
        print(f"alignd: API on http://{args.host}:{args.port} (data dir {settings.data_dir})", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        if worker is not None:
            stop_worker(worker, settings.worker.shutdown_grace)
    return 0


def _exit_on(*signals: signal.Signals) -> None:
    """SIGTERM/SIGINT end the process through ``SystemExit`` so that ``finally`` blocks run.

    uvicorn shuts down gracefully on either signal and then re-raises it; with the default SIGTERM
    disposition that re-raise would kill the process before ``serve`` stopped its worker."""
    def leave(signum: int, _frame: Any) -> None:
        raise SystemExit(0)

    for sig in signals:
        signal.signal(sig, leave)


def _term_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop_worker(worker: subprocess.Popen[bytes], grace: float) -> None:
    """Stop ``serve``'s worker and leave no process behind.

    SIGTERM lets the worker hand its running job back to the queue and exit within its grace period
    (``ALIGND_WORKER_SHUTDOWN_GRACE``, see ``workers/shutdown.py``); whatever of its process tree is
    still alive after that — or at once, on a second SIGTERM/SIGINT — is killed."""
    import threading
    import time

    import psutil

    hurry = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: hurry.set())
    seen: dict[int, psutil.Process] = {}

    def track() -> None:
        try:
            for p in [psutil.Process(worker.pid), *psutil.Process(worker.pid).children(recursive=True)]:
                seen.setdefault(p.pid, p)
        except psutil.Error:
            pass

    track()
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace + 5
    while worker.poll() is None and time.monotonic() < deadline and not hurry.is_set():
        track()
        time.sleep(0.2)
    for p in seen.values():
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                p.kill()
        except psutil.Error:
            continue
    with contextlib.suppress(subprocess.TimeoutExpired):
        worker.wait(timeout=10)


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from service.db.engine import make_engine, migrate

    if not args.skip_migrate:
        migrate(make_engine(settings.database))
    command = worker_command(settings, args.concurrency)
    os.execv(command[0], command)
    return 0  # pragma: no cover


def cmd_keys(args: argparse.Namespace) -> int:
    from service.auth import create_key, revoke_key
    from service.db.engine import make_engine, make_session_factory, migrate, session_scope

    settings = _settings(args)
    engine = make_engine(settings.database)
    migrate(engine)
    with session_scope(make_session_factory(engine)) as session:
        if args.keys_command == "create":
            key_id, secret = create_key(session, args.org)
            print(secret)
            print(f"key id {key_id} for organization {args.org}", file=sys.stderr)
            return 0
        if revoke_key(session, args.key_id):
            print(f"revoked {args.key_id}")
            return 0
        print(f"no active key {args.key_id}", file=sys.stderr)
        return 1


def cmd_migrate(args: argparse.Namespace) -> int:
    """Bring the database schema to the latest revision (the k8s migration Job runs this)."""
    from service.db.engine import make_engine, migrate

    settings = _settings(args)
    engine = make_engine(settings.database)
    migrate(engine)
    engine.dispose()
    print("alignd: database schema is up to date", flush=True)
    return 0


def cmd_openapi(args: argparse.Namespace) -> int:
    print_openapi(Path(args.output))
    return 0


def openapi_document() -> dict[str, Any]:
    """The spec depends only on the routes and types, so it is built against a throwaway data dir."""
    import tempfile

    from service.app import create_app

    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(Settings.from_env(tmp), migrate=False)
        return app.openapi_schema.to_schema()  # type: ignore[no-any-return]


def print_openapi(output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n")


def cmd_demo(args: argparse.Namespace) -> int:
    settings = _settings(args)
    env = {**os.environ, "ALIGND_DATA_DIR": str(settings.data_dir)}
    demo = subprocess.Popen([sys.executable, "-m", "workers.demo", *args.demo_args], env=env)
    try:
        return demo.wait()
    except KeyboardInterrupt:  # the demo got the same Ctrl-C and stops its service; wait for that, quietly
        with contextlib.suppress(KeyboardInterrupt):
            return demo.wait()
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignd", description="Self-hosted fine-tuning service")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("serve", "API and a worker together (embedded default)"), ("api", "API only")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8000)
        p.add_argument("--data-dir")
        p.add_argument("--skip-migrate", action="store_true", help="leave the schema to `alignd migrate`")
    w = sub.add_parser("worker", help="a training worker (Celery)")
    w.add_argument("--data-dir")
    w.add_argument("--concurrency", type=int, default=1)
    w.add_argument("--skip-migrate", action="store_true", help="leave the schema to `alignd migrate`")
    k = sub.add_parser("keys", help="manage API keys")
    k.add_argument("--data-dir")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser("create", help="print a new API key for an organization")
    kc.add_argument("--org", required=True)
    kr = ksub.add_parser("revoke", help="revoke a key by its id")
    kr.add_argument("key_id")
    d = sub.add_parser("demo", help="run a real DPO job end to end on SmolLM2-135M-Instruct "
                                    "(its options: alignd demo -- --help)")
    d.add_argument("--data-dir")
    d.set_defaults(demo_args=[])  # its own options (--epochs, --model) are passed through by main()
    m = sub.add_parser("migrate", help="apply database migrations and exit")
    m.add_argument("--data-dir")
    o = sub.add_parser("openapi", help="write the OpenAPI document")
    o.add_argument("--output", default="openapi/openapi.json")
    add_client_commands(sub)  # files …, jobs …: the HTTP client (service/cli_client.py)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()  # before anything loads: no library progress bars or FutureWarnings here or in children
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "demo":  # `alignd demo --epochs 1`: the demo's own options (workers/demo.py) pass through
        args.demo_args = [arg for arg in unknown if arg != "--"]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if getattr(args, "client_handler", None) is not None:
        return int(args.client_handler(args))
    handlers = {
        "serve": lambda a: cmd_api(a, with_worker=True),
        "api": cmd_api,
        "worker": cmd_worker,
        "keys": cmd_keys,
        "demo": cmd_demo,
        "openapi": cmd_openapi,
        "migrate": cmd_migrate,
    }
    return int(handlers[args.command](args) or 0)


if __name__ == "__main__":
    sys.exit(main())
