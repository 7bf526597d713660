"""Training side of alignd: Celery tasks, recipes and the pieces they share.

Everything heavy (torch, transformers, peft) lives here so that ``service/`` can stay import-light;
workers may import the light parts of ``service/`` (settings, job specs, storage), never the reverse.
"""
