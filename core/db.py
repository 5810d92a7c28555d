"""The job store's engine and sessions, for every process (the API, the worker, the trainer).

The worker and the trainer commit through `session_scope()`; the API's service functions
(app/crud.py) commit themselves (a job must be committed before its id goes onto the queue)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, create_engine

from core.config import get_settings

SQLITE_BUSY_TIMEOUT_MS = 30_000


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # The api, the worker and the trainer write at once: WAL lets readers go on while one
    # writes, and the busy timeout makes a writer wait for the lock instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


# Connections beyond API_THREADS: the API's background loops (reconcile and sweeps, webhooks,
# checkpoint verification).
BACKGROUND_CONNECTIONS = 3


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
    """`pool_size` connections at most and no overflow: the caller sizes it to the threads that
    can use it at once, so a thread never waits for one (see Settings.api_threads)."""
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=pool_size, max_overflow=0
        )
        event.listen(engine, "connect", _configure_sqlite)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=0)


@lru_cache
def get_engine() -> Engine:
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return make_engine(settings.sqlalchemy_url, pool_size=settings.api_threads + BACKGROUND_CONNECTIONS)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits when the block ends and rolls back when it raises."""
    with Session(get_engine(), expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
