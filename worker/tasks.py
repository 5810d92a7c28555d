"""The RQ task: claim a job (once the disk can hold its checkpoints), train it in a trainer process
of its own (started for it, or the worker's standby trainer: worker/standby.py), watch it, carry
cancel, pause and the worker's stop to it, and record how it ended.

This module runs in the RQ work horse and imports no torch: the child does the training, so a
crash or an OOM there cannot take the worker down, and the GPU's memory is all returned when
the child exits."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, update
from sqlalchemy import select as sa_select
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from core import stop_requests
from core.checkpoint_files import hash_checkpoint
from core.checkpoint_store import sweep_partials, sync_records
from core.config import get_settings
from core.contract import PARENT_PID_ENV, RESULT_FILE, ErrorCode, EventKind, TrainerOutcome, TrainerResult
from core.db import get_engine, session_scope
from core.diskspace import low_on_space, write_despite_full_disk
from core.events import add_event
from core.measurements import measured_message, record_finished_job
from core.models import Checkpoint, CheckpointStatus, Job, JobStatus, utcnow
from core.optimizer_state import drop_optimizer_state
from core.planner import PlanError, fsdp_layout, read_config, resolved_strategy, shape_from_config
from core.queue import get_redis
from core.reconcile import recover_lost_job
from core.spec import JobSpec
from core.transitions import move_job
from worker import gpus, standby
from worker.diskguard import wait_for_disk
from worker.forkserver import fork_trainer
from worker.gpus import CannotFitHost, Lease, cuda_devices_env, wait_for_gpus
from worker.heartbeat import STARTING_ALLOWANCE_S, Heartbeat
from worker.ranks import RankGroup, start_trainer
from worker.ray_placement import RayGroup, RayUnreachable
from worker.stalls import StallWatch
from worker.stops import record_pause, requeue_after_stop, retry_with_smaller_batch

logger = logging.getLogger(__name__)
# The trainer: a child the horse started, the worker's standby trainer that took the job, one the
# trainer fork server forked for it (worker/forkserver.py), or ranks Ray placed (worker/ray_placement.py).
Child = subprocess.Popen[bytes] | standby.AdoptedTrainer | RankGroup | RayGroup

POLL_INTERVAL_S = 1.0
LOG_TAIL_LINES = 15
# Cache locations the trainer must find although it runs in an empty working directory.
CACHE_VARIABLES = ("HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE", "XDG_CACHE_HOME")
# What the trainer keeps of the worker's environment (shell patterns): the system's basics, the
# libraries it runs (Python, Hugging Face, torch, CUDA or ROCm, NCCL, Triton, Unsloth, bitsandbytes,
# the BLAS and OpenMP runtimes), proxies and CA bundles to reach the Hub, and the variables of this
# project and of coverage. Nothing else: the trainer runs user data and third-party code, so the
# API's tokens, the webhook key, the Redis URL and whatever else the operator's environment holds
# stay out (TRAINER_ENV_PASSTHROUGH adds more, e.g. WANDB_*).
TRAINER_ENV_KEPT = (
    *("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "LC_*", "TZ", "TMPDIR", "TEMP", "TMP"),
    *("PYTHON*", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "LD_PRELOAD", "LIBRARY_PATH", "CPATH", "CC", "CXX"),
    *("HF_*", "HUGGINGFACE_*", "HUGGING_FACE_*", "TRANSFORMERS_*", "TOKENIZERS_*", "SAFETENSORS_*", "XDG_*"),
    *("TORCH*", "PYTORCH_*", "CUDA_*", "NVIDIA_*", "CUBLAS_*", "CUDNN_*", "NCCL_*", "GLOO_*", "TRITON_*"),
    *("HIP_*", "ROCM_*", "ROCR_*", "HSA_*", "MIOPEN_*", "RCCL_*"),
    *("UNSLOTH_*", "BNB_*", "ACCELERATE_*", "FSDP_*", "OMP_*", "MKL_*", "KMP_*", "OPENBLAS_*", "MALLOC_*"),
    *("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "no_proxy", "all_proxy"),
    *("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"),
    # The shared store's client (STORAGE_URL): the trainer publishes checkpoints and reads uploads there.
    "AWS_*",
    # FINETUNE_* but the CLI's: FINETUNE_TOKEN is an API token, and the trainer calls no API.
    *("FINETUNE_FAILPOINTS", "FINETUNE_PARENT_*", "COVERAGE_*", "COV_CORE_*"),
)


@dataclass(frozen=True)
class Polled:
    """What one look at the database found (all unknown when it could not be read)."""

    cancel_requested: bool = False
    pause_requested: bool = False
    phase: str | None = None
    step: int | None = None
    pending: list[int] = field(default_factory=list)  # checkpoints still to be hashed
    eta_seconds: float | None = None


def child_pids(child: Child) -> list[int]:
    return child.pids if isinstance(child, RankGroup | RayGroup) else [child.pid]


def signal_process(child: Child, pid: int, sig: int) -> None:
    """One of the trainer's processes (never one that has been reaped: its pid may be another's)."""
    if isinstance(child, RankGroup):
        child.send_signal_to(pid, sig)
    elif isinstance(child, RayGroup):
        return  # on Ray's nodes: requests travel through the job's control actor (carry_requests)
    else:
        child.send_signal(sig)


def first_failed_rank(child: Child | None) -> int | None:
    """The rank that failed first, for a job of several ranks (on this host or placed by Ray)."""
    if isinstance(child, RankGroup):
        return child.first_failure.rank if child.first_failure is not None else None
    if isinstance(child, RayGroup):
        return int(child.first_failure["rank"]) if child.first_failure is not None else None
    return None


def worker_name() -> str:
    """The RQ worker's own name (host, GPUs, pid: see worker/__main__.py) when run by RQ, which
    puts it in the work horse's environment (reading it from Redis would fail while Redis is away)."""
    name = os.environ.get("RQ_WORKER_ID")
    if name:
        return name
    return f"{socket.gethostname()}-gpu{os.environ.get('CUDA_VISIBLE_DEVICES', 'all')}-{os.getpid()}"


def trainer_environment(settings_env: dict[str, str], cache_env: dict[str, str]) -> dict[str, str]:
    """The trainer's environment: what it needs of ours (TRAINER_ENV_KEPT and the operator's
    TRAINER_ENV_PASSTHROUGH), the settings and cache folders as absolute paths (it runs in another
    working directory), and the project importable from anywhere. Every start path (a trainer
    started for its job, the standby, each rank of a multi-GPU job) gets this one."""
    kept = (*TRAINER_ENV_KEPT, *get_settings().trainer_env_passthrough)
    env = {
        **cache_env,
        **{name: value for name, value in os.environ.items() if any(fnmatchcase(name, p) for p in kept)},
        **settings_env,
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        PARENT_PID_ENV: str(os.getpid()),
    }
    for name in CACHE_VARIABLES:
        if env.get(name) and not Path(env[name]).is_absolute():
            env[name] = str(Path(env[name]).resolve())
    project = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (project, env.get("PYTHONPATH"))))
    return env


def compile_cache_env(cache_dir: Path) -> dict[str, str]:
    """Where Unsloth, torch.compile and Triton keep what they compile, under DATA_DIR so it
    outlives /tmp and container restarts: the second job of a model skips most of the first
    step's compile. Variables the operator set win (they come later in the merge)."""
    folders = {
        "UNSLOTH_COMPILE_LOCATION": cache_dir / "unsloth_compiled_cache",
        "UNSLOTH_MEGA_CACHE_DIR": cache_dir / "unsloth_mega_cache",
        "TORCHINDUCTOR_CACHE_DIR": cache_dir / "torchinductor",
        "TRITON_CACHE_DIR": cache_dir / "triton",
    }
    for folder in folders.values():
        # Unsloth loads its compile bundles only from a folder nobody else can write to.
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Inductor's FX graph cache and AOTAutograd's cache (on by default in torch 2.11; said here so a
    # torch that defaults otherwise still reuses a repeat shape's compiled graphs from the folder above).
    return {
        **{name: str(folder) for name, folder in folders.items()},
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
    }


def claim(job_id: int, placement: dict[str, object] | None = None) -> int | None:
    """Move the job from queued to running, once. Returns the attempt number, or None when the
    job was cancelled, already taken, or finished (then there is nothing to do)."""
    now = utcnow()
    with session_scope() as session:
        result = session.execute(
            update(Job)
            .where(col(Job.id) == job_id, col(Job.status) == JobStatus.queued, col(Job.deleted_at).is_(None))
            .values(
                status=JobStatus.running,
                attempts=Job.attempts + 1,
                worker_name=worker_name(),
                heartbeat_at=now,
                cancel_requested_at=None,
                stalled_since=None,
                pause_requested_at=None,
                phase="starting",
                placement=placement,
            )
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            return None
        job = session.get(Job, job_id)
        assert job is not None
        if job.started_at is None:
            job.started_at = now
        session.add(job)
        add_event(
            session=session,
            job_id=job_id,
            kind=EventKind.started,
            message=f"started on {job.worker_name} (attempt {job.attempts}){on_gpus(placement)}",
        )
        return job.attempts


def on_gpus(placement: dict[str, object] | None) -> str:
    cards = placement.get("gpus") if placement else None
    if not placement or not isinstance(cards, list) or not cards:
        return ""
    names = ", ".join(f"{g['index']} ({g['name']}, {g['uuid']})" for g in cards)
    return f" on GPU{'s' if len(cards) > 1 else ''} {names}, strategy {placement.get('strategy')}"


def run_job(job_id: int) -> str:
    # The work horse is forked from the worker: never reuse the parent's database connections.
    get_engine().dispose(close=False)
    if not wait_for_disk(job_id):
        logger.info("job %s is not queued any more; nothing to do", job_id)
        return "skipped"
    with session_scope() as session:
        job = session.get(Job, job_id)
        spec = JobSpec.model_validate(job.spec) if job is not None and job.spec else None
    if spec is None:
        return "skipped"
    try:
        # With Ray, Ray's placement group is the job's lease: it waits there for the cluster's GPUs.
        ray = bool(get_settings().ray_address)
        lease = Lease(job_id, []) if ray else wait_for_gpus(job_id, spec.gpus, get_redis(), gpus.INVENTORY)
    except CannotFitHost as exc:
        fail_unplaceable(job_id, str(exc))
        return "failed"
    if lease is None:
        logger.info("job %s is not queued any more; nothing to do", job_id)
        return "skipped"
    try:
        strategy, layout = resolve_strategy(spec, lease)
        placement = lease.placement(spec.gpus, strategy, effective_batch(spec), layout)
        attempt = claim(job_id, placement)
        if attempt is None:
            logger.info("job %s is not queued any more; nothing to do", job_id)
            return "skipped"
        return TrainerWatch(job_id, lease).run()
    finally:
        lease.release()


def effective_batch(spec: JobSpec) -> int:
    hp = spec.hyperparameters
    return hp.sequences_per_step * spec.gpus


def resolve_strategy(spec: JobSpec, lease: Lease) -> tuple[str, str | None]:
    """The planner's strategy for the leased cards (core/planner.resolved_strategy) and, for fsdp,
    Unsloth's layout (core/planner.fsdp_layout; None when the model's config cannot be read:
    Unsloth then picks it). The operator's GPU_MEMORY_BYTES stands for the cards' size, as it
    does when the API plans."""
    card = get_settings().gpu_memory_bytes or min((g.memory_bytes for g in lease.gpus if g.memory_bytes), default=None)
    try:
        shape = shape_from_config(read_config(spec.model, allow_network=False)) if spec.gpus > 1 else None
    except PlanError:
        shape = None
    strategy = resolved_strategy(spec, shape, card)
    layout = (
        fsdp_layout(shape, spec.hyperparameters, card, spec.gpus, spec.method) if strategy == "fsdp" and shape else None
    )
    return strategy, layout


def add_trained_tokens(session: Session, job_id: int, result: TrainerResult) -> None:
    """Add the tokens an attempt's trainer trained on to the job's trained_tokens (every attempt's:
    a resumed job trains again the steps after its checkpoint, and those count again)."""
    tokens = result.extra_fields().get("tokens")
    if not isinstance(tokens, int) or tokens <= 0:
        return
    session.execute(
        update(Job)
        .where(col(Job.id) == job_id)
        .values(trained_tokens=func.coalesce(col(Job.trained_tokens), 0) + tokens)
    )


def fail_unplaceable(job_id: int, reason: str) -> None:
    message = (
        f'{reason}. Resubmit it with fewer GPUs ("gpus"), or run it on a queue (QUEUE_NAME) whose workers\' '
        "hosts have that many."
    )
    with session_scope() as session:
        if move_job(
            session,
            job_id,
            JobStatus.queued,
            status=JobStatus.failed,
            error_code=ErrorCode.gpu_unavailable,
            error_message=message,
            finished_at=utcnow(),
        ):
            add_event(session=session, job_id=job_id, kind=EventKind.failed, message=f"failed: {message}")


class TrainerWatch:
    """Starts the trainer child and keeps the job's record honest while it runs."""

    def __init__(self, job_id: int, lease: Lease | None = None) -> None:
        self.job_id = job_id
        self.lease = lease or Lease(job_id, [])
        self.settings = get_settings()
        self.job_dir = self.settings.job_dir(job_id)
        self.hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hash")
        self.hashing: dict[int, Future[None]] = {}
        # The strongest stop asked of the trainer so far (core/stop_requests.py), and when a cancel
        # was first seen: the trainer is killed if it has not ended CANCEL_GRACE_S later.
        self.requested: str | None = None
        self.cancel_sent_at: float | None = None
        # Which of the trainer's processes were sent which request's signal (each is signalled
        # once it is ready for signals, ranks one by one).
        self.signalled: set[tuple[int, str]] = set()
        # The worker was asked to stop (its SIGTERM, passed on as SIGUSR2): the trainer saves a
        # checkpoint at its next step and ends.
        self.stop_asked_at: float | None = None
        self.stalls = StallWatch(job_id, self.job_dir, self.settings.stall_after_s)
        self.heartbeat = Heartbeat(job_id, self.settings.heartbeat_interval_s)  # beating while run() runs
        self.database_trouble_since: float | None = None
        # The trainer's working directory: empty, so that a model or dataset name shaped like a
        # Hub id ("org/name") can only ever reach the Hub or its cache, never a local folder of
        # that relative name (ALLOWED_LOCAL_ROOTS decides which local paths a job may use).
        self.workdir = Path(tempfile.mkdtemp(prefix=f"trainer-{job_id}-"))

    def start_child(self) -> Child:
        self.job_dir.mkdir(parents=True, exist_ok=True)
        (self.job_dir / RESULT_FILE).unlink(missing_ok=True)
        stop_requests.clear(self.job_dir)  # nothing an earlier attempt was asked applies to this one
        self.stalls.clear()
        world_size = self.world_size()
        visible = self.lease.cuda_visible_devices()
        if self.settings.ray_address:  # Ray places the ranks, and gives each its GPU
            return RayGroup(self.job_id, world_size, self.trainer_env(), self.job_dir)
        if world_size == 1 and (visible is None or standby.CARD in (None, visible)):
            adopted = standby.adopt(self.job_id, self.workdir)
            if adopted is not None:
                return adopted
        env = self.trainer_env()
        if visible is not None:
            env.update(cuda_devices_env(visible))
        # The fork server runs only where torch sees no GPU (CUDA cannot cross a fork): there the
        # cards a job leased are the pretended ones of WORKER_GPUS, and it forks any trainer.
        forkserver = self.settings.trainer_forkserver or None
        if world_size > 1:
            return RankGroup(self.job_id, world_size, env, self.job_dir, self.workdir, forkserver)
        if forkserver:
            forked = fork_trainer(forkserver, self.job_id, self.workdir, env)
            if forked is not None:
                return forked
        return start_trainer(self.job_id, env, self.workdir, self.job_dir / "trainer.log")

    def trainer_env(self) -> dict[str, str]:
        return trainer_environment(
            self.settings.as_environment(), compile_cache_env(self.settings.data_dir.resolve() / "cache")
        )

    def world_size(self) -> int:
        with session_scope() as session:
            job = session.get(Job, self.job_id)
            placement = job.placement if job is not None else None
        return int((placement or {}).get("world_size") or 1)

    def run(self) -> str:
        # In the work horse, the main thread; tests also run the task in a thread, with no worker to stop it.
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGUSR2, self.worker_stopping) if in_main_thread else None
        try:
            with self.heartbeat:
                try:
                    child = self.start_child()
                except RayUnreachable as exc:  # the cluster is gone: as when it goes while the job runs
                    self.write_result(
                        TrainerResult(
                            status=TrainerOutcome.interrupted,
                            error_code=ErrorCode.worker_lost,
                            error_message=str(exc),  # the reconciler's words add what happens next
                        )
                    )
                    return self.finish(1)
                return self.watch(child)
        finally:
            if in_main_thread:
                signal.signal(signal.SIGUSR2, previous)
            shutil.rmtree(self.workdir, ignore_errors=True)

    def worker_stopping(self, *_: object) -> None:
        """The worker got SIGTERM (a warm shutdown): the trainer saves a checkpoint at its next
        step and ends, and the job goes back to the queue to continue on another worker."""
        if self.stop_asked_at is None:
            self.stop_asked_at = time.monotonic()

    def watch(self, child: Child) -> str:
        eta_s: float | None = None
        try:
            while child.poll() is None:
                self.heartbeat.alive()
                time.sleep(POLL_INTERVAL_S)
                # The job's ETA, once it has one, tells the GPU line when its cards free (backfilling).
                self.lease.renew_if_due(self.settings.heartbeat_interval_s, eta_s)
                polled = self.poll_database()
                eta_s = polled.eta_seconds if polled.eta_seconds is not None else eta_s
                self.carry_requests(child, polled)
                self.stalls.observe(polled.phase, polled.step, child_pids(child))
                self.hash_checkpoints(polled.pending)
                if isinstance(child, RayGroup):
                    self.record_ray_news(child)
        except BaseException:
            # The horse is being stopped (RQ stop command, shutdown): do not leave an orphan.
            child.send_signal(signal.SIGTERM)
            raise
        returncode = child.poll()
        assert returncode is not None
        self.heartbeat.allow(STARTING_ALLOWANCE_S)
        return self.finish(returncode, child)

    def poll_database(self) -> Polled:
        """One read a poll (the heartbeat has a thread of its own: worker/heartbeat.py): whether a
        cancel or a pause was asked for, the job's phase and step, and the checkpoints the trainer
        saved that still need hashing. A database that cannot be read for a while (a long lock)
        does not stop the watch: the trainer goes on, or fails on its own and says why."""
        try:
            with session_scope() as session:
                columns = [
                    col(Job.cancel_requested_at),
                    col(Job.pause_requested_at),
                    col(Job.phase),
                    col(Job.step),
                    col(Job.eta_seconds),
                ]
                requests = session.execute(sa_select(*columns).where(col(Job.id) == self.job_id)).first()
                pending = session.exec(
                    select(Checkpoint.id).where(
                        Checkpoint.job_id == self.job_id, Checkpoint.status == CheckpointStatus.hashing
                    )
                ).all()
        except SQLAlchemyError as exc:
            if self.database_trouble_since is None:
                self.database_trouble_since = time.monotonic()
                logger.warning("job %s: the job database cannot be reached (%s); the trainer goes on", self.job_id, exc)
            return Polled()
        if self.database_trouble_since is not None:
            logger.info(
                "job %s: the job database answers again after %.0f s",
                self.job_id,
                time.monotonic() - self.database_trouble_since,
            )
            self.database_trouble_since = None
        if requests is None:
            return Polled(pending=[cid for cid in pending if cid is not None])
        cancel_requested_at, pause_requested_at, phase, step, eta_seconds = requests
        return Polled(
            cancel_requested=cancel_requested_at is not None,
            pause_requested=pause_requested_at is not None,
            phase=phase,
            step=step,
            pending=[cid for cid in pending if cid is not None],
            eta_seconds=eta_seconds,
        )

    def hash_remaining(self) -> None:
        """Hash every recorded checkpoint of the job, once its final status is written. A hash
        that cannot be recorded now (a full disk) is left to the workers' maintenance."""
        self.hash_checkpoints(self.poll_database().pending)
        for checkpoint_id, future in self.hashing.items():
            try:
                future.result()
            except Exception as exc:
                logger.warning(
                    "job %s: checkpoint %s not hashed yet (%s); a worker's maintenance will",
                    self.job_id,
                    checkpoint_id,
                    exc,
                )
        self.hasher.shutdown()

    def carry_requests(self, child: Child, polled: Polled) -> None:
        """Carry cancel, pause and the worker's own stop to the trainer: the strongest asked for in
        its request file, and as a signal to each of its processes once that process is ready for
        signals (core/stop_requests.py). A cancel that has not ended the trainer within
        CANCEL_GRACE_S kills it, as a stop does after STOP_GRACE_S: it keeps nothing, so waiting
        longer would only hold the GPU."""
        asked = [
            reason
            for reason, wanted in (
                ("cancelled", polled.cancel_requested),
                ("paused", polled.pause_requested),
                ("terminated", self.stop_asked_at is not None),
            )
            if wanted
        ]
        strongest: str | None = None
        for reason in asked:
            strongest = stop_requests.stronger(strongest, reason)
        if strongest is not None and strongest != stop_requests.stronger(self.requested, strongest):
            strongest = self.requested  # never weaken a request (a pause after a cancel changes nothing)
        if strongest is not None and strongest != self.requested:
            self.requested = strongest
            stop_requests.write_request(self.job_dir, strongest)
            if strongest == "cancelled":
                self.cancel_sent_at = time.monotonic()
            if strongest == "terminated":
                self.record_event(
                    EventKind.stopping,
                    "the worker is stopping: the trainer saves a checkpoint at its next step, then the job "
                    "is queued again to continue from it",
                )
        if self.requested is None:
            return
        if isinstance(child, RayGroup):
            child.ask(self.requested)
        for pid in child_pids(child):
            if (pid, self.requested) not in self.signalled and stop_requests.is_ready(self.job_dir, pid):
                signal_process(child, pid, stop_requests.SIGNALS[self.requested])
                self.signalled.add((pid, self.requested))
        if self.cancel_sent_at is not None and time.monotonic() - self.cancel_sent_at > self.settings.cancel_grace_s:
            logger.warning(
                "job %s: the trainer did not end within CANCEL_GRACE_S=%.0f s of the cancel; killing it",
                self.job_id,
                self.settings.cancel_grace_s,
            )
            child.kill()
        elif self.stop_asked_at is not None and time.monotonic() - self.stop_asked_at > self.settings.stop_grace_s:
            logger.warning(
                "job %s: the trainer did not stop within STOP_GRACE_S=%.0f s; killing it",
                self.job_id,
                self.settings.stop_grace_s,
            )
            child.kill()

    def record_ray_news(self, child: RayGroup) -> None:
        """Where Ray placed the ranks (an event, and the job's placement), and Ray's restarts."""
        for message in child.news():
            placed = message.startswith("placed by Ray")
            if placed and child.placed is not None:
                ranks = [{"rank": rank, **where} for rank, where in sorted(child.placed.items())]
                try:
                    with session_scope() as session:
                        job = session.get(Job, self.job_id)
                        if job is not None:
                            job.placement = {**(job.placement or {}), "ranks": ranks}
                            session.add(job)
                except SQLAlchemyError as exc:
                    logger.warning("job %s: could not record its placement (%s)", self.job_id, exc)
            self.record_event(EventKind.placed if placed else EventKind.retried, message)

    def record_event(self, kind: EventKind, message: str) -> None:
        try:
            with session_scope() as session:
                add_event(session=session, job_id=self.job_id, kind=kind, message=message)
        except SQLAlchemyError as exc:
            logger.warning("job %s: could not record the event %r (%s)", self.job_id, message, exc)

    def hash_checkpoints(self, checkpoint_ids: list[int]) -> None:
        for checkpoint_id in checkpoint_ids:
            if checkpoint_id not in self.hashing or self.hashing[checkpoint_id].done():
                self.hashing[checkpoint_id] = self.hasher.submit(hash_checkpoint, self.job_id, checkpoint_id)

    def write_result(self, result: TrainerResult) -> None:
        self.job_dir.mkdir(parents=True, exist_ok=True)
        temporary = self.job_dir / f"{RESULT_FILE}.worker"
        temporary.write_text(result.model_dump_json())
        temporary.replace(self.job_dir / RESULT_FILE)

    def read_result(self) -> TrainerResult | None:
        try:
            return TrainerResult.model_validate_json((self.job_dir / RESULT_FILE).read_bytes())
        except (FileNotFoundError, ValidationError):
            return None

    def log_tail(self) -> str:
        try:
            lines = (self.job_dir / "trainer.log").read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-LOG_TAIL_LINES:])

    def finish(self, returncode: int, child: Child | None = None) -> str:
        """Record how the job ended. First the status, which must land even on a full disk (the
        job must not stay `running`), with the checkpoints the trainer finished but did not record;
        then the hashes, which can wait."""
        result = self.read_result() or self.result_without_report(returncode, child)
        failed_rank = first_failed_rank(child)
        rank0_crashed = result.status == TrainerOutcome.failed and result.error_code == ErrorCode.trainer_crashed
        if (
            failed_rank is not None
            and failed_rank != 0
            # Ray's ranks may have failed in an earlier attempt of a job that then went well: only a
            # rank 0 that crashed too (on the lost peer) has the other rank's story to tell.
            and (
                rank0_crashed
                if isinstance(child, RayGroup)
                else not (result.status == TrainerOutcome.failed and not rank0_crashed)
            )
        ):
            # Rank 0 only saw the others vanish (or was stopped because of them): the failed rank's
            # own story is the one to tell, unless rank 0 named a cause of its own (the same
            # check fails every rank; rank 0's words say what to do).
            result = self.result_without_report(returncode, child)
        checkpoints_dir = self.settings.checkpoints_dir(self.job_id)
        for name, size in sweep_partials(checkpoints_dir):  # the trainer is gone: nobody writes them now
            logger.info("job %s: removed %s, an unfinished checkpoint (%d bytes)", self.job_id, name, size)
        status = result.status

        def record() -> str:
            with session_scope() as session:
                if status in (TrainerOutcome.interrupted, TrainerOutcome.paused) or (
                    result.error_code == ErrorCode.cuda_oom
                ):
                    continued = self.record_stop(session, result)
                    if continued not in (None, "nothing"):
                        add_trained_tokens(session, self.job_id, result)
                        return continued
                    # A cancel was accepted meanwhile (or the job ended otherwise): it is not
                    # paused or queued again, it ends below.
                    session.rollback()
                # In the transaction that ends the job: a finished record, which API processes
                # keep in memory for good, has its count.
                add_trained_tokens(session, self.job_id, result)
                return self.record_end(session, result, checkpoints_dir)

        if status == TrainerOutcome.succeeded:  # before the status, so that `succeeded` is the job's last event
            self.record_measurement()
        # On a full disk this gives up the reserve file, then waits for space rather than give up.
        outcome = write_despite_full_disk(record, what=f"record how job {self.job_id} ended")
        logger.info("job %s %s", self.job_id, outcome)
        self.hash_remaining()
        if outcome == TrainerOutcome.succeeded:
            self.drop_optimizer_state_if_asked()
        return outcome

    def record_measurement(self) -> None:
        """What the succeeded job measured against its plan, for the planner to learn from
        (core/measurements.py), with an event that says both."""
        try:
            with session_scope() as session:
                job = session.get(Job, self.job_id)
                if job is None:
                    return
                row = record_finished_job(
                    session,
                    job,
                    gpu_train_flops=self.settings.gpu_train_flops,
                    gpu_memory_bytes=self.settings.gpu_memory_bytes,
                )
                if row is None:
                    return
                add_event(session=session, job_id=self.job_id, kind=EventKind.measured, message=measured_message(row))
        except (SQLAlchemyError, ValueError, OSError) as exc:
            logger.warning("job %s: its measurement for the planner was not recorded: %s", self.job_id, exc)

    def record_stop(self, session: Session, result: TrainerResult) -> str | None:
        """A trainer that stopped to go on later: paused, queued again after the worker's stop or a
        lost parent, or retried with a smaller micro-batch. None or "nothing" when it does not go
        on (no smaller micro-batch; a cancel accepted meanwhile)."""
        if result.status == TrainerOutcome.interrupted and self.stop_asked_at is not None:
            return requeue_after_stop(session=session, job_id=self.job_id, result=result)
        if result.status == TrainerOutcome.interrupted:  # stopped, not finished: queue it again (it resumes)
            return recover_lost_job(session=session, job_id=self.job_id, reason=str(result.error_message))
        if result.status == TrainerOutcome.paused:
            return record_pause(session=session, job_id=self.job_id, result=result)
        return retry_with_smaller_batch(session=session, job_id=self.job_id, result=result)

    def record_end(self, session: Session, result: TrainerResult, checkpoints_dir: Path) -> str:
        """The job's final status, if it is still running. A cancel that was accepted wins over any
        end but success: a job whose cancel was asked for is never paused, requeued or failed."""
        job = session.get(Job, self.job_id)
        if job is None or job.status != JobStatus.running:
            return "nothing"
        step = max(job.step, result.step or 0)  # progress is written at logging steps; the trainer's is the truth
        if job.cancel_requested_at is not None and result.status not in (
            TrainerOutcome.succeeded,
            TrainerOutcome.cancelled,
        ):
            result = TrainerResult(
                status=TrainerOutcome.cancelled,
                error_code=ErrorCode.cancelled,
                error_message=f"cancelled by request at step {step}",
                step=step,
            )
        status = result.status
        sync_records(session=session, job_id=self.job_id, checkpoints_dir=checkpoints_dir)
        values: dict[str, Any] = {
            "status": JobStatus(status),
            "finished_at": utcnow(),
            "error_code": result.error_code,
            "error_message": result.error_message,
            "step": step,
            "stalled_since": None,
        }
        if status == TrainerOutcome.succeeded:
            values["eta_seconds"] = 0.0
        if not move_job(session, self.job_id, JobStatus.running, **values):
            session.rollback()
            return "nothing"
        message = str(status) if status == TrainerOutcome.succeeded else f"{status}: {result.error_message}"
        add_event(session=session, job_id=self.job_id, kind=EventKind(status), message=message)
        return str(status)

    def drop_optimizer_state_if_asked(self) -> None:
        """After the hashes (which read every file): the spec's drop_optimizer_state_on_success."""
        try:
            with session_scope() as session:
                job = session.get(Job, self.job_id)
                if job is not None and job.spec.get("drop_optimizer_state_on_success"):
                    drop_optimizer_state(
                        session=session, job_id=self.job_id, checkpoints_dir=self.settings.checkpoints_dir(self.job_id)
                    )
        except (OSError, SQLAlchemyError) as exc:
            logger.warning("job %s: could not drop its checkpoints' optimizer state: %s", self.job_id, exc)

    def result_without_report(self, returncode: int, child: Child | None = None) -> TrainerResult:
        """How the job ended when the trainer wrote no result: cancelled and killed, stopped by
        a full disk (it could not even write its result), or crashed."""
        if self.cancel_sent_at is not None:
            return TrainerResult(
                status=TrainerOutcome.cancelled,
                error_code=ErrorCode.cancelled,
                error_message="cancelled; the trainer did not stop in time and was killed",
            )
        low = low_on_space(self.job_dir)
        if low is not None:
            return TrainerResult(
                status=TrainerOutcome.failed,
                error_code=ErrorCode.disk_full,
                error_message=f"The trainer stopped without a report while the disk under DATA_DIR was full: "
                f"there is {low.describe()}, less than the MIN_FREE_DISK_BYTES the job database and "
                "logs need. Free space on that disk (or lower save_total_limit, raise save_steps), "
                "then resubmit the job.",
            )
        return TrainerResult(
            status=TrainerOutcome.failed,
            error_code=ErrorCode.trainer_crashed,
            error_message=self.crash_message(returncode, child),
        )

    def crash_message(self, returncode: int, child: Child | None = None) -> str:
        report = child.failure_report() if isinstance(child, RankGroup | RayGroup) else None
        if report is not None:
            return f"{report}Read that rank's log in the job's folder and fix what it names, then resubmit the job."
        if returncode < 0:
            name = signal.Signals(-returncode).name
            cause = (
                " (often the kernel's out-of-memory killer: the host ran out of RAM)"
                if returncode == -signal.SIGKILL
                else ""
            )
            what = f"was killed by {name}{cause}"
        else:
            what = f"exited with code {returncode} without reporting a result"
        tail = self.log_tail()
        shown = f" Last lines of trainer.log:\n{tail}\n" if tail else " "
        action = (
            "Lower per_device_train_batch_size or max_seq_length, or give the host more RAM"
            if returncode == -signal.SIGKILL
            else "Read trainer.log in the job's folder and fix what it names"
        )
        return f"The trainer process {what}.{shown}{action}, then resubmit the job."
