"""Each worker serves its own jobs' Prometheus series on ``ALIGND_WORKER_METRICS_PORT``.

Started once in the Celery worker's main process when the worker is ready (the prefork children,
which run the jobs, write metric points to the database; nothing is shared between processes). The
registry holds a ``JobSeriesCollector`` limited to the jobs this worker claimed (``Job.worker`` is
the Celery node name), so a worker pod's endpoint shows exactly the jobs running on it, and a job's
series disappear on the first scrape after it ends.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from celery.signals import worker_ready
from prometheus_client import start_http_server

from service.metrics import worker_registry
from service.state import AppState

log = logging.getLogger("alignd.worker")


@worker_ready.connect
def serve_worker_metrics(sender: Any = None, **_: Any) -> int | None:
    from workers.celery_app import settings

    port = settings.metrics.worker_port
    if not port:
        return None
    hostname = str(getattr(sender, "hostname", None) or socket.gethostname())
    start_http_server(port, addr="0.0.0.0", registry=worker_registry(AppState(settings), hostname))
    log.info("alignd: worker %s serves its job metrics on :%d/metrics", hostname, port)
    return port
