"""The worker's Celery app: ``celery -A workers.celery_app worker`` (``alignd worker`` runs this)."""

from __future__ import annotations

from service.console import quiet_libraries
from service.queue import make_celery
from service.settings import Settings

# The worker's entry point (``celery -A workers.celery_app``): library progress bars and FutureWarnings
# off before any recipe imports the training stack; the ranks it launches inherit the environment.
quiet_libraries()
settings = Settings.from_env()
app = make_celery(settings)
app.conf.imports = ("workers.tasks", "workers.graders.tasks", "workers.shutdown",  # shutdown: SIGTERM hands back
                    "workers.process_model")  # a fresh process per job, forked warm from a CUDA-free parent
