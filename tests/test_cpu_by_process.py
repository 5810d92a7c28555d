"""scripts/cpu_by_process.py: the kinds the suite's processes are counted under, and a busy child
counted under its own kind while an idle fork of this process is counted as a fork."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from core.contract import FORKED_STANDBY_NAME
from scripts.cpu_by_process import Sampler, kind


def test_the_suites_processes_are_told_apart_by_their_command_lines() -> None:
    assert kind("python -u -c import sys;exec(eval(sys.stdin.readline()))") == "pytest-xdist worker"
    assert kind("python scripts/service_zygote.py /tmp/pytest-of-root/pytest-1/zygote0/zygote.sock") == "service zygote"
    assert kind("python -m trainer --forkserver /tmp/pytest-of-root/pytest-1/fs.sock") == "trainer fork server"
    assert kind("python -m trainer --standby") == "trainer (standby)"
    assert kind("python -m trainer 7") == "trainer"
    assert kind("ray::DashboardAgent") == "ray"
    assert kind("/usr/bin/redis-server 127.0.0.1:6379") == "redis-server"
    assert kind("python -m pytest -n 4 --dist load") == "pytest main"
    assert kind("sleep 5").startswith("other: ")


def test_a_busy_child_is_counted_under_its_kind_and_a_fork_as_a_fork() -> None:
    # Busy for 0.5 s of CPU, then says so and waits (alive, so its ticks can be read).
    busy = (
        "import sys, time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass\n"
        "print('done', flush=True)\nsys.stdin.read()"
    )
    sampler = Sampler()
    sampler.sample()  # this process is known before its fork
    child = subprocess.Popen(
        [sys.executable, "-c", busy, "-m", "trainer", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    forked = os.fork()
    if forked == 0:
        time.sleep(30)
        os._exit(0)
    try:
        assert child.stdout is not None and child.stdout.readline() == "done\n"
        sampler.sample()
    finally:
        os.kill(forked, signal.SIGKILL)
        os.waitpid(forked, 0)
        child.communicate("")
    assert sampler.ticks["trainer"] >= 0.4 * os.sysconf("SC_CLK_TCK")
    mine = sampler.seen[str(os.getpid())].kind
    assert sampler.seen[str(forked)].kind == f"{mine.removesuffix(' (fork)')} (fork)"


@pytest.mark.parametrize(
    ("name", "expected"), [("zygote:uvicorn", "api (zygote fork)"), (FORKED_STANDBY_NAME, "trainer (standby, forked)")]
)
def test_a_fork_that_names_itself_is_counted_by_its_name(name: str, expected: str) -> None:
    """The service zygote's forks rename themselves (/proc/PID/comm) to zygote:uvicorn or
    zygote:worker (a fork of such a worker is RQ's work horse); the trainer fork server names its
    standby trainers."""
    from core.process_name import name_process

    sampler = Sampler()
    sampler.sample()
    ready_read, ready_write = os.pipe()
    forked = os.fork()
    if forked == 0:
        name_process(name)  # as the zygote's fork does
        os.write(ready_write, b"x")
        time.sleep(30)
        os._exit(0)
    try:
        assert os.read(ready_read, 1) == b"x"
        sampler.sample()
    finally:
        os.kill(forked, signal.SIGKILL)
        os.waitpid(forked, 0)
        os.close(ready_read)
        os.close(ready_write)
    assert sampler.seen[str(forked)].kind == expected
