"""The standby trainer: the worker starts the next job's trainer process before the job comes
(`python -m trainer --standby`), so the 30 s of importing Unsloth, torch and TRL are done when
it does (TRAINER_STANDBY; on by default where the worker sees a GPU).

The worker (RQ's main process) owns the standby: it starts one at start-up and, once a job has
taken it and ended its first step, the next one, importing while that job runs (NextStandby; after
the job where TRAINER_STANDBY_DURING_JOB is off), and reaps the used ones. The work horse that
runs a job inherits the standby's pid and stdin at its fork, hands it the job on that stdin, and
watches it as it would its own child. It is not the horse's child, so the horse reads its exit
status from /proc while it is a zombie (the worker reaps it only after the horse has ended)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from core.config import get_settings
from core.contract import PROGRESS_FILE
from worker import gpus

logger = logging.getLogger(__name__)

# The room on the card below which no standby starts while a job runs: an idle standby's CUDA
# context (measured on an H100: docs/benchmarks.md) and a margin for the job's own fluctuations.
STANDBY_GPU_ROOM_BYTES = 2 * 2**30


class Standby:
    """The worker's side: the standby process, started and reaped here."""

    def __init__(self, env: dict[str, str], folder: Path) -> None:
        self.env = env
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None
        self.retired: list[subprocess.Popen[bytes]] = []

    def ensure(self) -> None:
        """A live, unused standby exists after this (unless starting one failed)."""
        self.reap()
        if self.process is not None and self.process.poll() is None and not taken_marker(self.process.pid).exists():
            return
        if self.process is not None:
            if self.process.stdin is not None:
                self.process.stdin.close()  # the horse wrote its job; later horses must not inherit it
            self.retired.append(self.process)
        self.folder.mkdir(parents=True, exist_ok=True)
        workdir = tempfile.mkdtemp(prefix="trainer-standby-")
        try:
            with open(self.folder / "standby.log", "ab") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "trainer", "--standby"],
                    cwd=workdir,
                    stdin=subprocess.PIPE,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    start_new_session=True,  # Ctrl-C on the worker's terminal is not for it
                )
        except OSError as exc:
            logger.warning("could not start a standby trainer (%s); jobs start their own", exc)
            self.process = None
            return
        global CURRENT
        CURRENT = self.process.pid, self.process.stdin.fileno() if self.process.stdin else -1
        logger.info("standby trainer started (pid %s)", self.process.pid)

    def reap(self) -> None:
        """Collect used standbys that have ended (each becomes a zombie until then)."""
        for process in list(self.retired):
            if process.poll() is not None:
                taken_marker(process.pid).unlink(missing_ok=True)
                self.retired.remove(process)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None and not taken_marker(self.process.pid).exists():
            if self.process.stdin is not None:
                self.process.stdin.close()  # end of input: an idle standby exits
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


class NextStandby:
    """When the worker starts the next standby while a job runs (TRAINER_STANDBY_DURING_JOB): once
    the job has taken the current one and ended its first step, so that its memory has reached its
    peak, and only if the card then has room for another process's CUDA context (an idle standby
    holds one: STANDBY_GPU_ROOM_BYTES). Otherwise it starts when the job ends, as it always did."""

    def __init__(self, standby: Standby, offered: int, job_dir: Path) -> None:
        self.standby = standby
        self.offered = offered
        self.progress_file = job_dir / PROGRESS_FILE

    def due(self) -> bool | None:
        """True: start it now; False: not yet; None: not during this job."""
        process = self.standby.process
        if process is None or process.pid != self.offered:
            return None
        if not taken_marker(self.offered).exists():
            return process.poll() is not None  # still offered to the job, unless it died
        if not first_step_ended(self.progress_file):
            return False
        free = gpus.free_memory_bytes(int(CARD)) if CARD is not None else None
        if free is not None and free < STANDBY_GPU_ROOM_BYTES:
            logger.info(
                "%.1f GiB free on GPU %s after the job's first step: the next standby trainer starts when the job ends",
                free / 2**30,
                CARD,
            )
            return None
        return True


def first_step_ended(progress_file: Path) -> bool:
    """The trainer writes the step into its progress file at each step's end (trainer/callbacks.py)."""
    try:
        return int(progress_file.read_text() or 0) >= 1
    except (OSError, ValueError):
        return False


# (pid, stdin fd) of the worker's unused standby, read by the work horse forked from the worker.
CURRENT: tuple[int, int] | None = None
# The GPU the standby trainer was started on (its CUDA_VISIBLE_DEVICES), None for any: a job
# leased another card starts a trainer of its own.
CARD: str | None = None


def taken_marker(pid: int) -> Path:
    """Written by the horse when it hands the standby a job, so the worker does not offer it again."""
    return get_settings().data_dir.resolve() / "standby" / f"{pid}.taken"


def process_state(pid: int) -> tuple[str, int] | None:
    """(state letter, exit code field) from /proc/<pid>/stat; None once the process is reaped."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the comm field: state is field 3, exit_code field 52 (Linux 3.5+), so indexes 0 and 49.
    return fields[0], int(fields[49]) if len(fields) > 49 else 0


class AdoptedTrainer:
    """The horse's handle on a trainer that is not its child (a standby that took its job, one the
    fork server forked): what TrainerWatch, a rank's watch and the test harness use of a Popen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        state = process_state(self.pid)
        if state is None:  # reaped already: its status is lost
            self.returncode = -signal.SIGKILL
        elif state[0] in ("Z", "X"):
            status = state[1]
            self.returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def wait(self, timeout: float | None = None) -> int:
        """As Popen.wait: the exit code, or subprocess.TimeoutExpired after `timeout` seconds. Not
        our child: it polls /proc, where its parent keeps the status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0)
            time.sleep(0.02)
        return code


def adopt(job_id: int, workdir: Path) -> AdoptedTrainer | None:
    """In the horse: hand the worker's standby this job, or None when there is none to take."""
    if CURRENT is None:
        return None
    pid, stdin = CURRENT
    state = process_state(pid)
    if stdin < 0 or state is None or state[0] in ("Z", "X") or taken_marker(pid).exists():
        return None
    taken_marker(pid).parent.mkdir(parents=True, exist_ok=True)
    taken_marker(pid).write_text(str(job_id))
    message = json.dumps({"job_id": job_id, "parent_pid": os.getpid(), "workdir": str(workdir)}) + "\n"
    try:
        os.write(stdin, message.encode())
        os.close(stdin)
    except OSError as exc:  # it died meanwhile
        logger.warning("job %s: the standby trainer (pid %s) could not take it: %s", job_id, pid, exc)
        return None
    logger.info("job %s: handed to the standby trainer (pid %s)", job_id, pid)
    return AdoptedTrainer(pid)
