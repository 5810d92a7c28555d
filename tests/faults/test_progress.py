"""Progress, not liveness: a trainer frozen with SIGSTOP keeps its worker's heartbeat fresh, yet the
job is reported stalled (an event, the record, /metrics) and its ETA ignores the frozen time once
it goes on; and a job resumed after its checkpoints were deleted says it starts over and logs
each step once."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Env, clear_caches, job_spec, trainer_pid, wait_until

pytestmark = pytest.mark.slow

FROZEN_S = 6.0


@pytest.fixture
def fast_stalls(env: Env, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("STALL_AFTER_S", "2")
    clear_caches()
    yield
    clear_caches()


def events_of(client: httpx.Client, job_id: int, kind: str) -> list[dict[str, Any]]:
    return [e for e in client.get(f"/jobs/{job_id}/events").json()["items"] if e["kind"] == kind]


def run_in_thread(job_id: int) -> threading.Thread:
    from worker.tasks import run_job

    runner = threading.Thread(target=run_job, args=(job_id,), daemon=True)
    runner.start()
    return runner


def step_of(client: httpx.Client, job_id: int) -> int:
    return int(client.get(f"/jobs/{job_id}").json()["progress"]["step"])


def test_a_frozen_trainer_is_reported_stalled_and_its_eta_ignores_the_freeze(
    client: httpx.Client,
    env: Env,
    fast_stalls: None,
    tiny_model: Path,
    chat_dataset: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    steps = 100_000
    # Frozen mid-step, outside its writes to the job database: stopped at a random moment, the
    # trainer may hold SQLite's write lock, and the worker could not record the stall.
    monkeypatch.setenv("FINETUNE_FAILPOINTS", "training_step@10=pause")
    spec = job_spec(tiny_model, chat_dataset, max_steps=steps, logging_steps=1, save_steps=100_000)
    job_id = client.post("/jobs", json=spec).json()["id"]
    runner = run_in_thread(job_id)
    held = env.data_dir / "jobs" / str(job_id) / "failpoint-training_step"
    try:
        wait_until(lambda: held.exists() and held.read_text().strip(), 120, "training to reach step 10")
        pid = int(held.read_text())
        assert pid == trainer_pid(job_id, env.data_dir)
        os.kill(pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        held.unlink()  # it goes on once it is let go (SIGCONT)
        frozen(client, job_id, pid, frozen_at, steps)
    finally:  # a failed test leaves no job running into the next one
        client.post(f"/jobs/{job_id}/cancel")
        with contextlib.suppress(ProcessLookupError, NameError):
            os.kill(pid, signal.SIGCONT)
        runner.join(60)
    assert not runner.is_alive()


def frozen(client: httpx.Client, job_id: int, pid: int, frozen_at: float, steps: int) -> None:
    """What the record, the events and /metrics say of the frozen trainer, then once it goes on."""
    try:
        stalled = wait_until(lambda: events_of(client, job_id, "stalled"), 60, "a stalled event")
        record = client.get(f"/jobs/{job_id}").json()
        assert record["status"] == "running"
        assert record["progress"]["stalled_since"] is not None
        done_at_freeze = record["progress"]["step"]
        message = stalled[0]["message"]
        assert re.fullmatch(
            rf"no training step for \d+ s \(STALL_AFTER_S is 2 s\), at step {done_at_freeze}: process {pid} is "
            r"stopped \(SIGSTOP, or a debugger\)\. The job stays running; look at its trainer\.log, or cancel it\.",
            message,
        ), message
        gauge = re.search(
            rf'^finetune_job_stalled_seconds\{{job_id="{job_id}"\}} (\S+)$', client.get("/metrics").text, re.M
        )
        assert gauge is not None and float(gauge.group(1)) >= 2
        # Frozen long enough that a mean over the whole run would be far off (the fault's length).
        time.sleep(max(0.0, FROZEN_S - (time.monotonic() - frozen_at)))
    finally:
        os.kill(pid, signal.SIGCONT)
    frozen_s = time.monotonic() - frozen_at
    wait_until(lambda: events_of(client, job_id, "stall_ended"), 60, "a stall_ended event")
    wait_until(lambda: step_of(client, job_id) >= done_at_freeze + 3, 60, "steps after the freeze")
    record = client.get(f"/jobs/{job_id}").json()
    assert record["progress"]["stalled_since"] is None
    assert f'finetune_job_stalled_seconds{{job_id="{job_id}"}} 0.0' in client.get("/metrics").text
    # The mean step since the first, which the ETA used to be, is at least the freeze over the steps
    # done; the median of recent steps leaves the freeze out.
    left = steps - record["progress"]["step"]
    assert record["progress"]["eta_seconds"] < frozen_s / record["progress"]["step"] * left
    assert client.post(f"/jobs/{job_id}/cancel").status_code == 200


def test_a_job_resumed_after_its_checkpoints_were_deleted_starts_over_and_says_so(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core import stop_requests

    steps = 12
    # Held in step 5 (past checkpoint-3) until the pause has reached the trainer: a tiny job would
    # otherwise end before its pause on a loaded machine.
    monkeypatch.setenv("FINETUNE_FAILPOINTS", "training_step@4=pause")
    spec = job_spec(tiny_model, chat_dataset, max_steps=steps, logging_steps=1, save_steps=3)
    job_id = client.post("/jobs", json=spec).json()["id"]
    runner = run_in_thread(job_id)
    job_dir = env.data_dir / "jobs" / str(job_id)
    held = job_dir / "failpoint-training_step"
    wait_until(held.exists, 120, "a checkpoint and more")
    assert client.post(f"/jobs/{job_id}/pause").status_code == 200
    wait_until(lambda: stop_requests.read_request(job_dir) == "paused", 60, "the pause to reach the trainer")
    held.unlink()
    runner.join(120)
    monkeypatch.delenv("FINETUNE_FAILPOINTS")  # the resumed attempt runs through
    record = client.get(f"/jobs/{job_id}").json()
    assert record["status"] == "paused", record["error"]
    reached = record["progress"]["step"]
    for checkpoint in client.get(f"/jobs/{job_id}/checkpoints").json()["items"]:
        assert client.delete(f"/jobs/{job_id}/checkpoints/{checkpoint['name']}").status_code == 200

    assert client.post(f"/jobs/{job_id}/resume").status_code == 200
    run_in_thread(job_id).join(120)
    record = client.get(f"/jobs/{job_id}").json()
    assert record["status"] == "succeeded", record["error"]
    restarted = events_of(client, job_id, "restarted")
    assert [e["message"] for e in restarted] == [
        f"no complete checkpoint to resume from (an earlier attempt reached step {reached}; its checkpoints were "
        "deleted or none had been saved): training starts again from step 0, and the earlier attempt's step "
        "logs are replaced"
    ]
    assert events_of(client, job_id, "resumed") == []
    logged = [row["step"] for row in client.get(f"/jobs/{job_id}/logs").json()["items"]]
    assert logged == list(range(1, steps + 1))  # each step once
