"""The worker's Celery app: ``celery -A workers.celery_app worker`` (``alignd worker`` runs this)."""

from __future__ import annotations

from service.queue import make_celery
from service.settings import Settings

settings = Settings.from_env()
app = make_celery(settings)
app.conf.imports = ("workers.tasks", "workers.graders.tasks", "workers.shutdown",  # shutdown: SIGTERM hands back
                    "workers.process_model")  # a fresh process per job, a torch-free parent
