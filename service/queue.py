"""The Celery application both sides share: the API only sends ``alignd.train`` by name, the worker runs it.

Redis in production; in the embedded default kombu's ``filesystem://`` transport, which needs no
server and works across processes that share the data dir. It has no fanout exchange, so the worker
runs without mingle, gossip, heartbeats and remote control (cancel goes through the database).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from service.settings import Settings

TRAIN_TASK = "alignd.train"
log = logging.getLogger("alignd.queue")


def make_celery(settings: Settings) -> Celery:
    app = Celery("alignd", set_as_current=False)
    conf: dict[str, Any] = {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "task_default_queue": settings.broker.queue,
        "task_routes": {TRAIN_TASK: {"queue": settings.broker.queue}},
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "worker_enable_remote_control": False,
        "task_serializer": "json",
        "accept_content": ["json"],
    }
    if settings.broker.embedded:
        folder = settings.broker.filesystem_dir
        (folder / "queue").mkdir(parents=True, exist_ok=True)
        (folder / "processed").mkdir(parents=True, exist_ok=True)
        conf["broker_url"] = "filesystem://"
        conf["broker_transport_options"] = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }
    else:
        conf["broker_url"] = settings.broker.url
        # Longer than any checkpoint interval: an unacked job is redelivered only after a real loss.
        conf["broker_transport_options"] = {"visibility_timeout": 6 * 3600}
    app.conf.update(conf)
    return app


def send_train(app: Celery, settings: Settings, job_id: str) -> bool:
    """Publish "job X is ready". A failure is logged, not raised: the job row stays queued."""
    try:
        app.send_task(TRAIN_TASK, args=[job_id], queue=settings.broker.queue)
        return True
    except Exception:  # noqa: BLE001 - the broker being down must not fail the create request
        log.exception("could not publish %s for %s; the job stays queued", TRAIN_TASK, job_id)
        return False


def queue_depth(app: Celery, settings: Settings) -> int | None:
    """Messages waiting in the job queue, or None when the broker cannot say."""
    try:
        if settings.broker.embedded:
            folder = settings.broker.filesystem_dir / "queue"
            return sum(1 for p in folder.iterdir() if p.suffix == ".msg")
        with app.connection_for_write() as conn:
            _, count, _ = conn.default_channel.queue_declare(queue=settings.broker.queue, passive=True)
            return int(count)
    except Exception:  # noqa: BLE001
        return None
