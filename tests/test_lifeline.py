"""One trainer per job: the job lock, and how the next attempt's trainer stops an earlier one
that is still running (SIGTERM, then SIGKILL after the grace period)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.checkpoint_store import trainer_running
from trainer.lifeline import take_job_lock

# A stand-in for an earlier attempt's trainer: its command line ends in `trainer <job id>`
# as a real one's does, it holds the job lock, and it stops on SIGTERM (or, with "stubborn",
# ignores it).
HOLDER = """
import fcntl, os, signal, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.lockf(fd, fcntl.LOCK_EX)
os.pwrite(fd, str(os.getpid()).encode(), 0)
if sys.argv[2] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(60)
"""


def start_holder(job_dir: Path, job_id: int, mode: str) -> subprocess.Popen[str]:
    job_dir.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(job_dir / "trainer.lock"), mode, "trainer", str(job_id)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
    holder.stdout.close()  # nothing more comes; a pipe left open is a ResourceWarning
    return holder


def test_the_lock_is_free_when_no_trainer_runs(tmp_path: Path) -> None:
    assert not trainer_running(tmp_path)
    take_job_lock(tmp_path, 7, grace_s=1)
    # Held by this process now; another process sees it taken, and a probe does not take it.
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "from pathlib import Path; from core.checkpoint_store import "
            f"trainer_running; print(trainer_running(Path({str(tmp_path)!r})))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "True"


@pytest.mark.parametrize("mode", ["polite", "stubborn"])
def test_an_earlier_trainer_still_running_is_stopped_before_the_next_one_starts(mode: str, tmp_path: Path) -> None:
    holder = start_holder(tmp_path, 7, mode)
    waited_for: list[int | None] = []
    started = time.monotonic()
    take_job_lock(tmp_path, 7, grace_s=1.0, on_wait=waited_for.append)
    assert waited_for == [holder.pid]
    returncode = holder.wait(5)
    assert returncode == (-15 if mode == "polite" else -9)  # SIGTERM, or SIGKILL after the grace period
    assert (time.monotonic() - started >= 1.0) == (mode == "stubborn")
    assert (tmp_path / "trainer.lock").read_text().strip().isdigit()


def test_a_stale_pid_in_the_lock_file_is_never_signalled(tmp_path: Path) -> None:
    (tmp_path / "trainer.lock").write_text("1")  # pid 1, left in the file by a trainer long gone
    take_job_lock(tmp_path, 7, grace_s=0.1)  # the lock is free: nothing to stop, nobody signalled
