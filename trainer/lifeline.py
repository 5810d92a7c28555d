"""What ties a trainer process to its job and to the worker that started it, so that no trainer
outlives its worker unnoticed and no two trainers of one job ever run at once.

- The kernel sends the trainer SIGHUP when the work horse that started it dies
  (PR_SET_PDEATHSIG), however it dies: a trainer never trains on for a worker that is gone. (Not
  SIGTERM, which asks for a checkpoint first: a worker stopped the hard way wants no delay.)
- The trainer holds an exclusive POSIX lock on `<job dir>/trainer.lock` for its whole life (the
  kernel releases it when the process ends, even by SIGKILL; unlike flock, processes the trainer
  forks, such as dataset workers, do not inherit it). The next attempt's trainer takes the lock
  before it touches the job's checkpoints; if an earlier trainer of the job still holds it, it is
  asked to stop (SIGTERM), then killed after the grace period."""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from core.checkpoint_store import TRAINER_LOCK

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
POLL_S = 0.2


def die_with_parent(parent_pid: int | None) -> None:
    """Ask the kernel for SIGHUP when our parent dies (Linux); if it already has, raise it now."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGHUP, 0, 0, 0) != 0:
            logger.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGHUP)


def watch_parent(parent_pid: int, interval_s: float = 0.5) -> None:
    """What PR_SET_PDEATHSIG does, for a standby trainer whose job's work horse is not its parent:
    SIGHUP to this process once `parent_pid` is gone (a thread polls for it)."""

    def poll() -> None:
        while True:
            time.sleep(interval_s)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os.kill(os.getpid(), signal.SIGHUP)
                return
            except PermissionError:  # alive, someone else's (pid reused): keep watching
                continue

    import threading

    threading.Thread(target=poll, name="watch-parent", daemon=True).start()


def _is_trainer_of(pid: int, job_id: int) -> bool:
    """Whether `pid` is a trainer of this job (a pid read from a file may have been reused)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        return False
    # `python -m trainer <id>`; `worker.trainer` was its module before the trainer had its own package.
    # A standby trainer (`python -m trainer --standby`) and one forked by the fork server (whose
    # command line it keeps: `python -m trainer --forkserver SOCKET`) name their job only in the lock file.
    own = argv[-1:] == [str(job_id).encode()] and argv[-2:-1] in ([b"trainer"], [b"worker.trainer"])
    return own or argv[-2:] == [b"trainer", b"--standby"] or argv[-3:-1] == [b"trainer", b"--forkserver"]


def take_job_lock(
    job_dir: Path, job_id: int, *, grace_s: float, on_wait: Callable[[int | None], None] | None = None
) -> int:
    """Hold the job's trainer lock for the life of this process; returns its file descriptor
    (never closed: closing would release the lock). An earlier trainer holding it is stopped."""
    job_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(job_dir / TRAINER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # EAGAIN or EACCES: held
        holder = _read_pid(fd)
        if on_wait is not None:
            on_wait(holder)
        _stop_holder(fd, holder, job_id, grace_s)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def _stop_holder(fd: int, holder: int | None, job_id: int, grace_s: float) -> None:
    """SIGTERM the earlier trainer (it stops at its next step), SIGKILL it after `grace_s`, and
    take the lock once it is gone."""
    signalled = holder is not None and _is_trainer_of(holder, job_id)
    if signalled:
        assert holder is not None
        logger.warning("job %s: an earlier trainer (pid %s) still runs; asking it to stop", job_id, holder)
        os.kill(holder, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    killed = False
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError:
            pass
        if not killed and time.monotonic() > deadline and signalled:
            assert holder is not None
            logger.warning(
                "job %s: the earlier trainer (pid %s) did not stop in %.0f s; killing it", job_id, holder, grace_s
            )
            if _is_trainer_of(holder, job_id):
                os.kill(holder, signal.SIGKILL)
            killed = True
        time.sleep(POLL_S)
