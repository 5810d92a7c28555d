"""Job records as pollers read them: serialized once, kept in memory, answered with an ETag.

Pollers ask for the same record many times a second; the record changes at most once per
logged step. A finished job's record changes only when the job is deleted, so it is read from
the database once every FINISHED_RECORD_MAX_AGE_S (5 s) whatever the number of pollers; a
queued or running job's record is read again when the copy in memory is older than
RECORD_MAX_AGE_S, by one request while the others wait for it (not one
read per poller); a copy past half its max age is read again in the background while it is
still served, so that pollers seldom wait for a read at all. Writes made through this process
(submit, cancel) drop the copy and any read under way at once. `Cache-Control: no-cache` on a
request reads the database.

Each API process has its own cache; the database stays the source of truth."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import ColumnElement
from sqlmodel import Session, col, select
from starlette.responses import Response

from app.db import run_db
from app.presenters import job_public
from app.schemas import JobPublic
from core.config import get_settings
from core.db import get_engine
from core.models import Job, JobStatus

# Pages of job ids kept (GET /jobs with its filters and cursors).
LISTS_KEPT = 256
# A running job's copy older than this share of RECORD_MAX_AGE_S is read again in the background
# while it is still served: under load a read takes a while (measured: about 0.2 s with 1,000
# pollers on one core), and pollers should not wait for it each time the copy expires.
REFRESH_AHEAD = 0.5
# The record's top-level fields, for ?fields= (JobPublic's, in its order).
RECORD_FIELDS = tuple(JobPublic.model_fields)


def etag_of(body: bytes) -> str:
    return '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


@dataclass(frozen=True)
class Record:
    """One job's public record, serialized."""

    job_id: int
    body: bytes
    etag: str
    finished: bool
    read_at: float  # time.monotonic() of the database read
    project_id: int  # whose it is: another project's identity is told there is no such job

    def fields(self, names: Sequence[str]) -> bytes:
        record = orjson.loads(self.body)
        return orjson.dumps({name: record.get(name) for name in names})  # a *_raw field is absent unless set


def record_of(job: Job, read_at: float | None = None) -> Record:
    """`read_at`: when the read of the job began (a copy is as old as the start of its read)."""
    assert job.id is not None
    public = job_public(job)
    body = public.model_dump_json().encode()
    return Record(
        job.id,
        body,
        etag_of(body),
        public.status.finished,
        time.monotonic() if read_at is None else read_at,
        job.project_id,
    )


def status_is(status: JobStatus) -> ColumnElement[bool]:
    """The filter `?status=` means; `unknown`: the statuses this version does not know."""
    if status == JobStatus.unknown:
        return col(Job.status).not_in([known for known in JobStatus if known != JobStatus.unknown])
    return col(Job.status) == status


def list_job_ids(
    status: JobStatus | None, cursor: int | None, limit: int, project_id: int | None = None
) -> tuple[list[int], int | None]:
    """Ids of a page of jobs, newest first, and the cursor of the next page (blocking). With
    `project_id`, that project's jobs only."""
    query = select(Job.id).where(col(Job.deleted_at).is_(None)).order_by(col(Job.id).desc()).limit(limit + 1)
    if project_id is not None:
        query = query.where(col(Job.project_id) == project_id)
    if status is not None:
        query = query.where(status_is(status))
    if cursor is not None:
        query = query.where(col(Job.id) < cursor)
    with Session(get_engine()) as session:
        ids = [job_id for job_id in session.exec(query).all() if job_id is not None]
    return ids[:limit], ids[limit - 1] if len(ids) > limit else None


def read_records(job_ids: Iterable[int]) -> dict[int, Record]:
    """The records of these jobs from the database, in one query (blocking: run it in a thread)."""
    ids, started = list(job_ids), time.monotonic()
    with Session(get_engine()) as session:
        query = select(Job).where(col(Job.id).in_(ids), col(Job.deleted_at).is_(None))
        jobs = session.exec(query).all() if ids else []
        return {job.id: record_of(job, started) for job in jobs if job.id is not None}


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a shared read's failure as seen when every request that waited for it has gone."""
    if not task.cancelled():
        task.exception()


class RecordCache:
    """Shared reads run as tasks of their own that each waiting request awaits through
    asyncio.shield: a client that disconnects cancels its own request, never the read that
    other requests are waiting for."""

    def __init__(self, capacity: int, max_age_s: float, finished_max_age_s: float | None = None) -> None:
        self.capacity = capacity
        self.max_age_s = max_age_s
        self.finished_max_age_s = max(max_age_s, 5.0) if finished_max_age_s is None else finished_max_age_s
        self._records: OrderedDict[int, Record] = OrderedDict()
        self._reading: dict[int, asyncio.Task[dict[int, Record]]] = {}
        self.database_reads = 0  # how many times records were read (tests and benchmarks watch it)
        # Pages of job ids (GET /jobs): (status, cursor, limit, project) -> (ids, next cursor, read at).
        self._lists: OrderedDict[tuple[Any, ...], tuple[list[int], int | None, float]] = OrderedDict()
        self._listing: dict[tuple[Any, ...], asyncio.Task[tuple[list[int], int | None]]] = {}

    def _max_age(self, record: Record) -> float:
        return self.finished_max_age_s if record.finished else self.max_age_s

    def _fresh(self, record: Record | None, now: float) -> bool:
        return record is not None and now - record.read_at <= self._max_age(record)

    def peek(self, job_id: int) -> Record | None:
        """The copy in memory when it is fresh enough to answer with; None means: ask get().
        A copy past REFRESH_AHEAD of its max age is still served, and read again meanwhile."""
        record = self._records.get(job_id)
        if record is None:
            return None
        age, max_age = time.monotonic() - record.read_at, self._max_age(record)
        if age > max_age:
            return None
        if age > max_age * REFRESH_AHEAD and job_id not in self._reading and _in_event_loop():
            self._start_read([job_id])
        return record

    def peek_ids(
        self, status: JobStatus | None, cursor: int | None, limit: int, project_id: int | None = None
    ) -> tuple[list[int], int | None] | None:
        key = (status, cursor, limit, project_id)
        listed = self._lists.get(key)
        if listed is None:
            return None
        age = time.monotonic() - listed[2]
        if age > self.max_age_s:
            return None
        if age > self.max_age_s * REFRESH_AHEAD and key not in self._listing and _in_event_loop():
            self._start_list(key)
        return listed[0], listed[1]

    def put(self, record: Record) -> Record:
        kept = self._records.get(record.job_id)
        if kept is not None and kept.read_at > record.read_at:
            return kept  # a read that began before the copy kept (a cancel's, say) is older
        if self.capacity:
            self._records[record.job_id] = record
            self._records.move_to_end(record.job_id)
            while len(self._records) > self.capacity:
                self._records.popitem(last=False)
        return record

    def forget(self, job_id: int | None = None) -> None:
        """Drop a job's copy (and every list, which its change may reorder or refilter)."""
        if job_id is not None:
            self._records.pop(job_id, None)
            self._reading.pop(job_id, None)  # a read under way may predate the change: not kept
        self._lists.clear()
        self._listing.clear()

    async def job_ids(
        self,
        status: JobStatus | None,
        cursor: int | None,
        limit: int,
        project_id: int | None = None,
        *,
        fresh: bool = False,
    ) -> tuple[list[int], int | None]:
        """A page of job ids, newest first, as read at most RECORD_MAX_AGE_S ago; with
        `project_id`, that project's only."""
        key = (status, cursor, limit, project_id)
        listed = self._lists.get(key)
        if not fresh and listed is not None and time.monotonic() - listed[2] <= self.max_age_s:
            return listed[0], listed[1]
        return await asyncio.shield(self._listing.get(key) or self._start_list(key))

    def _start_list(self, key: tuple[Any, ...]) -> asyncio.Task[tuple[list[int], int | None]]:
        task = asyncio.get_running_loop().create_task(self._list_now(key))
        task.add_done_callback(_retrieve)
        self._listing[key] = task
        return task

    async def _list_now(self, key: tuple[Any, ...]) -> tuple[list[int], int | None]:
        started, this = time.monotonic(), asyncio.current_task()
        try:
            ids, next_cursor = await run_db(list_job_ids, *key)
        finally:
            kept = self._listing.get(key) is this  # else forget() came since: the page may be old
            if kept:
                del self._listing[key]
        if kept and self.capacity:
            self._lists[key] = (ids, next_cursor, started)
            while len(self._lists) > LISTS_KEPT:
                self._lists.popitem(last=False)
        return ids, next_cursor

    async def get(self, job_id: int, *, fresh: bool = False) -> Record | None:
        """The record (None: no such job). `fresh` reads the database whatever the copy's age."""
        return (await self.get_many([job_id], fresh=fresh)).get(job_id)

    async def get_many(self, job_ids: Sequence[int], *, fresh: bool = False) -> dict[int, Record]:
        now = time.monotonic()
        found: dict[int, Record] = {}
        missing: list[int] = []
        for job_id in job_ids:
            record = self._records.get(job_id)
            if not fresh and record is not None and self._fresh(record, now):
                self._records.move_to_end(job_id)
                found[job_id] = record
            else:
                missing.append(job_id)
        if missing:
            found.update(await self._read(missing))
        return found

    async def _read(self, job_ids: list[int]) -> dict[int, Record]:
        """Read these records, sharing a read already under way for any of them."""
        tasks = {self._reading[job_id] for job_id in job_ids if job_id in self._reading}
        todo = [job_id for job_id in job_ids if job_id not in self._reading]
        if todo:
            tasks.add(self._start_read(todo))
        read: dict[int, Record] = {}
        for task in tasks:
            read.update(await asyncio.shield(task))
        return {job_id: read[job_id] for job_id in job_ids if job_id in read}

    def _start_read(self, job_ids: list[int]) -> asyncio.Task[dict[int, Record]]:
        task = asyncio.get_running_loop().create_task(self._read_now(job_ids))
        task.add_done_callback(_retrieve)
        self._reading.update(dict.fromkeys(job_ids, task))
        return task

    async def _read_now(self, job_ids: list[int]) -> dict[int, Record]:
        this = asyncio.current_task()
        try:
            self.database_reads += 1
            read = await run_db(read_records, job_ids)
        finally:
            kept = [job_id for job_id in job_ids if self._reading.get(job_id) is this]  # not forgotten since
            for job_id in kept:
                del self._reading[job_id]
        for job_id in kept:
            if job_id in read:
                self.put(read[job_id])
            else:  # deleted meanwhile
                self._records.pop(job_id, None)
        return read


_caches: dict[tuple[str, int, float, float], RecordCache] = {}


def get_record_cache() -> RecordCache:
    """This process's cache for the configured database (tests switch databases and settings)."""
    settings = get_settings()
    key = (
        settings.sqlalchemy_url,
        settings.record_cache_size,
        settings.record_max_age_s,
        settings.finished_record_max_age_s,
    )
    if key not in _caches:
        _caches.clear()
        _caches[key] = RecordCache(*key[1:])
    return _caches[key]


def wants_fresh(cache_control: str | None) -> bool:
    return bool(cache_control) and any(
        part.strip().lower() in ("no-cache", "max-age=0") for part in (cache_control or "").split(",")
    )


def matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 weak comparison of If-None-Match against our (strong) ETag."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == etag for tag in if_none_match.split(","))


def unknown_fields(names: Sequence[str]) -> list[str]:
    return [name for name in names if name not in RECORD_FIELDS]


def projection(record: Record, names: Sequence[str] | None) -> tuple[bytes, str]:
    """The body to send, and its ETag: the whole record, or only the fields asked for."""
    if not names:
        return record.body, record.etag
    body = record.fields(names)
    return body, etag_of(body)


def page_body(bodies: Sequence[bytes], cursor_name: str, cursor: int | None) -> bytes:
    """`{"items": [...], "<cursor_name>": ...}` from items already serialized."""
    return b'{"items":[' + b",".join(bodies) + b'],"' + cursor_name.encode() + b'":' + orjson.dumps(cursor) + b"}"


def job_list(
    ids: Sequence[int], next_cursor: int | None, found: dict[int, Record], names: Sequence[str] | None
) -> tuple[bytes, str]:
    """GET /jobs's body and ETag. The ETag comes from the records' own (a page is what its
    records are), which costs far less than hashing a page of fifty records."""
    listed = [found[job_id] for job_id in ids if job_id in found]
    body = page_body([projection(record, names)[0] for record in listed], "next_cursor", next_cursor)
    tag = ",".join([*(record.etag for record in listed), ",".join(names or ()), str(next_cursor)])
    return body, etag_of(tag.encode())


def conditional(body: bytes, etag: str, if_none_match: str | None) -> Response:
    """The body with its ETag, or 304 when the client already has it. `no-cache`: a client or
    proxy that keeps a copy must ask again (with If-None-Match) before using it."""
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


def as_dict(body: bytes) -> Any:
    return orjson.loads(body)
