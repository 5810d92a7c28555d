"""A trainer fork server for hosts without GPUs: `python -m trainer --forkserver SOCKET`.

Each job's trainer process spends most of its start importing torch, transformers, TRL and
datasets (4 to 6 s of CPU on the tiny model's jobs, more than the training). The fork server
imports them once; a job's trainer (each rank's, for a job of several ranks joined by gloo) is then
a fork of it that starts training at once. The work horse uses it when TRAINER_FORKSERVER names its
socket (worker/forkserver.py); otherwise, or when the server does not answer, the trainer is a
process of its own as always. CUDA cannot cross a fork, so the server refuses to run where torch sees a GPU:
a GPU worker's head start is the standby trainer (trainer/standby.py).

The protocol: the horse connects to SOCKET and sends one JSON line, {"job_id", "parent_pid",
"workdir", "env", "log"}; the server forks and answers {"pid": N}. The child becomes that job's
trainer exactly as a standby does once it has its job: the job's (or the rank's) environment, the
whole of it, replacing the server's, its working directory, its output appended to the job's
trainer.log (a rank's trainer-rank<N>.log, `log`), the horse
watched as its parent. The server keeps each child's exit status (a zombie) until the horse has
read it from /proc: it reaps a child once the job's working directory is gone (the horse removes
it when it is done) or the horse has ended.

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
from pathlib import Path
from typing import Any

from core.contract import FORKSERVER_ANSWER_TIMEOUT_S


def serve(socket_path: str, argv0: str) -> int:
    """Run until the parent that started us ends (or SIGTERM); in a forked child, return the
    trainer's exit code instead (the caller exits with it)."""
    from trainer.lifeline import die_with_parent
    from trainer.standby import preload, preload_job_modules

    die_with_parent(None)  # whoever started the server: it does not outlive it
    started = time.monotonic()
    import torch

    if torch.cuda.is_available():
        print("a trainer fork server is for hosts without GPUs (CUDA cannot cross a fork); use TRAINER_STANDBY")
        return 2
    loaded = preload()
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
    children: dict[int, tuple[Path, int]] = {}  # pid -> (the job's working directory, its horse)
    while True:
        readable, _, _ = select.select([listener], [], [], 1.0)
        reap(children)
        if not readable:
            continue
        connection, _ = listener.accept()
        try:
            connection.settimeout(FORKSERVER_ANSWER_TIMEOUT_S)
            request = json.loads(connection.makefile("rb").readline())
            pid = os.fork()
            if pid == 0:
                listener.close()
                connection.close()
                return become_trainer(request, argv0)
            children[pid] = (Path(request["workdir"]), int(request["parent_pid"]))
            connection.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a bad or vanished client: the next
            print(f"fork server: a request failed: {exc!r}", flush=True)
        finally:
            connection.close()


def become_trainer(request: dict[str, Any], argv0: str) -> int:
    """In the forked child: what a standby trainer does once it has its job (trainer/standby.py)."""
    os.setsid()  # as a trainer the horse starts: signals to the server's group are not for it
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in request["env"].items()})
    from core.config import get_settings
    from trainer.standby import take_job

    get_settings.cache_clear()  # the job's settings, not the server's
    assigned = time.monotonic()
    job_id = take_job(request)
    print(f"trainer forked (pid {os.getpid()}) from the fork server (pid {os.getppid()}) for job {job_id}", flush=True)
    from trainer.run import main

    return main([argv0, str(job_id)], started=assigned)  # it watches parent_pid (PARENT_WATCHED_ENV)


def reap(children: dict[int, tuple[Path, int]]) -> None:
    """Collect the children whose horse is done with them (see the module's docstring)."""
    for pid, (workdir, horse) in list(children.items()):
        if workdir.exists() and alive(horse):
            continue
        try:
            waited, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            waited = pid
        if waited:
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
