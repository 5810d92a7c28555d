"""Database engine and sessions.

Commits happen in one place: the service functions in `app/crud.py` commit (a job must be
committed before its id goes onto the queue); the worker and trainer commit through
`session_scope()`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Annotated, Any, TypeVar

import anyio.to_thread
from fastapi import Depends
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, create_engine

from app.config import get_settings

SQLITE_BUSY_TIMEOUT_MS = 30_000
T = TypeVar("T")


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # The api, the worker and the trainer write at once: WAL lets readers go on while one
    # writes, and the busy timeout makes a writer wait for the lock instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


# Connections beyond API_THREADS: the API's background loops (reconcile, sweeps).
BACKGROUND_CONNECTIONS = 2


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
    """`pool_size` connections at most and no overflow: the caller sizes it to the threads that
    can use it at once, so a thread never waits for one (see Settings.api_threads)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               pool_size=pool_size, max_overflow=0)
        event.listen(engine, "connect", _configure_sqlite)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=0)


@lru_cache
def get_engine() -> Engine:
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return make_engine(settings.sqlalchemy_url, pool_size=settings.api_threads + BACKGROUND_CONNECTIONS)


def get_session() -> Iterator[Session]:
    with Session(get_engine(), expire_on_commit=False) as session:
        yield session


# Closed when the route function returns, before the response is validated and sent: a
# connection is never held by a request that has finished its work.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


async def run_db(function: Callable[..., T], *args: Any, limiter: anyio.CapacityLimiter | None = None) -> T:
    """Run blocking database work in the API's thread pool (API_THREADS threads, one pooled
    connection each), so an async route never blocks the event loop. A `limiter` of its own
    bounds one kind of work further (it still runs on those threads)."""
    if limiter is None:
        return await anyio.to_thread.run_sync(function, *args)
    async with limiter:
        return await anyio.to_thread.run_sync(function, *args)


_limiters: dict[tuple[object, str], anyio.CapacityLimiter] = {}


def limiter_of(kind: str, tokens: int) -> anyio.CapacityLimiter:
    """A capacity limiter for one kind of work, per event loop (tests run many loops)."""
    from anyio.lowlevel import current_token

    key = (current_token(), kind)
    if key not in _limiters:
        if len(_limiters) > 64:
            _limiters.clear()
        _limiters[key] = anyio.CapacityLimiter(tokens)
    return _limiters[key]


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
