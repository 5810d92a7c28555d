"""Free space under DATA_DIR: the figures a person needs when a disk fills, the test for "this
failure was a full disk", and a small reserve file that is given up when the job database
cannot be written for lack of space, so that a job's final status still lands.

Shared by every process: the API (/healthz, uploads), the worker (a job's final status) and
the trainer (checking space before each checkpoint)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from core.config import get_settings

logger = logging.getLogger(__name__)

GIB = 1024**3
RESERVE_NAME = ".disk-reserve"
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# How full-disk failures read when the errno is lost on the way: SQLite's SQLITE_FULL, the
# OS's own text, and PyTorch's serializer, which reports a failed write without its errno.
FULL_MESSAGES = ("database or disk is full", "no space left on device", "disk quota exceeded", "file write failed")
RETRY_MAX_WAIT_S = 30.0

T = TypeVar("T")


def gib(value: int) -> str:
    """A size for people: GiB from one GiB up, MiB below."""
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / 1024**2:.1f} MiB"


@dataclass(frozen=True)
class DiskSpace:
    path: Path
    free_bytes: int
    total_bytes: int

    def describe(self) -> str:
        return f"{gib(self.free_bytes)} free of {gib(self.total_bytes)} on the disk holding {self.path}"


def disk_space(path: Path) -> DiskSpace:
    """Free and total bytes of the filesystem holding `path` (or its nearest existing parent)."""
    probe = path.resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    return DiskSpace(path, usage.free, usage.total)


def is_disk_full_error(exc: BaseException) -> bool:
    """Whether `exc`, or anything in its cause chain, is a write that failed for lack of space."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if getattr(current, "errno", None) in FULL_ERRNOS:
            return True
        if any(text in str(current).lower() for text in FULL_MESSAGES):
            return True
        current = current.__cause__ or current.__context__
    return False


def low_on_space(path: Path) -> DiskSpace | None:
    """The figures when the disk holding `path` has less than MIN_FREE_DISK_BYTES free, else None."""
    space = disk_space(path)
    return space if space.free_bytes < get_settings().min_free_disk_bytes else None


class Reserve:
    """A file of DISK_RESERVE_BYTES under DATA_DIR. It is created while there is room, and deleted
    when the job database reports a full disk, which gives the database room for the few rows
    that record how jobs ended."""

    def __init__(self, data_dir: Path, size: int) -> None:
        self.path = data_dir / RESERVE_NAME
        self.size = size

    @classmethod
    def for_settings(cls) -> Reserve:
        settings = get_settings()
        return cls(settings.data_dir.resolve(), settings.disk_reserve_bytes)

    def ensure(self) -> bool:
        """Create the reserve when it is missing and the disk has room for it and for the
        free-space margin. Returns whether it exists afterwards."""
        if self.size == 0:
            return False
        if self.path.exists():
            return True
        if disk_space(self.path.parent).free_bytes < self.size + get_settings().min_free_disk_bytes:
            return False
        partial = self.path.with_name(f"{RESERVE_NAME}.{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)  # real blocks, not a sparse file
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(partial, self.path)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            logger.warning("could not create the disk reserve %s: %s", self.path, exc)
            return False
        return True

    def release(self) -> bool:
        """Delete the reserve; True when there was one to give up."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        logger.warning(
            "the disk under DATA_DIR is full: released the %s reserve (%s) so the job database "
            "can record what happened",
            gib(self.size),
            self.path,
        )
        return True


def write_despite_full_disk(write: Callable[[], T], *, what: str, sleep: Callable[[float], None] = time.sleep) -> T:
    """Run `write` (a function that opens its own session and commits). When it fails because the
    disk is full, give up the reserve and try again; when that is not enough, keep trying with
    backoff until space returns, so the record is written late rather than never.

    When DATA_DIR's disk is already below MIN_FREE_DISK_BYTES the reserve is given up first: this
    write may still fit in pages SQLite's write-ahead log already holds (whether it does depends
    on where the log last wrapped), but the next ones, the API's included, would not."""
    reserve = Reserve.for_settings()
    released = low_on_space(reserve.path.parent) is not None and reserve.release()
    wait = 1.0
    while True:
        try:
            return write()
        except Exception as exc:
            if not is_disk_full_error(exc):
                raise
            if not released:
                released = True
                if reserve.release():
                    continue
            logger.error("cannot %s: the disk is full (%s); trying again in %.0f s", what, exc, wait)
            sleep(wait)
            wait = min(wait * 2, RETRY_MAX_WAIT_S)
