"""How a worker tells its trainer to stop (cancel, pause, the worker's own stop), so that no request
is ever lost to a signal that came too early or meant something else.

A request is two things: a file in the job's folder naming the strongest reason asked for, which
the trainer reads at every step (and micro-batch) and before it starts training, and a signal that
makes a trainer between steps (loading a model, say) look now. The worker signals a trainer process
only once that process has said it can take signals (its `ready/<pid>` marker, written after its
handlers are installed): a signal that arrives before the handlers exist would kill it instead."""

from __future__ import annotations

import os
import signal
from pathlib import Path

# Weakest first: a stronger request replaces a weaker one (a cancel after a pause cancels; a pause
# while the worker stops pauses rather than requeues). The ranks of a job agree on the strongest.
STOP_REASONS = ("terminated", "worker_lost", "paused", "cancelled")
# The signal that carries each request to a trainer that is ready for it.
SIGNALS = {"cancelled": signal.SIGUSR1, "paused": signal.SIGUSR2, "terminated": signal.SIGTERM}
REQUEST_FILE = "stop-request"
READY_DIR = "ready"


def stronger(first: str | None, second: str | None) -> str | None:
    """The stronger of two reasons (None is weakest; an unknown reason is weaker than any known)."""
    if first is None or second is None:
        return first or second
    rank = {reason: index for index, reason in enumerate(STOP_REASONS)}
    return first if rank.get(first, -1) >= rank.get(second, -1) else second


def write_request(job_dir: Path, reason: str) -> None:
    """Ask the job's trainer to stop for `reason` (atomically: a reader sees the old or the new word)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    temporary = job_dir / f"{REQUEST_FILE}.tmp"
    temporary.write_text(reason)
    temporary.replace(job_dir / REQUEST_FILE)


def read_request(job_dir: Path) -> str | None:
    try:
        return (job_dir / REQUEST_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


def mark_ready(job_dir: Path, pid: int | None = None) -> None:
    """Written by a trainer process once its signal handlers are installed."""
    folder = job_dir / READY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / str(pid or os.getpid())).touch()


def is_ready(job_dir: Path, pid: int) -> bool:
    return (job_dir / READY_DIR / str(pid)).exists()


def clear(job_dir: Path) -> None:
    """Before a new attempt's trainer starts: no request or marker of an earlier attempt applies."""
    (job_dir / REQUEST_FILE).unlink(missing_ok=True)
    folder = job_dir / READY_DIR
    if folder.is_dir():
        for marker in folder.iterdir():
            marker.unlink(missing_ok=True)
