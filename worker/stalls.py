"""Progress, not process liveness: a trainer that is alive but takes no step (stopped with SIGSTOP,
stuck in a collective, waiting on a dead file system) keeps its worker's heartbeat fresh and would
stay `running` at the same step forever. The trainer touches its progress file at every step and
micro-batch (trainer/callbacks.JobReporter), and its step reaches the database at each logging
step (the only sign the worker sees of a rank 0 that Ray placed on another host); the worker looks
at both each poll, and after
STALL_AFTER_S of training without one it records a `stalled` event, sets the job's `stalled_since`
(the record's progress and GET /metrics show it) and, once steps come again, a `stall_ended` event."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col

from core.contract import PROGRESS_FILE, EventKind, Phase
from core.db import session_scope
from core.events import add_event
from core.models import Job, JobStatus

logger = logging.getLogger(__name__)

# /proc/<pid>/stat's state letters, as a person would say them.
PROCESS_STATES = {
    "R": "running",
    "S": "sleeping (waiting on something)",
    "D": "in uninterruptible sleep (waiting on a disk or a device)",
    "T": "stopped (SIGSTOP, or a debugger)",
    "t": "stopped by a debugger",
    "Z": "a zombie",
}


def process_state(pid: int) -> str:
    try:
        letter = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"
    return PROCESS_STATES.get(letter, f"in state {letter}")


class StallWatch:
    def __init__(self, job_id: int, job_dir: Path, stall_after_s: float) -> None:
        self.job_id = job_id
        self.progress_file = job_dir / PROGRESS_FILE
        self.stall_after_s = stall_after_s
        self.training_since: float | None = None  # wall time this attempt's phase last became `training`
        self.stalled_since: float | None = None  # wall time of the last progress, while stalled
        self.step_seen: tuple[int | None, float] | None = None  # the job's step, and when it was first seen

    def clear(self) -> None:
        """Before a new attempt's trainer starts."""
        self.progress_file.unlink(missing_ok=True)
        self.training_since = self.stalled_since = None
        self.step_seen = None

    def last_progress(self) -> float | None:
        try:
            touched: float | None = self.progress_file.stat().st_mtime
        except FileNotFoundError:
            touched = None
        stepped = self.step_seen[1] if self.step_seen is not None else None
        return max(filter(None, (touched, stepped, self.training_since)), default=None)

    def observe(self, phase: str | None, step: int | None, pids: list[int]) -> None:
        if phase != Phase.training:
            # Evaluating, saving or still starting: no steps are due. The clock starts again when
            # training does.
            self.training_since = None
            return
        now = time.time()
        if self.training_since is None:
            self.training_since = now
        if self.step_seen is None or step != self.step_seen[0]:
            self.step_seen = (step, now)
        last = self.last_progress()
        if last is None:
            return
        if self.stalled_since is None and now - last > self.stall_after_s:
            self.stalled_since = last
            states = "; ".join(f"process {pid} is {process_state(pid)}" for pid in pids) or "no process"
            self.record(
                EventKind.stalled,
                f"no training step for {now - last:.0f} s (STALL_AFTER_S is {self.stall_after_s:.0f} s), at step "
                f"{step}: {states}. The job stays running; look at its trainer.log, or cancel it.",
                stalled_since=datetime.fromtimestamp(last, UTC),
            )
        elif self.stalled_since is not None and last > self.stalled_since:
            self.record(
                EventKind.stall_ended,
                f"training moves again (step {step}) after {last - self.stalled_since:.0f} s without a step",
                stalled_since=None,
            )
            self.stalled_since = None

    def record(self, kind: EventKind, message: str, *, stalled_since: datetime | None) -> None:
        logger.warning("job %s: %s", self.job_id, message)
        try:
            with session_scope() as session:
                session.execute(
                    update(Job)
                    .where(col(Job.id) == self.job_id, col(Job.status) == JobStatus.running)
                    .values(stalled_since=stalled_since)
                )
                add_event(session=session, job_id=self.job_id, kind=kind, message=message)
        except SQLAlchemyError as exc:
            logger.warning("job %s: could not record %s (%s)", self.job_id, kind, exc)
