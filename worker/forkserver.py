"""The work horse's side of the trainer fork server (trainer/forkserver.py): ask it for a trainer
for this job, and watch that trainer as a standby that took its job (worker/standby.py)."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

from core.contract import FORKSERVER_ANSWER_TIMEOUT_S
from worker.standby import AdoptedTrainer

logger = logging.getLogger(__name__)


def fork_trainer(
    socket_path: str, job_id: int, workdir: Path, env: dict[str, str], log: str = "trainer.log"
) -> AdoptedTrainer | None:
    """The forked trainer of this job (one rank of it, with the rank's environment and `log`), or
    None when the server cannot give one (the caller then starts a trainer process of its own)."""
    request = {"job_id": job_id, "parent_pid": os.getpid(), "workdir": str(workdir), "env": env, "log": log}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(FORKSERVER_ANSWER_TIMEOUT_S)
            connection.connect(socket_path)
            connection.sendall(json.dumps(request).encode() + b"\n")
            answer = json.loads(connection.makefile("rb").readline())
        pid = int(answer["pid"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("job %s: no trainer from the fork server at %s (%s); starting one", job_id, socket_path, exc)
        return None
    logger.info("job %s: trainer forked by the fork server (pid %s, writing %s)", job_id, pid, log)
    return AdoptedTrainer(pid)
