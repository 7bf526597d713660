"""Training-data files: validating uploaded JSONL before a job may use it."""
