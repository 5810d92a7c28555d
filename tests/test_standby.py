"""The standby trainer (TRAINER_STANDBY): the worker starts the next job's trainer before the job
comes, with its imports done, and the job runs in it exactly as in a trainer started for it:
the same record, cancel and crash reports, and no process left behind.

The tests' hosts have no GPU and a trainer fork server (tests/conftest.py), so their standbys are
forks of it (trainer/forkserver.py); `python -m trainer --standby`, what a GPU host runs, is the
stopped worker's test's other case (and tests/faults/test_trainer_environment.py's)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from core.contract import FORKED_STANDBY_NAME
from scripts.service_harness import Service, standby_pids, wait_until
from tests.conftest import Env, job_spec

pytestmark = pytest.mark.slow


@pytest.fixture
def standby_service(env: Env, tmp_path: Path) -> Service:
    running = Service(
        tmp_path / "service",
        data_dir=env.data_dir,
        redis_url=env.redis_url,
        settings={**env.vars, "TRAINER_STANDBY": "1"},
    )
    try:
        yield running.start()
    finally:
        running.stop()
        print(running.logs())


def test_jobs_run_in_standby_trainers_started_ahead_of_them(
    env: Env, tmp_path: Path, tiny_model: Path, chat_dataset: Path
) -> None:
    """Each job runs in a standby trainer, and a job queued behind a running one finds a standby
    whose imports are done: the worker starts the next standby once a job has taken the current one
    and ended its first step (here the job is held in its third), not when the job ends."""
    service = Service(
        tmp_path / "service",
        data_dir=env.data_dir,
        redis_url=env.redis_url,
        settings={**env.vars, "TRAINER_STANDBY": "1", "FINETUNE_FAILPOINTS": "training_step@2=pause"},
    )
    log = env.data_dir / "standby" / "standby.log"
    try:
        service.start()
        [first] = wait_until(lambda: standby_pids(service.data_dir), 30, "the worker's standby trainer")
        spec = job_spec(tiny_model, chat_dataset, max_steps=3)
        running = service.submit(spec)
        held = service.wait_for_failpoint(running, "training_step")  # job 1's trainer, mid-step
        assert trainer_of(env, running) == first
        [following] = wait_until(
            lambda: [pid for pid in standby_pids(service.data_dir) if pid != first],
            60,
            "a standby started during the job",
        )
        wait_until(lambda: f"standby trainer (pid {following}) ready" in log.read_text(), 90, "its imports")
        assert service.job(running)["status"] == "running"  # all of that while job 1 was held

        queued = service.submit(spec)  # behind job 1, which still holds the GPU
        held.unlink()
        assert service.wait_for(running, timeout_s=120)["status"] == "succeeded"
        held = service.wait_for_failpoint(queued, "training_step")
        assert trainer_of(env, queued) == following  # (the marker goes once the job's trainer has ended)
        held.unlink()
        record = service.wait_for(queued, timeout_s=120)
        assert record["status"] == "succeeded", record["error"]
        for job_id, pid in ((running, first), (queued, following)):
            trainer_log = (env.data_dir / "jobs" / str(job_id) / "trainer.log").read_text()
            assert f"standby trainer (pid {pid}, " in trainer_log and f"takes job {job_id}" in trainer_log
            startup = [m for kind, m in service.events(job_id) if kind == "startup"]
            assert len(startup) == 1 and "importing" in startup[0]
        # Each job used up its standby; the next one waits, and the used ones have ended.
        used = {first, following}
        wait_until(
            lambda: len(pids := standby_pids(service.data_dir)) == 1 and pids[0] not in used, 60, "one fresh standby"
        )
    finally:
        service.stop()
        print(service.logs())


def trainer_of(env: Env, job_id: int) -> int:
    """The standby that took `job_id` (the work horse's marker, worker/standby.taken_marker)."""
    markers = (env.data_dir / "standby").glob("*.taken")
    taken = [int(p.stem) for p in markers if json.loads(p.read_text())["job_id"] == job_id]
    assert len(taken) == 1, f"job {job_id} was taken by {taken or 'no standby'}"
    return taken[0]


def test_cancel_and_a_killed_standby_trainer_are_reported_as_for_any_trainer(
    standby_service: Service, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    service = standby_service
    wait_until(lambda: standby_pids(service.data_dir), 30, "the worker's standby trainer")
    spec = job_spec(tiny_model, chat_dataset, max_steps=100_000, logging_steps=1, save_steps=100_000)
    job_id = service.submit(spec)
    service.wait_for_step(job_id, 2)
    with service.http() as http:
        assert http.post(f"/jobs/{job_id}/cancel").status_code == 200
    record = service.wait_for(job_id, timeout_s=60)
    assert record["status"] == "cancelled"
    assert record["error"]["message"] == f"cancelled by request at step {record['progress']['step']}"

    job_id = service.submit(spec)
    service.wait_for_step(job_id, 2)
    os.kill(trainer_of(env, job_id), signal.SIGKILL)  # the kernel's OOM killer, say
    record = service.wait_for(job_id, timeout_s=60)
    assert (record["status"], record["error"]["code"]) == ("failed", "trainer_crashed")
    assert record["error"]["message"].startswith("The trainer process was killed by SIGKILL")


@pytest.mark.parametrize("kind", ["forked", "exec"])
def test_a_stopped_worker_leaves_no_standby_behind(kind: str, env: Env, tmp_path: Path) -> None:
    """Of either kind: a fork of the trainer fork server, and `python -m trainer --standby`, what a
    GPU host's worker starts (here: without a fork server)."""
    settings = {**env.vars, "TRAINER_STANDBY": "1"}
    if kind == "exec":
        settings["TRAINER_FORKSERVER"] = ""
    service = Service(tmp_path / "service", data_dir=env.data_dir, redis_url=env.redis_url, settings=settings)
    try:
        service.start()
        [standby] = wait_until(lambda: standby_pids(service.data_dir), 30, "the worker's standby trainer")
        forked = Path(f"/proc/{standby}/comm").read_text().strip() == FORKED_STANDBY_NAME
        assert forked == (kind == "forked")
        service.worker.send_signal(signal.SIGTERM)
        assert service.worker.wait(60) == 0
        wait_until(lambda: not Path(f"/proc/{standby}").exists(), 30, "the standby trainer to exit")
    finally:
        service.stop()
        print(service.logs())
