"""A trainer fork server for hosts without GPUs: `python -m trainer --forkserver SOCKET`.

Each job's trainer process spends most of its start importing torch, transformers, TRL and
datasets (4 to 6 s of CPU on the tiny model's jobs, more than the training). The fork server
imports them once; a job's trainer (each rank's, for a job of several ranks joined by gloo) is then
a fork of it that starts training at once, and so is the worker's standby trainer (the one that
waits for the next job: trainer/standby.py), which would otherwise import them all again. The work
horse and the worker use it when TRAINER_FORKSERVER names its socket (worker/forkserver.py);
otherwise, or when the server does not answer, the trainer (or the standby) is a process of its
own as always. CUDA cannot cross a fork, so the server refuses to run where torch sees a GPU: a GPU
worker's head start is the exec'd standby trainer (`python -m trainer --standby`).

The protocol: a client connects to SOCKET and sends one JSON line; the server forks and answers
{"pid": N}.

- A job's trainer, asked for by its horse: {"job_id", "parent_pid", "workdir", "env", "log"}. The
  child becomes that job's trainer exactly as a standby does once it has its job: the job's (or the
  rank's) environment, the whole of it, replacing the server's, its working directory, its output
  appended to the job's trainer.log (a rank's trainer-rank<N>.log, `log`), the horse watched as
  its parent.
- A standby trainer, asked for by the worker: {"standby": true, "env", "log", "markers"}. The child
  takes `env` as its environment, appends its output to `log` (the worker's standby.log), names
  itself FORKED_STANDBY_NAME in /proc/PID/comm (its command line is the server's), and waits for
  its job on stdin as an exec'd standby does. Its stdin is a pipe whose write end comes with the
  answer (SCM_RIGHTS) and is the worker's alone: the work horses it forks meanwhile inherit it,
  one writes the job down it, and its closing by all of them (the worker stopping, or gone) is the
  standby's end of input, which ends it. (An exec'd standby also dies with the worker through
  PR_SET_PDEATHSIG; a forked one's parent is the server.)

Collecting the children. The server keeps each child's exit status (a zombie) until nobody can still
read it from /proc, and collects it at the first pass of its loop (every second) after that:

- a job's trainer: once the job's working directory is gone (the horse removes it when it is done)
  or the horse has ended;
- a standby: once no live work horse has taken it. A horse that takes the standby writes the
  worker's taken marker (`markers`/<pid>.taken, naming the horse: worker/standby.py) before it
  writes the job down the pipe, and the marker is read only once the standby has ended, when no
  job can reach it any more. No marker, then: it never had a job, and the worker, which only looks
  whether it has ended, sees that as well once it is collected. A marker: it is kept while the
  horse named there lives (the worker removes the marker only after that horse has ended).

So each zombie waits for one live work horse at most, and none is kept for a worker alone.

The libraries read some variables once, at import (HF_HOME, the offline switches): start the
server with the environment the trainers would get (`TRAINER_ENV_KEPT`, worker/tasks.py)."""

from __future__ import annotations

import gc
import json
import os
import select
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from core.contract import FORKED_STANDBY_NAME, FORKSERVER_ANSWER_TIMEOUT_S
from core.process_name import name_process


def serve(socket_path: str, argv0: str) -> int:
    """Run until the parent that started us ends (or SIGTERM); in a forked child, return the
    trainer's exit code instead (the caller exits with it)."""
    from trainer.lifeline import die_with_parent
    from trainer.standby import import_packages, preload_job_modules

    die_with_parent(None)  # whoever started the server: it does not outlive it
    started = time.monotonic()
    import torch

    if torch.cuda.is_available():
        print("a trainer fork server is for hosts without GPUs (CUDA cannot cross a fork); use TRAINER_STANDBY")
        return 2
    loaded = import_packages()
    preload_job_modules()
    loaded.append("the classes a job loads")
    # What the imports made lives as long as the server: out of the collector's sight, so that a
    # child's full collections (transformers' Trainer runs several) do not walk it again and again
    # (0.4 s each under coverage), and do not write to pages the children share with us.
    gc.collect()
    gc.freeze()
    path = Path(socket_path)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    took = time.monotonic() - started
    print(f"trainer fork server ready in {took:.1f} s ({', '.join(loaded)}) on {path}", flush=True)
    children: dict[int, Child] = {}
    while True:
        readable, _, _ = select.select([listener], [], [], 1.0)
        reap(children)
        if not readable:
            continue
        connection, _ = listener.accept()
        with connection:
            child = answer(connection, children)
        if child is not None:  # we are the forked child: out of the server's loop
            listener.close()
            return child(argv0, loaded)


def answer(connection: socket.socket, children: dict[int, Child]) -> Callable[[str, list[str]], int] | None:
    """Fork what the request on `connection` asks for and answer with the child's pid. None in the
    server; in the child, what it is to become (called with argv[0] and what the server imported)."""
    try:
        connection.settimeout(FORKSERVER_ANSWER_TIMEOUT_S)
        request = json.loads(connection.makefile("rb").readline())
        if request.get("standby"):
            return fork_standby(connection, request, children)
        kept = TrainerChild(Path(request["workdir"]), int(request["parent_pid"]))
        pid = os.fork()
        if pid == 0:
            return lambda argv0, _loaded: become_trainer(request, argv0)
        children[pid] = kept
        connection.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    except (OSError, ValueError, KeyError, TypeError) as exc:  # a bad or vanished client: the next
        print(f"fork server: a request failed: {exc!r}", flush=True)
    return None


def fork_standby(
    connection: socket.socket, request: dict[str, Any], children: dict[int, Child]
) -> Callable[[str, list[str]], int] | None:
    """A standby trainer's fork, with its stdin's write end sent along with the answer."""
    kept = StandbyChild(Path(request["markers"]))
    job_out, job_in = os.pipe()
    # Named before the fork, which copies the name: the child has it before anyone knows its pid
    # (the test harness finds a standby by it), and the server takes its own back at once.
    own_name = Path("/proc/self/comm").read_bytes().strip()
    name_process(FORKED_STANDBY_NAME.encode())
    try:
        pid = os.fork()
    except OSError:
        name_process(own_name)
        os.close(job_out)
        os.close(job_in)
        raise
    if pid == 0:
        os.close(job_in)  # the worker's alone: its closing must reach the standby as end of input
        return partial(become_standby, request, job_out)
    name_process(own_name)
    os.close(job_out)
    children[pid] = kept
    try:
        socket.send_fds(connection, [json.dumps({"pid": pid}).encode() + b"\n"], [job_in])
    finally:
        os.close(job_in)  # (a client that vanished: the standby reads end of input, and ends)
    return None


def become_trainer(request: dict[str, Any], argv0: str) -> int:
    """In the forked child: what a standby trainer does once it has its job (trainer/standby.py)."""
    os.setsid()  # as a trainer the horse starts: signals to the server's group are not for it
    take_environment(request["env"])
    from trainer.standby import take_job

    assigned = time.monotonic()
    job_id = take_job(request)
    print(f"trainer forked (pid {os.getpid()}) from the fork server (pid {os.getppid()}) for job {job_id}", flush=True)
    from trainer.run import main

    return main([argv0, str(job_id)], started=assigned)  # it watches parent_pid (PARENT_WATCHED_ENV)


def become_standby(request: dict[str, Any], job_out: int, argv0: str, loaded: list[str]) -> int:
    """In the forked child: a standby trainer (trainer/standby.py) whose imports are done, its job to
    come down `job_out`."""
    forked = time.monotonic()
    os.setsid()  # as the worker starts an exec'd standby: signals to the server's group are not for it
    # stdin: sys.stdin reads fd 0, from which the server never read (nothing of its own is buffered).
    os.dup2(job_out, 0)
    os.close(job_out)
    log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    take_environment(request["env"])
    from trainer.standby import wait_and_run

    print(
        f"standby trainer (pid {os.getpid()}) ready in {time.monotonic() - forked:.1f} s, forked by the trainer "
        f"fork server (pid {os.getppid()}; {', '.join(loaded)})",
        flush=True,
    )
    return wait_and_run(argv0, loaded)


def take_environment(env: dict[str, Any]) -> None:
    """The whole of `env` replaces the server's environment, and the settings are read from it."""
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in env.items()})
    from core.config import get_settings

    get_settings.cache_clear()  # the job's settings, not the server's


@dataclass(frozen=True)
class TrainerChild:
    """A job's trainer: its status is its horse's until the horse is done with the job."""

    workdir: Path
    horse: int

    def done_with(self, pid: int) -> bool:
        return not self.workdir.exists() or not alive(self.horse)


@dataclass(frozen=True)
class StandbyChild:
    """A standby trainer: its status is for the horse that took it, if one did (the module's
    docstring says why the marker tells)."""

    markers: Path

    def done_with(self, pid: int) -> bool:
        horse = taken_by(self.markers / f"{pid}.taken")
        return horse is None or not alive(horse)


# What the server keeps of each child: what says when its exit status may go.
Child = TrainerChild | StandbyChild


def taken_by(marker: Path) -> int | None:
    """The work horse named in a standby's taken marker ({"job_id", "horse"}: worker/standby.py)."""
    try:
        return int(json.loads(marker.read_text())["horse"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def reap(children: dict[int, Child]) -> None:
    """Collect the children that have ended and whose status nobody needs any more (the module's
    docstring). Whether one has ended is asked first, without collecting it (WNOWAIT): what decides
    whether its status is needed is read after that, when nothing can change it any more."""
    for pid, child in list(children.items()):
        try:
            ended = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:  # collected already
            del children[pid]
            continue
        if ended and child.done_with(pid):
            os.waitpid(pid, 0)
            del children[pid]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m trainer --forkserver SOCKET", file=sys.stderr)
        return 2
    return serve(argv[2], argv[0])
