"""The standby trainer (TRAINER_STANDBY): the worker starts the next job's trainer before the job
comes, with its imports done, and the job runs in it exactly as in a trainer started for it:
the same record, cancel and crash reports, and no process left behind."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from scripts.service_harness import Service, process_tree, wait_until
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


def standby_pids(service: Service) -> list[int]:
    found = []
    for pid in process_tree(service.worker.pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--standby" in argv:
            found.append(pid)
    return found


def test_jobs_run_in_standby_trainers_started_ahead_of_them(
    standby_service: Service, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    service = standby_service
    first = wait_until(lambda: standby_pids(service), 30, "the worker's standby trainer")
    for _ in range(2):
        job_id = service.submit(job_spec(tiny_model, chat_dataset))
        record = service.wait_for(job_id, timeout_s=120)
        assert record["status"] == "succeeded", record["error"]
        log = (env.data_dir / "jobs" / str(job_id) / "trainer.log").read_text()
        assert "standby trainer (pid " in log and f"takes job {job_id}" in log
        startup = [m for kind, m in service.events(job_id) if kind == "startup"]
        assert len(startup) == 1 and "importing" in startup[0]
    # Each job used up its standby; the worker started another while it waited.
    latest = wait_until(lambda: standby_pids(service), 30, "a fresh standby trainer")
    assert latest != first and len(latest) == 1


def test_cancel_and_a_killed_standby_trainer_are_reported_as_for_any_trainer(
    standby_service: Service, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    service = standby_service
    wait_until(lambda: standby_pids(service), 30, "the worker's standby trainer")
    spec = job_spec(tiny_model, chat_dataset, max_steps=100_000, logging_steps=1, save_steps=100_000)
    job_id = service.submit(spec)
    service.wait_for_step(job_id, 2)
    with service.http() as http:
        assert http.post(f"/jobs/{job_id}/cancel").status_code == 200
    record = service.wait_for(job_id, timeout_s=60)
    assert record["status"] == "cancelled"
    assert record["error"]["message"] == f"cancelled by request at step {record['progress']['step']}"

    trainers = wait_until(lambda: standby_pids(service), 30, "the next standby trainer")
    job_id = service.submit(spec)
    service.wait_for_step(job_id, 2)
    os.kill(trainers[0], signal.SIGKILL)  # the kernel's OOM killer, say
    record = service.wait_for(job_id, timeout_s=60)
    assert (record["status"], record["error"]["code"]) == ("failed", "trainer_crashed")
    assert record["error"]["message"].startswith("The trainer process was killed by SIGKILL")


def test_a_stopped_worker_leaves_no_standby_behind(standby_service: Service) -> None:
    service = standby_service
    standby = wait_until(lambda: standby_pids(service), 30, "the worker's standby trainer")
    service.worker.send_signal(signal.SIGTERM)
    assert service.worker.wait(60) == 0
    wait_until(lambda: not Path(f"/proc/{standby[0]}").exists(), 30, "the standby trainer to exit")
