"""The worker's side of the trainer fork server (trainer/forkserver.py): the work horse asks it for
its job's trainer and watches that trainer as a standby that took its job; the worker asks it for
its standby trainer (worker/standby.py), which then costs no imports."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from core.contract import FORKSERVER_ANSWER_TIMEOUT_S
from worker.standby import AdoptedTrainer, ForkedStandby

logger = logging.getLogger(__name__)


def fork_trainer(
    socket_path: str, job_id: int, workdir: Path, env: dict[str, str], log: str = "trainer.log"
) -> AdoptedTrainer | None:
    """The forked trainer of this job (one rank of it, with the rank's environment and `log`), or
    None when the server cannot give one (the caller then starts a trainer process of its own)."""
    request = {"job_id": job_id, "parent_pid": os.getpid(), "workdir": str(workdir), "env": env, "log": log}
    try:
        answer, _ = ask(socket_path, request)
        pid = int(answer["pid"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("job %s: no trainer from the fork server at %s (%s); starting one", job_id, socket_path, exc)
        return None
    logger.info("job %s: trainer forked by the fork server (pid %s, writing %s)", job_id, pid, log)
    return AdoptedTrainer(pid)


def fork_standby(socket_path: str, env: dict[str, str], log: Path, markers: Path) -> ForkedStandby | None:
    """A standby trainer forked by the server, with `env` and its output appended to `log`; its
    collection waits for a horse named in `markers`/<pid>.taken (trainer/forkserver.py). None when
    the server cannot give one (the caller then starts one of its own)."""
    request = {"standby": True, "env": env, "log": str(log), "markers": str(markers)}
    try:
        answer, fds = ask(socket_path, request)
    except (OSError, ValueError) as exc:
        logger.warning("no standby trainer from the fork server at %s (%s); starting one", socket_path, exc)
        return None
    try:
        pid = int(answer["pid"])
        [job_in] = fds
    except (KeyError, TypeError, ValueError) as exc:
        for fd in fds:
            os.close(fd)
        logger.warning("the fork server at %s gave no standby trainer (%r); starting one", socket_path, exc)
        return None
    return ForkedStandby(pid, job_in)


def ask(socket_path: str, request: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    """The server's answer to `request` (one JSON line) and the file descriptors sent with it."""
    fds: list[int] = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(FORKSERVER_ANSWER_TIMEOUT_S)
            connection.connect(socket_path)
            connection.sendall(json.dumps(request).encode() + b"\n")
            line = b""
            while not line.endswith(b"\n"):
                # The descriptors come with the answer's first bytes; a short read only splits the line.
                chunk, received, _, _ = socket.recv_fds(connection, 4096, 1)
                fds += received
                if not chunk:
                    break
                line += chunk
        return json.loads(line), fds
    except BaseException:  # no descriptor of a failed request is left open
        for fd in fds:
            os.close(fd)
        raise
