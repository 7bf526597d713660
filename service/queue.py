"""The Celery application both sides share: the API sends ``alignd.train`` (and ``alignd.grade``) by name.

Redis in production; in the embedded default kombu's ``filesystem://`` transport, which needs no
server and works across processes that share the data dir. It has no fanout exchange, so the worker
runs without mingle, gossip, heartbeats and remote control (cancel goes through the database).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery

from service.settings import Settings

TRAIN_TASK = "alignd.train"
#: grade one sample with a grader that needs a model (score_model / label_model, or a multi holding one);
#: the API waits for its result (the only task with one), so it alone uses the result backend
GRADE_TASK = "alignd.grade"
log = logging.getLogger("alignd.queue")


def make_celery(settings: Settings) -> Celery:
    app = Celery("alignd", set_as_current=False)
    conf: dict[str, Any] = {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # a fresh pool process per task: CUDA does not survive a fork, and a job's GPU memory must not
        # be left to the next one (workers/process_model.py)
        "worker_max_tasks_per_child": 1,
        "task_ignore_result": True,
        "task_default_queue": settings.broker.queue,
        "task_routes": {TRAIN_TASK: {"queue": settings.broker.queue}},
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "worker_enable_remote_control": False,
        "result_expires": 3600,
        "result_serializer": "json",
        "task_serializer": "json",
        "accept_content": ["json"],
    }
    if settings.broker.embedded:
        folder = settings.broker.filesystem_dir
        (folder / "queue").mkdir(parents=True, exist_ok=True)
        (folder / "processed").mkdir(parents=True, exist_ok=True)
        (folder / "results").mkdir(parents=True, exist_ok=True)
        conf["result_backend"] = f"file://{folder / 'results'}"
        conf["broker_url"] = "filesystem://"
        conf["broker_transport_options"] = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
            # kombu polls the folder once a second by default: a job would wait up to 1 s to start.
            # A listing of a near-empty folder five times a second costs nothing measurable.
            "polling_interval": 0.2,
        }
    else:
        conf["broker_url"] = settings.broker.url
        conf["result_backend"] = settings.broker.url  # Redis: results expire (result_expires)
        # Longer than any checkpoint interval: an unacked job is redelivered only after a real loss.
        conf["broker_transport_options"] = {"visibility_timeout": 6 * 3600}
    app.conf.update(conf)
    return app


def send_train(app: Celery, settings: Settings, job_id: str, queue: str | None = None) -> bool:
    """Publish "job X is ready" to the job's queue (the first configured queue when it has none).

    A failure is logged, not raised: the job row stays queued."""
    try:
        app.send_task(TRAIN_TASK, args=[job_id], queue=queue or settings.placement.queues[0].name)
        return True
    except Exception:  # noqa: BLE001 - the broker being down must not fail the create request
        log.exception("could not publish %s for %s; the job stays queued", TRAIN_TASK, job_id)
        return False


def queue_depths(app: Celery, settings: Settings) -> dict[str, int] | None:
    """Messages waiting in each configured queue (0 for an empty one), or None when the broker cannot say."""
    names = [q.name for q in settings.placement.queues]
    try:
        if settings.broker.embedded:
            # kombu's filesystem transport names each message ``<ms>_<uuid>.<queue>.msg``
            counts = dict.fromkeys(names, 0)
            for path in (settings.broker.filesystem_dir / "queue").iterdir():
                queue = path.name.partition(".")[2].removesuffix(".msg")
                if path.suffix == ".msg" and queue in counts:
                    counts[queue] += 1
            return counts
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            # Virtual transports (Redis) count a queue's messages with _size; an empty Redis queue does
            # not exist as a key, so a passive declare would fail where the honest answer is 0.
            size = getattr(channel, "_size", None)
            if size is not None:
                return {name: int(size(name)) for name in names}
            return {name: int(channel.queue_declare(queue=name, passive=True)[1]) for name in names}
    except Exception:  # noqa: BLE001
        return None


def queue_depth(app: Celery, settings: Settings, queue: str | None = None) -> int | None:
    """Messages waiting in ``queue`` (all configured queues together when None), or None when unknown."""
    depths = queue_depths(app, settings)
    if depths is None:
        return None
    return depths.get(queue, 0) if queue is not None else sum(depths.values())


class NoWorkerAvailable(RuntimeError):
    """No worker started the task in time (or the broker is down): the API answers 503 with Retry-After."""


def run_grade_task(app: Celery, queue: str, kwargs: dict[str, Any], *, pickup_timeout: float,
                   run_timeout: float) -> dict[str, Any] | None:
    """Send ``alignd.grade`` and wait for its result; None when the worker took longer than ``run_timeout``.

    The message expires after ``pickup_timeout``, so a worker that frees up after the caller has been
    told 503 discards it instead of grading for nobody.
    """
    try:
        result = app.send_task(GRADE_TASK, kwargs=kwargs, queue=queue, expires=pickup_timeout)
    except Exception as exc:  # noqa: BLE001 - a broker outage is "no worker", not a 500
        log.warning("could not publish %s: %s", GRADE_TASK, exc)
        raise NoWorkerAvailable("the broker is unreachable") from None
    try:
        deadline = time.monotonic() + pickup_timeout
        while result.state == "PENDING":
            if time.monotonic() > deadline:
                raise NoWorkerAvailable(f"no worker started the grader within {pickup_timeout:g} s")
            time.sleep(0.05)
        try:
            value = result.get(timeout=run_timeout, propagate=False, interval=0.05)
        except Exception:  # noqa: BLE001 - celery's TimeoutError: the worker is still grading
            return None
        return value if isinstance(value, dict) else {"error": repr(value)}
    finally:
        if result.state not in ("PENDING", "STARTED"):
            result.forget()
