"""The trainer fork server (TRAINER_FORKSERVER, trainer/forkserver.py): a job's trainer forked from
it trains as any trainer and ends as one (its exit status read by the work horse), the server
collects it once the horse is done with it, and a server that does not answer only costs the
job its head start. (Most tests' jobs run this way: tests/conftest.py; how a crashed or killed
forked trainer is reported is what tests/test_failures.py and tests/faults/ check through it.)"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import httpx
import pytest

from scripts.service_harness import wait_until
from tests.conftest import Env, job_spec, run_to_end
from worker.forkserver import fork_trainer


def server_pid(socket_path: str) -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            except OSError:
                continue
            if argv[-2:] == [b"--forkserver", socket_path.encode()]:
                return int(entry.name)
    return None


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, state letter) of the process's children."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append((int(entry.name), fields[0]))
    return found


@pytest.mark.slow
def test_a_forked_trainer_trains_ends_and_is_collected(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    socket_path = env.vars["TRAINER_FORKSERVER"]
    wait_until(lambda: os.path.exists(socket_path), 120, "the fork server's socket")
    server = server_pid(socket_path)
    assert server is not None

    record = run_to_end(client, job_spec(tiny_model, chat_dataset))
    assert record["status"] == "succeeded", record["error"]
    log = (env.data_dir / "jobs" / str(record["id"]) / "trainer.log").read_text()
    assert f"from the fork server (pid {server})" in log
    # Its exit status was read (a success, above); the server reaps it within a pass of its loop.
    wait_until(lambda: all(state != "Z" for _, state in children(server)), 10, "the server to reap its child")


def test_a_server_that_does_not_answer_gives_no_trainer_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="worker.forkserver"):
        assert fork_trainer(str(tmp_path / "nobody.sock"), 7, tmp_path, {"PATH": "/usr/bin"}) is None
    assert "job 7: no trainer from the fork server" in caplog.text


def test_a_fork_request_names_a_log_in_the_jobs_folder_never_a_path(env: Env, tmp_path: Path) -> None:
    from trainer.standby import take_job

    job = {"job_id": 3, "parent_pid": os.getpid(), "workdir": str(tmp_path)}
    for name in ("../../escape.log", "/tmp/x.log", "trainer-rank1.log/../../x", "notes.txt"):
        with pytest.raises(ValueError, match="not a trainer log's name"):
            take_job({**job, "log": name})
