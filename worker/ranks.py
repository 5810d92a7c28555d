"""The processes of a job on several GPUs: one trainer per rank, started by the work horse with
the environment torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), so PyTorch's own DDP or FSDP (through accelerate and the Trainer)
runs them. The horse starts them itself rather than through torchrun's elastic agent because it
must know exactly which rank failed and read that rank's log, stop every rank at a cancel, and
leave no rank holding a GPU: a job's ranks are one unit, as one trainer process is.

The group looks to TrainerWatch like one child process (poll, send_signal, kill)."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from worker.forkserver import fork_trainer
from worker.standby import AdoptedTrainer

logger = logging.getLogger(__name__)

# After one rank fails, the others get this long to end on their own (they fail at their next
# collective) before they are killed.
SIBLING_GRACE_S = 10.0
RANK_LOG_TAIL_LINES = 15


def rank_log(job_dir: Path, rank: int) -> Path:
    """Rank 0 writes trainer.log, as a single trainer does; the others trainer-rank<N>.log."""
    return job_dir / ("trainer.log" if rank == 0 else f"trainer-rank{rank}.log")


def start_trainer(job_id: int, env: dict[str, str], workdir: Path | str, log_path: Path) -> subprocess.Popen[bytes]:
    """`python -m trainer <job id>` as a process of its own, its output appended to `log_path`: a
    job's one trainer, a rank started by the work horse, or one a Ray worker starts. A new session:
    Ctrl-C on the worker's terminal must not kill training mid-step."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "trainer", str(job_id)],
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class RankFailure:
    rank: int
    returncode: int


def first_cause(failed: list[tuple[int, int]]) -> tuple[int, int]:
    """Of the (rank, exit code) pairs seen ended in one poll, the one that failed first: a rank killed
    by a signal (nothing of ours has signalled the ranks yet) rather than one that exited with an
    error, which is how a rank ends when it loses a peer (gloo's "Connection reset by peer");
    otherwise the lowest rank."""
    return min(failed, key=lambda failure: (failure[1] > 0, failure[0]))


class RankGroup:
    def __init__(
        self,
        job_id: int,
        world_size: int,
        env: dict[str, str],
        job_dir: Path,
        workdir: Path,
        forkserver: str | None = None,
    ) -> None:
        """`forkserver`: the trainer fork server's socket (TRAINER_FORKSERVER, a host without GPUs),
        which forks each rank's trainer; a rank it cannot give is started as a process of its own."""
        self.job_id = job_id
        self.job_dir = job_dir
        self.world_size = world_size
        self.first_failure: RankFailure | None = None
        self._failed_at: float | None = None
        self.returncode: int | None = None
        port = free_port()
        self.processes: list[subprocess.Popen[bytes] | AdoptedTrainer] = []
        for rank in range(world_size):
            rank_env = {
                **env,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_WORLD_SIZE": str(world_size),
                "GROUP_RANK": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
            if forkserver:
                forked = fork_trainer(forkserver, job_id, workdir, rank_env, log=rank_log(job_dir, rank).name)
                if forked is not None:
                    self.processes.append(forked)
                    continue
            self.processes.append(start_trainer(job_id, rank_env, workdir, rank_log(job_dir, rank)))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def poll(self) -> int | None:
        """None while any rank runs. Once one fails, the rest are stopped; the group's code is
        rank 0's when every rank ended well, else the first failed rank's."""
        if self.returncode is not None:
            return self.returncode
        codes = [p.poll() for p in self.processes]
        failed = [(rank, code) for rank, code in enumerate(codes) if code is not None and code != 0]
        if failed and self.first_failure is None:
            rank, code = first_cause(failed)
            self.first_failure = RankFailure(rank, code)
            self._failed_at = time.monotonic()
            logger.warning("job %s: rank %d ended with %s; stopping the other ranks", self.job_id, rank, code)
            self.send_signal(signal.SIGTERM)
        if self._failed_at is not None and time.monotonic() - self._failed_at > SIBLING_GRACE_S:
            self.kill()
        if any(code is None for code in codes):
            return None
        self.returncode = self.first_failure.returncode if self.first_failure is not None else codes[0]
        return self.returncode

    def send_signal(self, sig: int) -> None:
        for process in self.processes:
            if process.poll() is None:
                try:
                    process.send_signal(sig)
                except ProcessLookupError:
                    continue

    def send_signal_to(self, pid: int, sig: int) -> None:
        for process in self.processes:
            if process.pid == pid and process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout_s: float) -> int | None:
        deadline = time.monotonic() + timeout_s
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.poll()

    def failure_report(self) -> str | None:
        """Which rank failed and the end of its log, for the job's error message."""
        failure = self.first_failure
        if failure is None:
            return None
        if failure.returncode < 0:
            how = f"was killed by {signal.Signals(-failure.returncode).name}"
        else:
            how = f"exited with code {failure.returncode}"
        log = rank_log(self.job_dir, failure.rank)
        try:
            lines = log.read_text(errors="replace").splitlines()[-RANK_LOG_TAIL_LINES:]
        except FileNotFoundError:
            lines = []
        tail = "\n".join(lines)
        shown = f" Last lines of {log.name}:\n{tail}\n" if tail else " "
        return f"Rank {failure.rank} of {self.world_size} {how}; the other ranks were stopped.{shown}"
