"""Jobs placed by Ray (RAY_ADDRESS set): the work horse hands the job's ranks to Ray Train's
`TorchTrainer`, which gang-places them with a placement group on whichever nodes have the
resources (a GPU and RAY_CPUS_PER_RANK CPUs a rank; CPUs alone, joined by gloo, on a cluster
without GPUs), and restarts the whole group after a rank or a node is lost (`FailureConfig`,
RAY_MAX_FAILURES times), each restart resuming from the newest checkpoint published to the
shared store (STORAGE_URL).

Each rank runs the same trainer as on one host: Ray's worker for the rank starts `python -m
trainer <job id>` with the environment torchrun would give it (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR: rank 0's node, MASTER_PORT: a port rank 0 picked and
sent to the others over Ray's own process group), watches it, and carries cancel, pause and stop
to it. Where the rank's host runs the worker's trainer fork server (TRAINER_FORKSERVER: a host
without GPUs) the trainer is forked from it instead, its imports done, as the work horse's own
ranks are. Nothing of the trainer is imported here (worker/ and trainer/ share only core/).

One small Ray actor per job, `JobControl`, is what the work horse and the ranks share: the stop
asked for, where each rank runs, and how rank 0's trainer ended (its result file, which the horse
writes into its own DATA_DIR for TrainerWatch to read as it reads a local trainer's).

The module imports Ray only when a RayGroup is made: the embedded default never loads it."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from core import stop_requests
from core.config import get_settings
from core.contract import PARENT_PID_ENV, RESULT_FILE, ErrorCode, TrainerOutcome, TrainerResult
from worker.forkserver import fork_trainer
from worker.ranks import RANK_LOG_TAIL_LINES, rank_log, start_trainer
from worker.standby import AdoptedTrainer

logger = logging.getLogger(__name__)

RANK_POLL_S = 0.5
CONTROL_TIMEOUT_S = 10.0
# Result codes that call for a restart of the group by Ray (FailureConfig): the trainer died or
# lost a peer. Any other ending (success, a failure the trainer understood, a stop) is the job's.
RESTARTABLE = {None, ErrorCode.trainer_crashed, ErrorCode.worker_lost}
NAMESPACE = "finetune"


class RayUnreachable(RuntimeError):
    """RAY_ADDRESS does not answer: ray.init would wait for minutes on a cluster that is gone."""


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Raise RayUnreachable when the head's host:port takes no connection (other address forms,
    such as "auto" or ray://, are left to ray.init)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise RayUnreachable(f"the Ray cluster at RAY_ADDRESS={address} cannot be reached ({exc})") from exc


class RankFailed(RuntimeError):
    """Raised in a rank's Ray worker so that Ray restarts the group (FailureConfig)."""


def control_name(job_id: int) -> str:
    return f"job-{job_id}-control"


class JobControl:
    """What the work horse and a job's ranks share through Ray (made a Ray actor by _control_class)."""

    def __init__(self) -> None:
        self.request: str | None = None
        self.ranks: dict[int, dict[str, Any]] = {}
        self.starts = 0  # times rank 0 started: more than 1 means Ray restarted the group
        self.result: dict[str, Any] | None = None
        self.failures: list[dict[str, Any]] = []

    def ask(self, reason: str) -> None:
        self.request = reason if reason == "kill" else stop_requests.stronger(self.request, reason)

    def asked(self) -> str | None:
        return self.request

    def started(self, rank: int, where: dict[str, Any]) -> None:
        if rank == 0:
            self.starts += 1
        self.ranks[rank] = where

    def ended(self, rank: int, returncode: int, result: dict[str, Any] | None, log_tail: str) -> None:
        if rank == 0:
            self.result = {"returncode": returncode, "result": result}
        if returncode != 0:
            self.failures.append({"rank": rank, "returncode": returncode, "log_tail": log_tail})

    def state(self) -> dict[str, Any]:
        return {"ranks": self.ranks, "starts": self.starts, "result": self.result, "failures": self.failures}


def _control_class() -> Any:
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(JobControl)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def run_rank(config: dict[str, Any]) -> None:
    """One rank, in the Ray worker Ray Train placed it in: start the trainer, carry requests to it,
    report how it ended; raise (for Ray to restart the group) when it died without a result of its
    own, or because a peer was lost."""
    import ray
    import ray.train
    import torch.distributed as dist

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    port: list[int | None] = [free_port() if rank == 0 else None]
    dist.broadcast_object_list(port, src=0)  # Ray's own process group, joined before this runs
    job_id, job_dir = int(config["job_id"]), Path(config["job_dir"])
    job_dir.mkdir(parents=True, exist_ok=True)
    control = ray.get_actor(control_name(job_id), namespace=NAMESPACE)
    env = {
        **config["env"],
        "RANK": str(rank),
        "LOCAL_RANK": str(context.get_local_rank()),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(context.get_local_world_size()),
        "GROUP_RANK": str(context.get_node_rank()),
        "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
        "MASTER_PORT": str(port[0]),
        PARENT_PID_ENV: str(os.getpid()),
    }
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")  # what Ray gave this node's ranks
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    if rank == 0:
        (job_dir / RESULT_FILE).unlink(missing_ok=True)
    where = {
        "host": socket.gethostname(),
        "node_ip": ray.util.get_node_ip_address(),  # type: ignore[no-untyped-call]
        "node_id": ray.get_runtime_context().get_node_id(),
        "gpus": gpus,
        "pid": os.getpid(),
    }
    ray.get(control.started.remote(rank, where), timeout=CONTROL_TIMEOUT_S)
    workdir = tempfile.mkdtemp(prefix=f"trainer-{job_id}-rank{rank}-")
    child = _start(job_id, env, Path(workdir), rank_log(job_dir, rank), config.get("forkserver"))
    try:
        returncode = _watch(child, control, job_dir)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        shutil.rmtree(workdir, ignore_errors=True)  # also how a fork server knows to reap its child
    result = _read_result(job_dir) if rank == 0 else None
    tail = _log_tail(rank_log(job_dir, rank)) if returncode != 0 else ""
    ray.get(control.ended.remote(rank, returncode, result, tail), timeout=CONTROL_TIMEOUT_S)
    code = (result or {}).get("error_code") if rank == 0 else None
    if returncode != 0 and (rank != 0 or code in RESTARTABLE):
        raise RankFailed(f"rank {rank} of job {job_id} ended with {returncode}")


def _start(
    job_id: int, env: dict[str, str], workdir: Path, log: Path, forkserver: str | None
) -> subprocess.Popen[bytes] | AdoptedTrainer:
    """The rank's trainer: forked by the fork server the worker named when this host runs it (the
    socket is a path on the worker's host: on another node it is absent, or another worker's
    server, which forks a trainer alike), else a process of its own."""
    if forkserver and Path(forkserver).exists():
        forked = fork_trainer(forkserver, job_id, workdir, env, log=log.name)
        if forked is not None:
            return forked
    return start_trainer(job_id, env, workdir, log)


def _watch(child: subprocess.Popen[bytes] | AdoptedTrainer, control: Any, job_dir: Path) -> int:
    """Wait for the trainer, carrying the stop the work horse asked for: in the request file, and
    as its signal once the trainer is ready for signals (core/stop_requests.py); kill on `kill`."""
    import ray

    carried: str | None = None
    signalled: set[str] = set()
    while (code := child.poll()) is None:
        time.sleep(RANK_POLL_S)
        try:
            asked = ray.get(control.asked.remote(), timeout=CONTROL_TIMEOUT_S)
        except Exception as exc:  # the head or the control actor gone: the trainer goes on
            logger.warning("job control not reachable: %s", exc)
            continue
        if asked == "kill":
            child.kill()
            continue
        if asked is not None and asked != carried:
            stop_requests.write_request(job_dir, asked)
            carried = asked
        if carried is not None and carried not in signalled and stop_requests.is_ready(job_dir, child.pid):
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(stop_requests.SIGNALS[carried])
            signalled.add(carried)
    return code


def _read_result(job_dir: Path) -> dict[str, Any] | None:
    try:
        return TrainerResult.model_validate_json((job_dir / RESULT_FILE).read_bytes()).model_dump(mode="json")
    except (OSError, ValueError):
        return None


def _log_tail(path: Path) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-RANK_LOG_TAIL_LINES:])
    except OSError:
        return ""


class RayGroup:
    """A job's ranks placed by Ray Train, to TrainerWatch like one child process (poll,
    send_signal, kill, wait). `fit` runs on a thread of the work horse; the horse asks for stops
    through the job's JobControl actor."""

    def __init__(self, job_id: int, world_size: int, env: dict[str, str], job_dir: Path) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        settings = get_settings()
        self.job_id, self.world_size, self.job_dir = job_id, world_size, job_dir
        self.returncode: int | None = None
        self.first_failure: dict[str, Any] | None = None
        self.restarts_seen = 0
        self.placed: dict[str, Any] | None = None
        self.lost_cluster: str | None = None
        started = time.monotonic()
        check_reachable(settings.ray_address)
        ray.init(address=settings.ray_address, namespace=NAMESPACE, log_to_driver=False, ignore_reinit_error=True)
        self.use_gpu = ray.cluster_resources().get("GPU", 0) > 0  # type: ignore[no-untyped-call]
        with contextlib.suppress(ValueError):  # an earlier attempt's, left by a horse that died
            ray.kill(ray.get_actor(control_name(job_id), namespace=NAMESPACE))
        # On this worker's own node: a node lost with the job's ranks must not take the job's
        # control with it (Ray restarts the ranks, and they find it again).
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self.control = (
            _control_class().options(name=control_name(job_id), namespace=NAMESPACE, scheduling_strategy=here).remote()
        )
        self.connect_seconds = time.monotonic() - started
        self._thread = threading.Thread(target=self._fit, args=(env,), name=f"ray-job-{job_id}", daemon=True)
        self._thread.start()

    def trainer(self, env: dict[str, str]) -> Any:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        settings = get_settings()
        resources: dict[str, float] = {"CPU": settings.ray_cpus_per_rank}
        if self.use_gpu:
            resources["GPU"] = 1
        return TorchTrainer(
            run_rank,
            train_loop_config={
                "job_id": self.job_id,
                "job_dir": str(self.job_dir),
                "env": env,
                "forkserver": settings.trainer_forkserver,
            },
            scaling_config=ScalingConfig(
                num_workers=self.world_size,
                use_gpu=self.use_gpu,
                resources_per_worker=resources,
                placement_strategy=settings.ray_placement_strategy,
            ),
            torch_config=TorchConfig(backend="nccl" if self.use_gpu else "gloo"),
            run_config=RunConfig(
                name=f"job-{self.job_id}-{uuid.uuid4().hex[:8]}",
                storage_path=str(settings.data_dir.resolve() / "ray"),
                failure_config=FailureConfig(max_failures=settings.ray_max_failures),
            ),
        )

    def _fit(self, env: dict[str, str]) -> None:
        try:
            self.trainer(env).fit()
        except Exception as exc:  # the ranks' failures (past FailureConfig), or the cluster lost
            logger.warning("job %s: Ray Train ended with %s: %s", self.job_id, type(exc).__name__, exc)
            self.lost_cluster = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        finally:
            self._finish()

    def _finish(self) -> None:
        state = self.state()
        ended = (state or {}).get("result")
        failures = (state or {}).get("failures") or []
        self.first_failure = failures[0] if failures else None
        if ended is not None and ended.get("result") is not None:
            self._write_result(TrainerResult.model_validate(ended["result"]))
        elif state is None:
            self._write_result(
                TrainerResult(
                    status=TrainerOutcome.interrupted,
                    error_code=ErrorCode.worker_lost,
                    # The reason the reconciler words its requeue (or failure) with (core/reconcile.py).
                    error_message=f"the Ray cluster at RAY_ADDRESS={get_settings().ray_address} was lost while the "
                    f"job ran ({self.lost_cluster})",
                )
            )
        if ended is not None and ended.get("result") is not None:
            self.returncode = int(ended["returncode"])
        else:
            self.returncode = int(self.first_failure["returncode"]) if self.first_failure else 1
        with contextlib.suppress(Exception):
            import ray

            ray.kill(self.control)

    def _write_result(self, result: TrainerResult) -> None:
        self.job_dir.mkdir(parents=True, exist_ok=True)
        temporary = self.job_dir / f"{RESULT_FILE}.ray"
        temporary.write_text(result.model_dump_json())
        temporary.replace(self.job_dir / RESULT_FILE)

    def state(self) -> dict[str, Any] | None:
        import ray

        try:
            return dict(ray.get(self.control.state.remote(), timeout=CONTROL_TIMEOUT_S))
        except Exception as exc:
            logger.warning("job %s: its Ray control actor does not answer: %s", self.job_id, exc)
            return None

    def news(self) -> list[str]:
        """What happened in Ray since the last look, as event messages: where the ranks were placed,
        and each restart of the group by Ray (FailureConfig)."""
        state = self.state() if self.returncode is None else None
        if state is None:
            return []
        messages = []
        ranks = state["ranks"]
        if len(ranks) == self.world_size and ranks != self.placed:
            self.placed = dict(ranks)
            where = ", ".join(
                f"rank {rank} on {info['host']} ({info['node_ip']}"
                + (f", GPU {info['gpus']})" if info.get("gpus") else ", CPU)")
                for rank, info in sorted(ranks.items())
            )
            messages.append(f"placed by Ray: {where}")
        if state["starts"] > 1 + self.restarts_seen:
            self.restarts_seen = state["starts"] - 1
            lost = state["failures"][-1] if state["failures"] else None
            why = f" after rank {lost['rank']} ended with {lost['returncode']}" if lost else ""
            messages.append(
                f"Ray restarted the job's {self.world_size} ranks{why} (restart {self.restarts_seen} of at most "
                f"{get_settings().ray_max_failures}); it resumes from its newest published checkpoint"
            )
        return messages

    @property
    def pids(self) -> list[int]:
        return []  # on other hosts: requests go through the control actor

    def poll(self) -> int | None:
        return self.returncode

    def ask(self, reason: str) -> None:
        with contextlib.suppress(Exception):
            self.control.ask.remote(reason)

    def send_signal(self, sig: int) -> None:
        reasons = {signal.SIGTERM: "terminated", signal.SIGKILL: "kill"}
        reason = reasons.get(signal.Signals(sig)) or next(
            (r for r, s in stop_requests.SIGNALS.items() if s == sig), "terminated"
        )
        self.ask(reason)

    def kill(self) -> None:
        self.ask("kill")

    def wait(self, timeout_s: float) -> int | None:
        self._thread.join(timeout_s)
        return self.returncode

    def failure_report(self) -> str | None:
        failure = self.first_failure
        if failure is None:
            return None
        code = int(failure["returncode"])
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        tail = failure.get("log_tail") or ""
        shown = f" Last lines of its log:\n{tail}\n" if tail else " "
        return f"Rank {failure['rank']} of {self.world_size} (placed by Ray) {how}.{shown}"
