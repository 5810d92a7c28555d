"""The trainer fork server (TRAINER_FORKSERVER, trainer/forkserver.py): a job's trainer forked from
it trains as any trainer and ends as one (its exit status read by the work horse), the server
collects it once the horse is done with it, and a server that does not answer only costs the
job its head start. A standby trainer forked from it waits for its job on the pipe that came
with its pid, and its exit status stays for the horse that took it. (Most tests' jobs run this
way: tests/conftest.py; how a crashed or killed forked trainer is reported is what
tests/test_failures.py and tests/faults/ check through it.)"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core.config import get_settings
from core.contract import FORKED_STANDBY_NAME
from scripts.service_harness import wait_until
from tests.conftest import Env, job_spec, run_to_end
from worker.forkserver import fork_standby, fork_trainer
from worker.standby import ForkedStandby, mark_taken, process_state, taken_folder, taken_marker
from worker.tasks import trainer_environment


def server_pid(socket_path: str) -> int | None:
    """The fork server's pid. Its forks keep its command line, so the server is the one process
    with that command line whose parent has another: the first in /proc's order can be a fork
    whose pid is lower than the server's once pids have wrapped (it was, in a full run)."""
    forks_and_server = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            except OSError:
                continue
            if argv[-2:] == [b"--forkserver", socket_path.encode()]:
                forks_and_server.add(int(entry.name))
    for pid in forks_and_server:
        stat = stat_of(pid)
        if stat is not None and int(stat.rsplit(")", 1)[1].split()[1]) not in forks_and_server:
            return pid
    return None


def stat_of(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text()
    except OSError:
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


# ---- standby trainers ---------------------------------------------------------------------------


@pytest.fixture
def forked_standby(env: Env) -> Iterator[ForkedStandby]:
    """A standby trainer forked by the test process's fork server, as the worker asks for one (a test
    that uses it is marked slow: the fork server is a slow test's)."""
    socket_path = env.vars["TRAINER_FORKSERVER"]
    wait_until(lambda: os.path.exists(socket_path), 120, "the fork server's socket")
    taken_folder().mkdir(parents=True)
    env_of_trainers = trainer_environment(get_settings().as_environment(), {})
    standby = fork_standby(socket_path, env_of_trainers, taken_folder() / "standby.log", taken_folder())
    assert standby is not None
    yield standby
    if standby.stdin is not None:
        standby.stdin.close()
    if standby.poll() is None:
        standby.kill()
    taken_marker(standby.pid).unlink(missing_ok=True)  # nobody's any more: the server collects it


def server_passed_its_loop(socket_path: str) -> None:
    """Returns once the fork server has collected what it would collect now: it reaps before it
    accepts each connection, and this one asks for nothing it can give."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(30)
        connection.connect(socket_path)
        connection.sendall(b"{}\n")
        assert connection.recv(1) == b""  # refused, and closed


@pytest.mark.slow
def test_a_forked_standby_waits_on_the_pipe_sent_with_its_pid_and_ends_at_end_of_input(
    forked_standby: ForkedStandby, env: Env
) -> None:
    socket_path = env.vars["TRAINER_FORKSERVER"]
    standby = forked_standby
    assert standby.pid in [pid for pid, _ in children(server_pid(socket_path) or 0)]  # the server's child
    assert Path(f"/proc/{standby.pid}/comm").read_text().strip() == FORKED_STANDBY_NAME
    log = taken_folder() / "standby.log"
    ready = f"standby trainer (pid {standby.pid}) ready in"
    wait_until(lambda: log.exists() and ready in log.read_text(), 30, "its first line")

    mark_taken(standby.pid, 7)  # taken by a live horse (this process): the server keeps its exit status
    assert standby.stdin is not None
    standby.stdin.close()  # end of input, as when the worker stops
    assert standby.wait(30) == 0
    server_passed_its_loop(socket_path)
    assert process_state(standby.pid) == ("Z", 0)
    taken_marker(standby.pid).unlink()  # as the worker does once the horse has ended
    server_passed_its_loop(socket_path)
    assert process_state(standby.pid) is None  # collected


@pytest.mark.slow
def test_a_forked_standby_that_crashes_on_its_job_keeps_its_exit_status_until_the_horse_ends(
    forked_standby: ForkedStandby, env: Env, tmp_path: Path
) -> None:
    """The horse reads how its trainer ended from /proc (an exit status lost there would read as
    "killed by SIGKILL"); once the horse has ended nobody will, and the server collects it."""
    socket_path = env.vars["TRAINER_FORKSERVER"]
    standby = forked_standby
    mark_taken(standby.pid, 7)  # this process is the horse
    job = {"job_id": 7, "parent_pid": os.getpid(), "workdir": str(tmp_path), "log": "../not-a-trainer.log"}
    assert standby.stdin is not None
    standby.stdin.write(json.dumps(job).encode() + b"\n")
    standby.stdin.flush()
    assert standby.wait(30) == 1  # take_job refused the log's name: an exception, exit status 1
    assert "not a trainer log's name" in (taken_folder() / "standby.log").read_text()
    server_passed_its_loop(socket_path)
    assert process_state(standby.pid) == ("Z", 1 << 8)

    ended = subprocess.Popen(["true"])
    ended.wait()
    taken_marker(standby.pid).write_text(json.dumps({"job_id": 7, "horse": ended.pid}))  # a horse that has ended
    server_passed_its_loop(socket_path)
    assert process_state(standby.pid) is None


@pytest.mark.slow
def test_a_forked_standby_never_taken_is_collected_once_it_ends(forked_standby: ForkedStandby) -> None:
    """Only its worker looks at it, to see whether it has ended: a pid that is gone says so too."""
    assert forked_standby.stdin is not None
    forked_standby.stdin.close()
    wait_until(lambda: process_state(forked_standby.pid) is None, 30, "the server to collect it")
    assert forked_standby.poll() is not None
