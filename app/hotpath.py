"""The reads pollers repeat, answered from memory ahead of FastAPI's routing.

Once a job's record comes from memory, most of what a poller's request costs is FastAPI's own
work: matching the route among all the others and resolving its parameters and dependencies
(about half of the server's time, measured with py-spy under wrk; docs/benchmarks.md). This
ASGI middleware answers, before any of that, the requests that are plain reads of something
already in this process's memory:

- `GET /jobs/{id}` (optionally `?fields=...`) of a record fresh enough to serve,
- `GET /jobs` whose page of ids and records are all fresh,
- `GET /jobs/{id}/logs` and `/events` pages of a finished job, kept in memory,

with the same bytes, ETag and headers as the routes (tests/test_hotpath.py holds the two side
by side). Everything else, any doubt included (an unexpected query parameter, a token that is
not right, `Cache-Control: no-cache`, a miss, another project's job), goes to FastAPI, whose routes
validate, read the database, fill the memory and answer errors. The token was checked before
(app/access.py), which left the identity in the scope."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

from app import pages, records
from app.auth import IDENTITY_SCOPE_KEY, Identity
from app.errors import AppError
from core.config import get_settings
from core.models import JobStatus
from core.spec import MAX_DB_INT

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JOB_PATH = re.compile(r"/jobs/([0-9]{1,19})(/logs|/events)?")
DIGITS = re.compile(r"[0-9]{1,19}")
FIELDS = re.compile(r"[a-z_]+(,[a-z_]+)*")
STATUSES = {status.value: status for status in JobStatus}


def _int(value: str | None, low: int, high: int) -> int | None:
    """The value of an integer query parameter as the routes accept it, or ValueError."""
    if value is None:
        return None
    if not DIGITS.fullmatch(value) or not low <= int(value) <= high:
        raise ValueError(value)
    return int(value)


def _fields(value: str | None) -> list[str] | None:
    if value is None:
        return None
    if len(value) > 400 or not FIELDS.fullmatch(value) or records.unknown_fields(value.split(",")):
        raise ValueError(value)
    return value.split(",")


class HotReads:
    served = 0  # requests answered here, in this process (tests read it)

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            response = self.answer(scope)
            if response is not None:
                HotReads.served += 1
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def answer(self, scope: Scope) -> Any:
        """The response, when this request is a read of something fresh in memory; else None."""
        path = scope["path"]
        if path != "/jobs" and not path.startswith("/jobs/"):
            return None
        headers = {name: value for name, value in scope["headers"] if name in (b"if-none-match", b"cache-control")}
        if records.wants_fresh(_text(headers.get(b"cache-control"))):
            return None
        identity = scope.get(IDENTITY_SCOPE_KEY)
        if not isinstance(identity, Identity):
            return None
        try:
            pairs = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
            query = dict(pairs)
            if len(query) != len(pairs):  # a parameter given twice: let FastAPI decide
                return None
            body_etag = self.read_list(query, identity) if path == "/jobs" else self.read_job(path, query, identity)
        except (AppError, ValueError, KeyError):  # FastAPI answers these, with the reasons
            return None
        if body_etag is None:
            return None
        return records.conditional(*body_etag, _text(headers.get(b"if-none-match")))

    def read_job(self, path: str, query: dict[str, str], identity: Identity) -> tuple[bytes, str] | None:
        match = JOB_PATH.fullmatch(path)
        if match is None or int(match[1]) > MAX_DB_INT or int(match[1]) < 1:
            return None
        job_id, part = int(match[1]), match[2]
        record = records.get_record_cache().peek(job_id)
        if record is None or not identity.sees(record.project_id):  # the route answers: 404
            return None
        if part is None:
            if set(query) - {"fields"}:
                return None
            return records.projection(record, _fields(query.get("fields")))
        cursor_name = "after_step" if part == "/logs" else "after_id"
        if not record.finished or set(query) - {cursor_name, "limit"}:
            return None
        after = _int(query.get(cursor_name), 0, MAX_DB_INT)
        limit = _int(query.get("limit"), 1, 5000) or 1000
        return pages.get_page_cache().get((part[1:], job_id, after, limit))

    def read_list(self, query: dict[str, str], identity: Identity) -> tuple[bytes, str] | None:
        if set(query) - {"status", "cursor", "limit", "fields"}:
            return None
        status = STATUSES[query["status"]] if "status" in query else None  # KeyError: below
        cursor = _int(query.get("cursor"), 1, MAX_DB_INT)
        limit = min(_int(query.get("limit"), 1, 500) or 50, get_settings().page_size_max)
        cache = records.get_record_cache()
        listed = cache.peek_ids(status, cursor, limit, identity.scope)
        if listed is None:
            return None
        ids, next_cursor = listed
        found = {job_id: record for job_id in ids if (record := cache.peek(job_id)) is not None}
        if len(found) != len(ids):
            return None
        return records.job_list(ids, next_cursor, found, _fields(query.get("fields")))


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")
