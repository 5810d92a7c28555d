"""A trainer started before its job: `python -m trainer --standby`. Importing Unsloth takes about
30 s on an H200 (31 s measured, most of a warm job's start), torch and TRL several more; a
standby has done all of it by the time the worker hands it a job, on one line of its stdin:

    {"job_id": 7, "parent_pid": 1234, "workdir": "/tmp/trainer-7-..."}

`parent_pid` is the work horse that watches the job (the standby's own parent is the worker):
the standby stops when it goes, as a trainer started by the horse does through PR_SET_PDEATHSIG.
End of input (the worker stopping) ends the standby. From the job on it is an ordinary trainer:
the same `main`, the same result file, its output appended to the job's trainer.log.

Before the job, an idle worker may send `{"preload": {"model", "backend", "max_seq_length"}}`:
the standby then loads that model while it waits, unless its job has come meanwhile, and the job
takes it if it is its own (trainer/preload.py); a job that trains another model finds it freed
(`free_other_model`), in a clean process if its memory was not given back.

On a host without GPUs the worker asks the trainer fork server for its standby instead
(trainer/forkserver.py): a fork of the server, whose imports are done, that waits for its job the
same way (`wait_and_run`) without exec'ing anything. A GPU host's standby is this module's `serve`,
a process of its own, since CUDA cannot cross a fork."""

from __future__ import annotations

import json
import logging
import os
import re
import select
import sys
import time
from typing import Any

from trainer import preload

logger = logging.getLogger("trainer.standby")
LOG_NAME = re.compile(r"trainer(-rank[0-9]+)?\.log")


def import_packages() -> list[str]:
    """Import what a job will: Unsloth first where there is a GPU (it patches transformers and TRL
    as they load, so it must come first), then the libraries every job uses."""
    import torch

    loaded = ["torch"]
    if torch.cuda.is_available():
        try:
            import unsloth  # noqa: F401

            loaded.append("unsloth")
        except Exception as exc:  # the job that needs it will say why
            logger.warning("Unsloth failed to import in the standby trainer: %s", exc)
    import datasets  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    return [*loaded, "transformers", "trl", "datasets"]


def preload_job_modules() -> None:
    """What a job imports beyond the packages themselves (transformers and TRL load their classes
    lazily, on first use): the auto classes, Llama's modules, each method's TRL trainer (with what
    TRL's base trainer imports: wandb's SDK, when installed) and ours. About 4.5 s of a CPU job
    that no job pays again, 60% of a forked tiny-model job's CPU on the 2-core test machine
    (py-spy). For the fork server (hosts without a GPU), whose imports every forked job shares; not
    for a standby, which serves one job and is often stopped unused (and on a GPU host Unsloth
    patches TRL as it loads: that order has not been measured with these preloaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401
    from trl import DPOTrainer, GRPOTrainer, KTOTrainer, SFTConfig, SFTTrainer  # noqa: F401
    from trl.chat_template_utils import get_training_chat_template  # noqa: F401
    from trl.experimental.orpo import ORPOTrainer  # noqa: F401

    import trainer.callbacks
    import trainer.run
    import trainer.trackers  # noqa: F401


class StdinLines:
    """The lines the standby is sent on its stdin, read from fd 0 without Python's buffering, so
    that `waiting()` can tell whether the next one has come already."""

    def __init__(self, fd: int = 0) -> None:
        self.fd = fd
        self.buffer = b""

    def waiting(self) -> bool:
        """A line (or end of input) is there to read without waiting."""
        return b"\n" in self.buffer or bool(select.select([self.fd], [], [], 0)[0])

    def readline(self) -> str:
        """The next line, or "" at end of input."""
        while b"\n" not in self.buffer:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                rest, self.buffer = self.buffer, b""
                return rest.decode()
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode() + "\n"


def wait_for_job(lines: StdinLines) -> dict[str, Any] | None:
    """The job sent on stdin (None at end of input), after loading any model the worker asks for
    while none is waiting (`{"preload": {...}}` lines: trainer/preload.py)."""
    while True:
        line = lines.readline()
        if not line.strip():
            return None
        message = json.loads(line)
        if "preload" not in message:
            return dict(message)
        if lines.waiting():  # a job (or the end) came meanwhile: it loads what it needs itself
            continue
        preload_model(message["preload"])


def preload_model(message: dict[str, Any]) -> None:
    """Load the model the worker names; a failure is said and forgotten (the job loads its own)."""
    try:
        request = preload.Request.from_message(message)
    except (KeyError, TypeError, ValueError) as exc:
        print(f"standby trainer ignored a preload request it cannot read ({message!r}: {exc!r})", flush=True)
        return
    try:
        loaded = preload.preload(request)
    except Exception as exc:  # the job that asks for it will load it, and say why it cannot
        preload.release()
        print(f"standby trainer could not preload {request.model}: {type(exc).__name__}: {exc}", flush=True)
        return
    print(
        f"standby trainer (pid {os.getpid()}) preloaded {request.model} ({request.backend}, "
        f"max_seq_length {request.max_seq_length}) in {loaded.seconds:.1f} s",
        flush=True,
    )


def serve(argv0: str) -> int:
    from trainer.lifeline import die_with_parent

    die_with_parent(None)  # the worker that started us: its death ends the standby
    started = time.monotonic()
    loaded = import_packages()
    print(
        f"standby trainer (pid {os.getpid()}) ready in {time.monotonic() - started:.1f} s ({', '.join(loaded)})",
        flush=True,
    )
    return wait_and_run(argv0, loaded)


def wait_and_run(argv0: str, loaded: list[str]) -> int:
    """Wait for the job on stdin and become its trainer (0 at end of input, with no job). What both
    kinds of standby do once their imports (`loaded`) are done: an exec'd one (`serve`) and one the
    trainer fork server forked."""
    job = wait_for_job(StdinLines())
    if job is None:
        return 0
    assigned = time.monotonic()
    job_id = take_job(job)
    spec = job_spec(job_id) if "unsloth" in loaded or preload.PRELOADED is not None else None
    if "unsloth" in loaded and asks_for_plain_transformers(spec):
        # Unsloth has patched transformers and TRL in this process.
        start_clean(job_id, "asks for backend 'transformers': starting a trainer without Unsloth")
    if free_other_model(job_id, spec, loaded):
        start_clean(job_id, "finds the preloaded model's memory not given back: starting a clean trainer")
    print(f"standby trainer (pid {os.getpid()}, {', '.join(loaded)} imported) takes job {job_id}", flush=True)
    from trainer.run import main

    return main([argv0, str(job_id)], started=assigned)  # it watches parent_pid (PARENT_WATCHED_ENV)


def start_clean(job_id: int, why: str) -> None:
    """Become a fresh `python -m trainer JOB` as the same process (its pid, output and parent watch
    stay), at the cost of the imports."""
    print(f"job {job_id} {why}", flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "trainer", str(job_id)])


def take_job(job: dict[str, Any]) -> int:
    """Become the trainer of `job` ({"job_id", "parent_pid", "workdir"}, and "log" for a forked rank),
    as a trainer the horse starts would be: output appended to the job's trainer.log, in its
    working directory, the horse (not our parent) watched. Also what a trainer forked by the fork server does."""
    from core.config import get_settings
    from core.contract import PARENT_PID_ENV, PARENT_WATCHED_ENV

    job_id, parent_pid = int(job["job_id"]), int(job["parent_pid"])
    job_dir = get_settings().job_dir(job_id)
    job_dir.mkdir(parents=True, exist_ok=True)
    # A rank other than 0 writes trainer-rank<N>.log (worker/ranks.rank_log): a name in the job's
    # folder, never a path.
    name = str(job.get("log") or "trainer.log")
    if not LOG_NAME.fullmatch(name):
        raise ValueError(f"not a trainer log's name: {name!r}")
    log = os.open(job_dir / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.chdir(job["workdir"])
    os.environ[PARENT_PID_ENV] = str(parent_pid)
    os.environ[PARENT_WATCHED_ENV] = "1"
    return job_id


def job_spec(job_id: int) -> Any:
    """The job's spec (core.spec.JobSpec), None where the job or a valid spec is gone (the trainer
    then says so as any trainer would)."""
    from pydantic import ValidationError

    from core.db import session_scope
    from core.models import Job
    from core.spec import JobSpec

    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None:
            return None
        try:
            return JobSpec.model_validate(job.spec)
        except ValidationError:
            return None


def asks_for_plain_transformers(spec: Any) -> bool:
    return spec is not None and spec.backend == "transformers"


def free_other_model(job_id: int, spec: Any, loaded: list[str]) -> bool:
    """Free a preloaded model that is not the job's (its loading would otherwise find the card
    holding it). True when the card was not given back (something kept a reference to the
    model): the job must then start in a clean process."""
    if preload.PRELOADED is None:
        return False
    if spec is not None:
        backend = spec.backend if spec.backend != "auto" else "unsloth" if "unsloth" in loaded else "transformers"
        if preload.matches(preload.Request(spec.model, backend, spec.hyperparameters.max_seq_length)):
            return False  # the job's trainer takes it (Run.load_model)
    what = preload.PRELOADED.request
    left = preload.release()
    print(
        f"job {job_id} does not train the preloaded {what.model} ({what.backend}, max_seq_length "
        f"{what.max_seq_length}): freed it, {left / 2**30:.2f} GiB still allocated",
        flush=True,
    )
    return left > preload.LEFT_ALLOCATED_MAX_BYTES
