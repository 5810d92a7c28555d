"""A process's name in /proc/PID/comm (what `top` and `ps -o comm` show), set by forks whose command
line is their parent's: the service zygote's API and workers, the trainer fork server's standby
trainers. scripts/cpu_by_process.py tells them apart by it."""

from __future__ import annotations

import ctypes

PR_SET_NAME = 15  # prctl's option (linux/prctl.h)
NAME_BYTES = 15  # the kernel keeps 15 bytes and a NUL


def name_process(name: str | bytes) -> None:
    raw = name.encode() if isinstance(name, str) else name
    ctypes.CDLL(None).prctl(PR_SET_NAME, raw[:NAME_BYTES], 0, 0, 0)
