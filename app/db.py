"""The API's side of the job store: a session per request, and blocking database work run on the
API's threads (the engine and `session_scope()` are core/db.py's)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, Any, TypeVar

import anyio.to_thread
from fastapi import Depends
from sqlmodel import Session

from core.db import get_engine

T = TypeVar("T")


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
