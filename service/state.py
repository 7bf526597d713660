"""What the API process holds for its lifetime: settings, database, object store and queue client."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.db.engine import make_engine, make_session_factory, migrate
from service.queue import make_celery
from service.settings import Settings
from service.storage import ObjectStore, open_store


@dataclass
class AppState:
    settings: Settings

    @cached_property
    def engine(self) -> Engine:
        return make_engine(self.settings.database)

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        return make_session_factory(self.engine)

    @cached_property
    def store(self) -> ObjectStore:
        return open_store(self.settings.storage)

    @cached_property
    def celery(self) -> Celery:
        return make_celery(self.settings)

    def migrate(self) -> None:
        migrate(self.engine)
