"""Where the test suite's CPU goes, by kind of process: samples every process's CPU time once a
second until SIGTERM or SIGINT, then writes the seconds per kind, most first.

    python -m scripts.cpu_by_process cpu.txt & sampler=$!
    scripts/test -q; kill $sampler; cat cpu.txt

A run on 2 cores is CPU-bound (vmstat: 1-2% idle), so this says what a faster suite must make
cheaper; pytest's own durations only say how long each test waited. A fork (its command line is
its parent's) counts as "<parent's kind> (fork)": the API and workers forked from the service
zygote, the trainers forked from the trainer fork server, RQ's work horses; a fork that names
itself (/proc/PID/comm) by that name: the zygote's API and workers, the fork server's standby
trainers. CPU of a process that lives less than a second may be missed."""

from __future__ import annotations

import collections
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from core.contract import FORKED_STANDBY_NAME

# (what the command line contains, the kind), first match wins: the specific before the general.
KINDS = (
    ("exec(eval(sys.stdin", "pytest-xdist worker"),
    ("ray::", "ray"),
    ("/ray/", "ray"),
    ("ray.util", "ray"),
    ("raylet", "ray"),
    ("gcs_server", "ray"),
    ("bin/ray ", "ray"),
    ("redis-server", "redis-server"),
    ("chrom", "chromium"),
    ("service_zygote", "service zygote"),
    ("--forkserver", "trainer fork server"),
    ("--standby", "trainer (standby)"),
    ("-m trainer", "trainer"),
    ("uvicorn", "api"),
    ("-m worker", "worker"),
    ("mlflow", "mlflow"),
    ("moto_server", "s3 server (moto)"),
    ("bin/st ", "schemathesis"),
    ("-m pytest", "pytest main"),
    ("mypy", "lint"),
    ("ruff", "lint"),
)


# Forks of the service zygote name themselves (scripts/service_zygote.py sets /proc/PID/comm), and
# so do the standby trainers of the trainer fork server (trainer/forkserver.py).
ZYGOTE_FORKS = {"zygote:uvicorn": "api (zygote fork)", "zygote:worker": "worker (zygote fork)"}
NAMED_FORKS = {**ZYGOTE_FORKS, FORKED_STANDBY_NAME: "trainer (standby, forked)"}


def kind(command_line: str) -> str:
    for fragment, name in KINDS:
        if fragment in command_line:
            return name
    return "other: " + command_line[:60]


def command_line(pid: str) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()


@dataclass
class Seen:
    kind: str
    command_line: str
    start: int  # the process's start time (a reused pid has another)
    ticks: int = 0  # what has been counted of its CPU


def fork_kind(pid: str, parent_kind: str) -> str:
    """What a fork is: the zygote's forks and the standby trainers by the name they have, RQ's work
    horse by its parent (a worker), any other as "<its parent's kind> (fork)"."""
    if parent_kind == ZYGOTE_FORKS["zygote:worker"]:
        return "work horse (fork of a worker)"
    name = Path(f"/proc/{pid}/comm").read_text().strip()
    return NAMED_FORKS.get(name) or parent_kind.removesuffix(" (fork)") + " (fork)"


class Sampler:
    def __init__(self) -> None:
        self.seen: dict[str, Seen] = {}
        self.ticks: collections.Counter[str] = collections.Counter()

    def sample(self) -> None:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ticks, start, parent = int(fields[11]) + int(fields[12]), int(fields[19]), fields[1]
                entry = self.seen.get(pid)
                if entry is None or entry.start != start:  # new, or the pid was reused
                    line = command_line(pid)
                    forked_from = self.seen.get(parent)
                    if forked_from is not None and forked_from.command_line == line:
                        name = fork_kind(pid, forked_from.kind)
                    else:
                        name = kind(line)
                    entry = self.seen[pid] = Seen(name, line, start)
                if ticks > entry.ticks:
                    self.ticks[entry.kind] += ticks - entry.ticks
                    entry.ticks = ticks
            except (OSError, IndexError, ValueError):
                continue

    def table(self) -> str:
        per_second = os.sysconf("SC_CLK_TCK")
        return "".join(f"{t / per_second:9.1f} s  {name}\n" for name, t in self.ticks.most_common())


def main(out: Path) -> int:
    sampler, stop = Sampler(), False

    def ask_stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, ask_stop)
    signal.signal(signal.SIGINT, ask_stop)
    while not stop:
        sampler.sample()
        time.sleep(1)
    out.write_text(sampler.table())
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
