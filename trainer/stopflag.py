"""The flag that stops training at the next step. Kept free of heavy imports: the trainer
creates it before `import unsloth`, which must precede transformers."""

from __future__ import annotations

import os
from pathlib import Path

from core.stop_requests import REQUEST_FILE, stronger


class StopFlag:
    """Raised by a signal handler (cancel, pause, SIGTERM), by the worker's request file (read at
    every check, so a request whose signal was lost still lands), or when the worker that started
    us is gone. A stronger reason replaces a weaker one (core/stop_requests.STOP_REASONS). Every
    reason but a cancel saves a checkpoint first, so the job continues from there.

    In a job of several ranks the flag is `synced`: what this rank saw (`requested`) only counts
    once the ranks have agreed on it at a step's end (`agree`, trainer/distributed.RankSync), so
    every rank stops at the same step."""

    def __init__(self, job_dir: Path | None = None) -> None:
        self.requested: str | None = None
        self.agreed: str | None = None
        self.synced = False
        self._parent_pid = os.getppid()
        self._request_file = job_dir / REQUEST_FILE if job_dir is not None else None

    def set(self, reason: str) -> None:
        self.requested = stronger(self.requested, reason)

    def sample(self) -> None:
        """Look at the sources that are not signals: the worker's request file, our parent."""
        if os.getppid() != self._parent_pid:
            self.set("worker_lost")
        if self._request_file is None:
            return
        # Read whole each time (a few microseconds, and almost always absent): a file's mtime is
        # too coarse to tell a pause from a cancel written just after it.
        try:
            reason = self._request_file.read_text().strip()
        except FileNotFoundError:
            return
        if reason:
            self.set(reason)

    def agree(self, reason: str | None) -> None:
        self.agreed = stronger(self.agreed, reason)

    @property
    def reason(self) -> str | None:
        return self.agreed if self.synced else self.requested

    @property
    def saves_checkpoint(self) -> bool:
        return self.reason in ("paused", "terminated")

    def should_stop(self) -> bool:
        if not self.synced:
            self.sample()
        return self.reason is not None
