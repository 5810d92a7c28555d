"""Ctrl-C on `scripts/run` while a job trains: each process it started gets one signal, as the
README promises for a stop, so the worker's first-stop path runs (a checkpoint at the next step,
the job queued again) and Redis shuts down cleanly, never "You insist" (a forced exit)."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, Env, free_port, job_spec, wait_until

pytestmark = pytest.mark.slow


def test_ctrl_c_stops_each_process_once_and_a_running_job_is_requeued_at_its_step(
    env: Env, tiny_model: Path, chat_dataset: Path, tmp_path: Path
) -> None:
    data_dir, api_port = tmp_path / "run-data", free_port()
    variables = {
        **os.environ,
        **env.vars,
        "DATA_DIR": str(data_dir),
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # nobody answers there: it starts its own
        "PORT": str(api_port),
    }
    log, stack = tmp_path / "run.log", contextlib.ExitStack()
    with log.open("wb") as out:
        # A session of its own, as a terminal gives the command it runs: Ctrl-C is SIGINT to its group.
        run = subprocess.Popen(
            [str(ROOT / "scripts" / "run")], env=variables, stdout=out, stderr=out, start_new_session=True
        )
    try:
        http = stack.enter_context(httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=30))

        def answers() -> bool:
            try:
                return http.get("/healthz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(answers, 120, f"scripts/run to serve (see {log})", interval_s=0.5)
        response = http.post("/jobs", json=job_spec(tiny_model, chat_dataset, max_steps=100_000, logging_steps=1))
        assert response.status_code == 201, response.text

        def training() -> bool:
            return int(http.get("/jobs/1").json()["progress"]["step"]) >= 2

        wait_until(training, 180, "job 1 to train", interval_s=0.5)
        os.killpg(run.pid, signal.SIGINT)  # Ctrl-C
        run.wait(300)
    finally:
        stack.close()
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(10)
    output = log.read_text(errors="replace")
    redis_log = (data_dir / "redis" / "redis.log").read_text()
    assert redis_log.count("scheduling shutdown") == 1 and "You insist" not in redis_log, redis_log
    assert "Redis is now ready to exit" in redis_log, redis_log
    assert output.count("shut down requested") == 1, output  # the worker's warm stop, once
    assert "could not enqueue it again now" not in output, output  # Redis stops last
    with sqlite3.connect(data_dir / "jobs.db") as db:
        status, step = db.execute("select status, step from job where id = 1").fetchone()
        kinds = [kind for (kind,) in db.execute("select kind from job_event where job_id = 1 order by id")]
        (saved,) = db.execute("select max(step) from checkpoint where job_id = 1").fetchone()
    assert status == "queued" and kinds[-1] == "requeued", (status, kinds, output)
    assert saved == step  # saved where it stopped: the next worker goes on from there
    assert run.returncode == 130  # as for any command a Ctrl-C ends
