"""When the worker starts the next standby trainer while a job runs (worker/standby.NextStandby):
not before the job has taken the current one and ended its first step, and not at all when the
card is left without room for the idle standby's CUDA context. The standby here is a real process
(a `sleep`) and the job's marker and progress file are real files; only NVML's free memory is
given, since this machine has no GPU."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from core.contract import PROGRESS_FILE
from tests.conftest import Env
from worker import gpus
from worker import standby as standby_module
from worker.standby import STANDBY_GPU_ROOM_BYTES, NextStandby, Standby, taken_marker


@pytest.fixture
def offered(env: Env) -> Iterator[Standby]:
    standby = Standby({}, env.data_dir / "standby")
    standby.process = subprocess.Popen(["sleep", "60"])
    try:
        yield standby
    finally:
        standby.process.kill()
        standby.process.wait()


def test_the_next_standby_waits_for_the_jobs_first_step(offered: Standby, env: Env) -> None:
    assert offered.process is not None
    job_dir = env.data_dir / "jobs" / "7"
    job_dir.mkdir(parents=True)
    next_standby = NextStandby(offered, offered.process.pid, job_dir)
    assert next_standby.due() is False  # offered, not taken yet

    taken_marker(offered.process.pid).parent.mkdir(parents=True, exist_ok=True)
    taken_marker(offered.process.pid).write_text("7")
    assert next_standby.due() is False  # taken, no step yet (the trainer loads its model)
    (job_dir / PROGRESS_FILE).touch()
    assert next_standby.due() is False  # a micro-batch's touch, not a step's end
    (job_dir / PROGRESS_FILE).write_text("1")
    assert next_standby.due() is True


def test_no_standby_starts_during_a_job_that_left_the_card_too_little_room(
    offered: Standby, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert offered.process is not None
    job_dir = env.data_dir / "jobs" / "8"
    job_dir.mkdir(parents=True)
    (job_dir / PROGRESS_FILE).write_text("3")
    taken_marker(offered.process.pid).parent.mkdir(parents=True, exist_ok=True)
    taken_marker(offered.process.pid).write_text("8")
    monkeypatch.setattr(standby_module, "CARD", "0")
    free = {"bytes": STANDBY_GPU_ROOM_BYTES - 1}
    monkeypatch.setattr(gpus, "free_memory_bytes", lambda index: free["bytes"] if index == 0 else None)
    next_standby = NextStandby(offered, offered.process.pid, job_dir)
    assert next_standby.due() is None  # it starts when the job ends instead
    free["bytes"] = STANDBY_GPU_ROOM_BYTES
    assert next_standby.due() is True


def test_a_standby_that_died_unused_or_was_replaced_is_not_waited_for(offered: Standby, env: Env) -> None:
    assert offered.process is not None
    job_dir = env.data_dir / "jobs" / "9"
    job_dir.mkdir(parents=True)
    next_standby = NextStandby(offered, offered.process.pid, job_dir)
    offered.process.kill()
    offered.process.wait()
    assert next_standby.due() is True  # died before the job took it: replace it now
    assert NextStandby(offered, offered.process.pid + 1, job_dir).due() is None  # not the current one
