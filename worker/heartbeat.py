"""The job's heartbeat, written by a thread of the work horse.

The reconciler (core/reconcile.py) takes a running job whose `heartbeat_at` is older than
STALE_AFTER_S away from its worker: queued again, or failed `worker_lost`. When the horse's
watch loop wrote the heartbeat itself, anything that held the loop up for that long lost a
live job: connecting to a Ray cluster (seconds, more on a loaded host), a Ray call that waits for
its actor, a write that waits for SQLite's lock while a trainer logs steps. So the beat has a
thread of its own, from before the trainer starts until the job's end is recorded.

A thread alone would keep a hung horse's job forever, so it beats only while the horse shows
signs of life: the watch loop calls `alive()` each time round, and the thread stops beating once
the loop has not come round for HUNG_AFTER_BEATS heartbeat intervals. Starting the trainer and
recording the job's end are given STARTING_ALLOWANCE_S instead (`allow(seconds)`)."""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col

from core.db import session_scope
from core.models import Job, JobStatus, utcnow

logger = logging.getLogger(__name__)

# The watch loop comes round every second; ten heartbeat intervals without it is a hung horse.
HUNG_AFTER_BEATS = 10
# Starting the trainer (a Ray cluster's placement group, a standby's hand-over) and recording the
# job's end (which waits for disk space on a full disk) have no loop to come round.
STARTING_ALLOWANCE_S = 300.0


class Heartbeat:
    def __init__(self, job_id: int, interval_s: float) -> None:
        self.job_id = job_id
        self.interval_s = interval_s
        self._deadline = time.monotonic() + STARTING_ALLOWANCE_S
        self._stopped = threading.Event()
        self._trouble_since: float | None = None
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stopped.set()
        self._thread.join(timeout=self.interval_s + 5)

    def alive(self) -> None:
        """The watch loop came round: keep beating for HUNG_AFTER_BEATS more intervals."""
        self._deadline = time.monotonic() + HUNG_AFTER_BEATS * self.interval_s

    def allow(self, seconds: float) -> None:
        """A step without a loop (starting the trainer, recording the end) may take this long."""
        self._deadline = time.monotonic() + seconds

    @property
    def beating(self) -> bool:
        return time.monotonic() < self._deadline

    def _run(self) -> None:
        while not self._stopped.wait(self.interval_s):
            if not self.beating:
                continue  # a hung horse: let the reconciler have its job
            self.beat()

    def beat(self) -> None:
        """One write of `heartbeat_at`, only while the job runs (a finished or requeued job keeps
        what its end wrote). A database that cannot be written is logged once until it can."""
        try:
            with session_scope() as session:
                session.execute(
                    update(Job)
                    .where(col(Job.id) == self.job_id, col(Job.status) == JobStatus.running)
                    .values(heartbeat_at=utcnow())
                )
        except SQLAlchemyError as exc:
            if self._trouble_since is None:
                self._trouble_since = time.monotonic()
                logger.warning("job %s: its heartbeat cannot be written (%s); trying again", self.job_id, exc)
            return
        if self._trouble_since is not None:
            took = time.monotonic() - self._trouble_since
            logger.info("job %s: its heartbeat is written again after %.0f s", self.job_id, took)
            self._trouble_since = None
