"""The standby trainer: the worker starts the next job's trainer process before the job comes
(`python -m trainer --standby`), so the 30 s of importing Unsloth, torch and TRL are done when
it does (TRAINER_STANDBY; on by default where the worker sees a GPU).

The worker (RQ's main process) owns the standby: it starts one at start-up and, once a job has
taken it and ended its first step, the next one, importing while that job runs (NextStandby; after
the job where TRAINER_STANDBY_DURING_JOB is off), and reaps the used ones. The work horse that
runs a job inherits the standby's pid and stdin at its fork, hands it the job on that stdin, and
watches it as it would its own child. It is not the horse's child, so the horse reads its exit
status from /proc while it is a zombie (the worker reaps it only after the horse has ended).
When the worker is idle it asks its standby to load the last job's model on that same stdin
(`offer_preload`, TRAINER_STANDBY_PRELOAD), and keeps that model's name for the standby it starts
after a restart (`last_model_file`).

On a host without GPUs, where TRAINER_FORKSERVER names a trainer fork server, the standby is a
fork of that server (ForkedStandby), whose imports are done: it costs a fork, not a process that
imports everything again. Its stdin is a pipe whose write end the server sends the worker; the
server keeps its exit status while the horse named in its taken marker lives (trainer/forkserver.py).
Where the server does not answer, and on GPU hosts (CUDA cannot cross a fork), the standby is
`python -m trainer --standby`, the worker's child."""

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
from typing import Any, BinaryIO

from core.config import get_settings
from core.contract import PROGRESS_FILE
from worker import gpus

logger = logging.getLogger(__name__)

# The room on the card below which no standby starts while a job runs: an idle standby's CUDA
# context (measured on an H100: docs/benchmarks.md) and a margin for the job's own fluctuations.
STANDBY_GPU_ROOM_BYTES = 2 * 2**30


class Standby:
    """The worker's side: the standby process, started (or asked of the trainer fork server at
    `forkserver`) and reaped here."""

    def __init__(self, env: dict[str, str], folder: Path, forkserver: str | None = None) -> None:
        self.env = env
        self.folder = folder
        self.forkserver = forkserver
        self.process: StandbyProcess | None = None
        self.retired: list[StandbyProcess] = []

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
        self.process = self.fork() or self.start()
        if self.process is None:
            return
        global CURRENT
        CURRENT = self.process.pid, self.process.stdin.fileno() if self.process.stdin else -1

    def fork(self) -> ForkedStandby | None:
        """A standby forked by the trainer fork server, or None (no server, or it does not answer)."""
        if not self.forkserver:
            return None
        from worker.forkserver import fork_standby  # (that module imports this one)

        forked = fork_standby(self.forkserver, self.env, self.folder / "standby.log", taken_folder())
        if forked is not None:
            logger.info("standby trainer forked by the trainer fork server (pid %s)", forked.pid)
        return forked

    def start(self) -> subprocess.Popen[bytes] | None:
        """`python -m trainer --standby`, a process of its own that does its imports."""
        workdir = tempfile.mkdtemp(prefix="trainer-standby-")
        try:
            with open(self.folder / "standby.log", "ab") as log:
                process = subprocess.Popen(
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
            return None
        logger.info("standby trainer started (pid %s)", process.pid)
        return process

    def offer_preload(self, request: dict[str, Any]) -> bool:
        """Ask the unused standby to load `request`'s model while it waits (trainer/preload.py): a
        line on its stdin, which it reads once its imports are done. False when there is none."""
        process = self.process
        if process is None or process.stdin is None or process.poll() is not None or taken_marker(process.pid).exists():
            return False
        try:
            process.stdin.write(json.dumps({"preload": request}).encode() + b"\n")
            process.stdin.flush()
        except (OSError, ValueError) as exc:  # it died meanwhile, or its stdin was handed on
            logger.info("could not ask the standby trainer to preload a model (%s)", exc)
            return False
        logger.info("standby trainer (pid %s) asked to preload %s", process.pid, request["model"])
        return True

    def reap(self) -> None:
        """Collect used standbys that have ended (an exec'd one is our zombie until then; a forked
        one's status is the fork server's, which keeps it while the horse lives)."""
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


def last_model(job_id: int) -> dict[str, Any] | None:
    """What the job's trainer loaded, as a preload request ({"model", "backend", "max_seq_length"}),
    or None: a job of several ranks, or one that ended before it chose its backend."""
    from core.db import session_scope
    from core.models import Job
    from core.spec import JobSpec

    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or not job.backend or int((job.placement or {}).get("world_size") or 1) != 1:
            return None
        try:
            spec = JobSpec.model_validate(job.spec)
        except ValueError:
            return None
        return {"model": spec.model, "backend": job.backend, "max_seq_length": spec.hyperparameters.max_seq_length}


def remember_last_model(folder: Path, request: dict[str, Any]) -> None:
    """The worker's last model, offered again to the standby it starts after a restart (a full
    disk loses only that: the worker's loop must go on)."""
    note = last_model_file(folder)
    try:
        note.parent.mkdir(parents=True, exist_ok=True)
        note.write_text(json.dumps(request))
    except OSError as exc:
        logger.warning("could not note the last job's model for the next standby (%s)", exc)


def remembered_model(folder: Path) -> dict[str, Any] | None:
    try:
        request = json.loads(last_model_file(folder).read_text())
    except (OSError, ValueError):
        return None
    return request if isinstance(request, dict) and {"model", "backend", "max_seq_length"} <= set(request) else None


def last_model_file(folder: Path) -> Path:
    """One per card: the workers of one host share DATA_DIR."""
    return folder / (f"last-model-gpu{CARD}.json" if CARD is not None else "last-model.json")


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


def taken_folder() -> Path:
    return get_settings().data_dir.resolve() / "standby"


def taken_marker(pid: int) -> Path:
    """Written by the horse when it hands the standby a job, so the worker does not offer it again,
    and so the trainer fork server keeps a forked standby's exit status for that horse."""
    return taken_folder() / f"{pid}.taken"


def mark_taken(pid: int, job_id: int) -> None:
    """The taken marker of standby `pid`: the job, and this process as the horse that watches it
    (read by the fork server: trainer/forkserver.taken_by)."""
    taken_marker(pid).parent.mkdir(parents=True, exist_ok=True)
    taken_marker(pid).write_text(json.dumps({"job_id": job_id, "horse": os.getpid()}))


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


class ForkedStandby(AdoptedTrainer):
    """A standby trainer the fork server forked: what the worker uses of an exec'd standby's Popen
    (pid, poll, wait, kill, and stdin: the pipe its job goes down, whose write end the server sent).
    Not the worker's child: its exit status is read from /proc, as the horse reads it."""

    def __init__(self, pid: int, job_in: int) -> None:
        super().__init__(pid)
        os.set_inheritable(job_in, False)  # as a Popen's pipe: for the horse's fork, never an exec
        self.stdin: BinaryIO | None = open(job_in, "wb")  # noqa: SIM115 (closed as a Popen's stdin is)


# What the worker holds of its standby, of either kind.
StandbyProcess = subprocess.Popen[bytes] | ForkedStandby


def adopt(job_id: int, workdir: Path) -> AdoptedTrainer | None:
    """In the horse: hand the worker's standby this job, or None when there is none to take."""
    if CURRENT is None:
        return None
    pid, stdin = CURRENT
    state = process_state(pid)
    if stdin < 0 or state is None or state[0] in ("Z", "X") or taken_marker(pid).exists():
        return None
    mark_taken(pid, job_id)  # before the job is written: the fork server relies on that order
    message = json.dumps({"job_id": job_id, "parent_pid": os.getpid(), "workdir": str(workdir)}) + "\n"
    try:
        os.write(stdin, message.encode())
        os.close(stdin)
    except OSError as exc:  # it died meanwhile
        logger.warning("job %s: the standby trainer (pid %s) could not take it: %s", job_id, pid, exc)
        return None
    logger.info("job %s: handed to the standby trainer (pid %s)", job_id, pid)
    return AdoptedTrainer(pid)
