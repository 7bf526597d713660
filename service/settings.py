"""Settings read from ``ALIGND_*`` environment variables, one dataclass per concern.

Everything defaults to the embedded mode (SQLite, filesystem broker, local object store under the
data dir) so ``alignd serve`` works with no configuration; naming a production part in the
environment switches to it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _int(name: str, default: int) -> int:
    raw = _env(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


@dataclass(frozen=True)
class DatabaseSettings:
    url: str

    @property
    def sqlalchemy_url(self) -> str:
        """psycopg 3 is the PostgreSQL driver; users write plain ``postgresql://`` URLs."""
        for prefix in ("postgresql://", "postgres://"):
            if self.url.startswith(prefix):
                return "postgresql+psycopg://" + self.url[len(prefix):]
        return self.url

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")


@dataclass(frozen=True)
class BrokerSettings:
    url: str
    filesystem_dir: Path
    queue: str = "alignd"

    @property
    def embedded(self) -> bool:
        return self.url.startswith("filesystem://")


@dataclass(frozen=True)
class StorageSettings:
    url: str
    s3_endpoint_url: str | None = None


@dataclass(frozen=True)
class LimitSettings:
    max_upload_bytes: int = 1 << 30
    max_json_bytes: int = 1 << 20
    max_line_bytes: int = 4 << 20
    max_json_depth: int = 32
    job_creates_per_minute: int = 60
    max_active_jobs: int = 32


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    database: DatabaseSettings
    broker: BrokerSettings
    storage: StorageSettings
    models: dict[str, str] = field(default_factory=dict)
    model_cache_dir: Path = Path(".alignd/models")
    limits: LimitSettings = field(default_factory=LimitSettings)

    @classmethod
    def from_env(cls, data_dir: str | Path | None = None) -> Settings:
        root = Path(data_dir or _env("ALIGND_DATA_DIR", "./.alignd") or ".alignd").resolve()
        broker_dir = root / "broker"
        return cls(
            data_dir=root,
            database=DatabaseSettings(_env("ALIGND_DATABASE_URL") or f"sqlite:///{root / 'alignd.db'}"),
            broker=BrokerSettings(
                url=_env("ALIGND_BROKER_URL") or "filesystem://",
                filesystem_dir=broker_dir,
                queue=_env("ALIGND_QUEUE", "alignd") or "alignd",
            ),
            storage=StorageSettings(
                url=_env("ALIGND_STORAGE_URL") or f"file://{root / 'objects'}",
                s3_endpoint_url=_env("ALIGND_S3_ENDPOINT_URL"),
            ),
            models=parse_models(_env("ALIGND_MODELS", "") or ""),
            model_cache_dir=Path(_env("ALIGND_MODEL_CACHE") or root / "models").resolve(),
            limits=LimitSettings(
                max_upload_bytes=_int("ALIGND_MAX_UPLOAD_BYTES", 1 << 30),
                max_json_bytes=_int("ALIGND_MAX_JSON_BYTES", 1 << 20),
                job_creates_per_minute=_int("ALIGND_JOB_CREATES_PER_MINUTE", 60),
                max_active_jobs=_int("ALIGND_MAX_ACTIVE_JOBS", 32),
            ),
        )


def parse_models(spec: str) -> dict[str, str]:
    """``ALIGND_MODELS`` is ``name=path_or_s3_url`` pairs separated by commas."""
    models: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, location = item.partition("=")
        if not sep or not name.strip() or not location.strip():
            raise ValueError(f"ALIGND_MODELS entry {item!r} is not name=location")
        models[name.strip()] = location.strip()
    return models
