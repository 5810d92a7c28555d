"""What every wait before a job starts shares (the disk: worker/diskguard.py; the GPUs:
worker/gpus.py): it ends when the worker is asked to stop, or when the job is no longer queued."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from core.models import Job, JobStatus


@contextmanager
def until_worker_stops() -> Iterator[threading.Event]:
    """An event set by the worker's stop (its SIGTERM, passed to the work horse as SIGUSR2) while
    the job waits. In the horse's main thread only: tests run the task in a thread too."""
    stop = threading.Event()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGUSR2, lambda *_: stop.set()) if in_main_thread else None
    try:
        yield stop
    finally:
        if in_main_thread:
            signal.signal(signal.SIGUSR2, previous)


def still_queued(job: Job | None) -> bool:
    """Whether a waiting job should go on waiting: not cancelled, paused, deleted or taken."""
    return job is not None and job.status == JobStatus.queued and job.deleted_at is None
