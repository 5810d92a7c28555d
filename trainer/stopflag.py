"""The flag that stops training at the next step. Kept free of heavy imports: the trainer
creates it before `import unsloth`, which must precede transformers."""

from __future__ import annotations

import os
import threading


class StopFlag:
    """Set from a signal handler (cancel, pause, SIGTERM) or when the worker that started us is
    gone. Every reason but a cancel saves a checkpoint first, so the job continues from there."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None
        self._parent_pid = os.getppid()

    def set(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    @property
    def saves_checkpoint(self) -> bool:
        return self._event.is_set() and self.reason in ("paused", "terminated")

    def should_stop(self) -> bool:
        if not self._event.is_set() and os.getppid() != self._parent_pid:
            self.set("worker_lost")
        return self._event.is_set()
