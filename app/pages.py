"""Pages of step logs and events, read and serialized without ORM objects or per-row models.

A 1,000-row page of step logs is the heaviest thing pollers ask for; building it through ORM
objects and pydantic models cost most of its time. Here the rows come from one SQL query as
tuples and go to JSON through orjson, in the shape `StepLogPublic` and `EventPublic` declare
(tests/test_pages.py holds the two against each other). Pages of a finished job never change,
so they are kept in memory (bounded in bytes) and answered with an ETag."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Table, select
from sqlmodel import Session

from app.records import etag_of
from core.config import get_settings
from core.contract import EventKind, understood
from core.db import get_engine
from core.models import JobEvent, StepLog

GIB = 1024**3
VRAM_KEYS = ("allocated", "reserved", "peak_allocated", "device_used", "device_total")
LOGS: Table = StepLog.__table__  # type: ignore[attr-defined]
EVENTS: Table = JobEvent.__table__  # type: ignore[attr-defined]
LOG_COLUMNS = [
    LOGS.c[name]
    for name in (
        "step",
        "epoch",
        "created_at",
        "loss",
        "learning_rate",
        "grad_norm",
        "tokens_per_second",
        "num_tokens",
        "eval_loss",
        "vram_allocated",
        "vram_reserved",
        "vram_peak_allocated",
        "device_used",
        "device_total",
        "method_metrics",
    )
]
EVENT_COLUMNS = [EVENTS.c[name] for name in ("id", "created_at", "kind", "message")]
JSON_OPTIONS = orjson.OPT_UTC_Z  # datetimes as pydantic writes them: ...Z


def _gib(value: int | None) -> float | None:
    return None if value is None else round(value / GIB, 3)


def vram_item(values: tuple[int | None, ...]) -> dict[str, Any]:
    """Vram as the API shows it: bytes, then the same in GiB (device_used_peak is the record's)."""
    item: dict[str, Any] = dict(zip(VRAM_KEYS, values, strict=True))
    item["device_used_peak"] = None
    for key in VRAM_KEYS:
        item[f"{key}_gib"] = _gib(item[key])
    item["device_used_peak_gib"] = None
    return item


def log_item(row: Any) -> dict[str, Any]:
    created_at: datetime = row[2]
    return {
        "step": row[0],
        "epoch": row[1],
        "created_at": created_at,
        "loss": row[3],
        "learning_rate": row[4],
        "grad_norm": row[5],
        "tokens_per_second": row[6],
        "num_tokens": row[7],
        "eval_loss": row[8],
        "method_metrics": row[14],
        "vram": vram_item(tuple(row[9:14])),
    }


def event_item(row: Any) -> dict[str, Any]:
    kind, kind_raw = understood(EventKind, row[2])
    if kind_raw is not None:  # a kind another version wrote (EventPublic.kind_raw)
        return {"id": row[0], "created_at": row[1], "kind": kind, "kind_raw": kind_raw, "message": row[3]}
    return {"id": row[0], "created_at": row[1], "kind": kind, "message": row[3]}


def read_logs(session: Session, job_id: int, after_step: int | None, limit: int) -> list[dict[str, Any]]:
    query = select(*LOG_COLUMNS).where(LOGS.c.job_id == job_id)
    if after_step is not None:
        query = query.where(LOGS.c.step > after_step)
    query = query.order_by(LOGS.c.step, LOGS.c.id).limit(limit)
    return [log_item(row) for row in session.execute(query)]


def read_events(session: Session, job_id: int, after_id: int | None, limit: int) -> list[dict[str, Any]]:
    query = select(*EVENT_COLUMNS).where(EVENTS.c.job_id == job_id)
    if after_id is not None:
        query = query.where(EVENTS.c.id > after_id)
    query = query.order_by(EVENTS.c.id).limit(limit)
    return [event_item(row) for row in session.execute(query)]


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=JSON_OPTIONS)


def log_page(job_id: int, after_step: int | None, limit: int) -> bytes:
    """GET /jobs/{id}/logs's body (blocking: run it in a thread)."""
    with Session(get_engine()) as session:
        items = read_logs(session, job_id, after_step, limit)
    return dumps({"items": items, "next_after_step": items[-1]["step"] if len(items) == limit else None})


def event_page(job_id: int, after_id: int | None, limit: int) -> bytes:
    """GET /jobs/{id}/events's body (blocking: run it in a thread)."""
    with Session(get_engine()) as session:
        items = read_events(session, job_id, after_id, limit)
    return dumps({"items": items, "next_after_id": items[-1]["id"] if len(items) == limit else None})


PAGE_CACHE_BYTES = 64 * 1024**2


class PageCache:
    """Serialized pages of finished jobs, least recently used first out, bounded in bytes. A
    finished job's events still grow when one of its checkpoints is deleted, and the job may be
    deleted: a page is served for at most `max_age_s` (FINISHED_RECORD_MAX_AGE_S), so another
    API process shows either within that time. Keys start (kind, job id, ...)."""

    def __init__(self, max_bytes: int, max_age_s: float = 5.0) -> None:
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._pages: OrderedDict[tuple[Any, ...], tuple[bytes, str, float]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...]) -> tuple[bytes, str] | None:
        with self._lock:
            page = self._pages.get(key)
            if page is None or time.monotonic() - page[2] > self.max_age_s:
                return None
            self._pages.move_to_end(key)
            return page[0], page[1]

    def put(self, key: tuple[Any, ...], body: bytes) -> tuple[bytes, str]:
        etag = etag_of(body)
        if len(body) > self.max_bytes:
            return body, etag
        with self._lock:
            self._drop(key)
            self._pages[key] = (body, etag, time.monotonic())
            self._bytes += len(body)
            while self._bytes > self.max_bytes:
                _key, (evicted, _etag, _at) = self._pages.popitem(last=False)
                self._bytes -= len(evicted)
        return body, etag

    def _drop(self, key: tuple[Any, ...]) -> None:
        old = self._pages.pop(key, None)
        self._bytes -= len(old[0]) if old else 0

    def forget(self, job_id: int) -> None:
        """Drop every page of this job (this process changed it)."""
        with self._lock:
            for key in [key for key in self._pages if key[1] == job_id]:
                self._drop(key)


_caches: dict[str, PageCache] = {}


def get_page_cache() -> PageCache:
    """This process's cache of finished jobs' pages, for the configured database."""
    settings = get_settings()
    key = f"{settings.sqlalchemy_url} {settings.finished_record_max_age_s}"
    if key not in _caches:
        _caches.clear()
        _caches[key] = PageCache(PAGE_CACHE_BYTES, settings.finished_record_max_age_s)
    return _caches[key]
