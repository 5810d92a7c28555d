"""`python -m worker`: an RQ worker that runs one job at a time on GPUs it leases from its host's
inventory (`--gpus 0,1,2,3`; several workers with the same list run jobs side by side on disjoint
cards: docs/scheduling.md)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from typing import Annotated, Any

import redis.exceptions
import typer
from rq import Worker
from rq.defaults import DEFAULT_JOB_MONITORING_INTERVAL
from rq.exceptions import StopRequested
from rq.job import Job
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import configure_mappers

from core.checkpoint_files import hash_unfinished
from core.config import get_settings
from core.diskspace import Reserve
from core.gpu_leases import HostGpus
from core.queue import get_queue, get_redis, register_fp8_support, register_gpu_memory
from core.reconcile import reconcile
from worker import gpus as worker_gpus
from worker import standby as standby_module
from worker.ray_capacity import CapacityWatch
from worker.standby import NextStandby, Standby
from worker.tasks import compile_cache_env, trainer_environment

logger = logging.getLogger("worker")
cli = typer.Typer(add_completion=False, help=__doc__)

REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
RESTART_WAIT_MAX_S = 30.0
# How often the worker looks whether it is time to start the next standby while a job runs.
STANDBY_POLL_S = 0.5


class TrainingJob(Job):
    """RQ's job, keeping what its task returned: run_job's word for how the training job ended."""

    outcome: Any = None

    def perform(self) -> Any:
        self.outcome = super().perform()
        return self.outcome


class OutcomeInRqLines(logging.Filter):
    """RQ logs "Job OK" and "Successfully completed" for any task that returns, and run_job returns
    after it has recorded a training job that failed or was cancelled too: in the work horse,
    those two lines of RQ's say how the training job ended instead."""

    def __init__(self, job: TrainingJob) -> None:
        super().__init__()
        self.job = job

    def filter(self, record: logging.LogRecord) -> bool:
        if self.job.outcome is None or not isinstance(record.args, tuple) or not self.job.args:
            return True
        ended = f"job {self.job.args[0]} {self.job.outcome}"
        if any("Job OK" in str(arg) for arg in record.args):
            record.args = tuple(ended if "Job OK" in str(arg) else arg for arg in record.args)
        elif str(record.msg).startswith("Successfully completed") and len(record.args) == 3:
            # (description or RQ's id, time taken, worker name)
            record.msg, record.args = f"{ended} after %s on worker %s", record.args[1:]
        return True


class FinetuneWorker(Worker):
    """RQ's forking worker, with our reconcile pass added to its periodic maintenance, a note in
    Redis of its GPU's size so the API can refuse jobs that cannot fit it, and the patience to
    ride out a Redis that goes away.

    RQ retries a lost connection only while it waits for a job; anywhere else (its bookkeeping
    around a job, its heartbeats while a job runs, its maintenance) the error ends the worker
    for good. Here those calls log the outage and carry on: the job's real state is in the
    database, the trainer never needs Redis, and the dequeue that follows waits for Redis with
    RQ's own backoff. A job Redis lost meanwhile is enqueued again by the reconciler."""

    gpu_memory_bytes: int | None = None
    standby: Standby | None = None
    # While a job runs: when to start the standby after the one its work horse inherited.
    next_standby: NextStandby | None = None
    # Whether an idle worker's standby loads the last job's model (TRAINER_STANDBY_PRELOAD).
    preload_models = False
    # With RAY_ADDRESS: the cluster's room for ranks, for the API's 422 (core/ray_capacity.py).
    ray_capacity: CapacityWatch | None = None
    _redis_away_since: float | None = None
    # SIGTERM or SIGINT arrived. RQ only remembers a stop asked for during a job; one asked for
    # while idle ends its loop by an exception, which must not read as "start it again".
    stop_asked = False

    def request_stop(self, signum: Any, frame: Any) -> None:
        """The first SIGTERM or SIGINT: RQ's warm shutdown, which waits for the job, and word to
        the work horse (SIGUSR2) that its trainer should save a checkpoint at the next step and
        end, so the job goes back to the queue instead of holding the stop for days. A second
        signal is RQ's cold shutdown: the horse is killed, and the trainer stops with it."""
        self.stop_asked = True
        super().request_stop(signum, frame)
        horse = getattr(self, "horse_pid", 0)
        if horse:
            with contextlib.suppress(ProcessLookupError):
                os.kill(horse, signal.SIGUSR2)

    def redis_away(self, where: str, exc: BaseException) -> None:
        if self._redis_away_since is None:
            self._redis_away_since = time.monotonic()
            logger.warning("Redis is unreachable (%s: %s); carrying on and retrying", where, exc)

    def redis_back(self) -> None:
        if self._redis_away_since is not None:
            logger.info("Redis answers again after %.0f s", time.monotonic() - self._redis_away_since)
            self._redis_away_since = None

    def register_gpu(self) -> None:
        """What the API plans with (the GPU's size, FP8 support) and the host's cards, each kept for
        a few maintenance intervals: registered at every maintenance and heartbeat."""
        ttl = max(60, 3 * int(get_settings().reconcile_interval_s))
        if self.gpu_memory_bytes:
            register_gpu_memory(self.connection, self.name, self.gpu_memory_bytes, ttl)
        register_fp8_support(self.connection, self.name, worker_gpus.fp8_problem(worker_gpus.INVENTORY), ttl)
        HostGpus(self.connection).register(worker_gpus.INVENTORY)

    def run_maintenance_tasks(self) -> None:
        try:
            super().run_maintenance_tasks()
            self.register_gpu()
            if self.ray_capacity is not None:
                self.ray_capacity.refresh(self.connection)
        except REDIS_ERRORS as exc:
            self.redis_away("maintenance", exc)
        try:
            counts = reconcile(self.connection)
            if any(counts.values()):
                logger.info("reconcile: %s", counts)
        except StopRequested:  # raised by RQ's SIGTERM handler wherever the worker is: a stop, not a failure
            raise
        except Exception:
            logger.exception("reconcile failed; will try again at the next maintenance")
        try:
            hash_unfinished()
            Reserve.for_settings().ensure()
        except StopRequested:
            raise
        except Exception:
            logger.exception("checkpoint hashing or the disk reserve failed; will try again at the next maintenance")

    def set_shutdown_requested_date(self) -> None:
        # Called from the SIGTERM handler during a job: an error here would break the wait for
        # the work horse and let the loop take another job while this one still trains.
        try:
            super().set_shutdown_requested_date()
        except REDIS_ERRORS as exc:
            self.redis_away("noting the shutdown request", exc)

    def check_for_suspension(self, burst: bool) -> None:
        try:
            super().check_for_suspension(burst)
        except REDIS_ERRORS as exc:
            self.redis_away("checking for suspension", exc)

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        try:
            super().heartbeat(timeout, pipeline)
        except REDIS_ERRORS as exc:
            self.redis_away("heartbeat", exc)
        else:
            if pipeline is None:
                self.redis_back()

    def set_state(self, state: str, pipeline: Any = None) -> None:
        try:
            super().set_state(state, pipeline)
        except REDIS_ERRORS as exc:
            self._state = state
            self.redis_away("setting the worker's state", exc)

    def maintain_heartbeats(self, job: Any, execution: Any) -> None:
        # Called while a job's work horse runs: the training goes on whatever Redis does.
        try:
            super().maintain_heartbeats(job, execution)
            # RQ's maintenance waits for the job's end: a job of days would let the API forget this
            # worker's GPU (POST /jobs/estimate then plans without a card, and learns nothing).
            self.register_gpu()
        except REDIS_ERRORS as exc:
            self.redis_away("heartbeat while a job runs", exc)
        else:
            self.redis_back()

    job_class = TrainingJob

    def perform_job(self, job: Any, queue: Any, execution: Any) -> bool:
        lines = OutcomeInRqLines(job)
        rq_logger = logging.getLogger("rq.worker")
        rq_logger.addFilter(lines)
        try:
            return bool(super().perform_job(job, queue, execution))
        finally:
            rq_logger.removeFilter(lines)

    def wait_for_horse(self) -> tuple[int | None, int | None, Any]:
        """RQ's wait for the work horse, which first watches for the moment to start the next
        standby trainer while the job runs (NextStandby)."""
        if self.next_standby is not None:
            due = self.next_standby.due()
            while due is False:
                try:
                    pid, status, rusage = os.wait4(self.horse_pid, os.WNOHANG)
                except ChildProcessError:  # reaped already, as RQ's own wait allows for
                    return None, None, None
                if pid:
                    return pid, status, rusage
                time.sleep(STANDBY_POLL_S)
                due = self.next_standby.due()
            self.next_standby = None
            if due and self.standby is not None and not self.stop_asked:
                self.standby.ensure()
        return super().wait_for_horse()

    def execute_job(self, job: Any, queue: Any) -> None:
        if self.standby is not None:
            self.standby.ensure()  # the horse forked next inherits it
            offered = self.standby.process
            if offered is not None and get_settings().trainer_standby_during_job and job.args:
                job_dir = get_settings().job_dir(int(job.args[0]))  # run_job(job_id)
                self.next_standby = NextStandby(self.standby, offered.pid, job_dir)
        try:
            super().execute_job(job, queue)
        except REDIS_ERRORS as exc:
            # RQ's bookkeeping before the horse was started or after it ended (monitoring returns
            # only then). The database knows how the job went; a job that never started is still
            # `queued` there and is enqueued again by the reconciler.
            self.redis_away(f"bookkeeping of {job.id}", exc)
        finally:
            self.next_standby = None
            if self.standby is not None and not self.stop_asked:
                self.standby.ensure()  # the next one, importing while this worker waits for work
                self.offer_preload(int(job.args[0]) if job.args else None)

    def offer_preload(self, ended_job: int | None) -> None:
        """Idle now (after `ended_job`, or at start-up): the standby may load the last job's model
        onto the card (TRAINER_STANDBY_PRELOAD), unless a job is already queued (it loads its own)."""
        if self.standby is None or not self.preload_models:
            return
        folder = self.standby.folder
        with contextlib.suppress(SQLAlchemyError):  # the database away: the note of an earlier job
            request = standby_module.last_model(ended_job) if ended_job is not None else None
            if request is not None:
                standby_module.remember_last_model(folder, request)
        request = standby_module.remembered_model(folder)
        with contextlib.suppress(*REDIS_ERRORS):
            if request is None or any(queue.count for queue in self.queues):
                return
            self.standby.offer_preload(request)


@cli.command()
def main(
    burst: Annotated[bool, typer.Option(help="exit once the queue is empty (tests, one-off runs)")] = False,
    name: Annotated[str | None, typer.Option(help="worker name shown in RQ (default: host, GPU and pid)")] = None,
    gpus_option: Annotated[
        str | None,
        typer.Option(
            "--gpus",
            help="the host's GPUs this worker leases to jobs, e.g. 0,1,2,3 or 0-7 (default: WORKER_GPUS, "
            "CUDA_VISIBLE_DEVICES or every GPU); on a host without NVIDIA GPUs each is a CPU rank",
        ),
    ] = None,
) -> None:
    settings = get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    connection = get_redis()
    # With Ray (RAY_ADDRESS) the worker leases no cards of its own: Ray places the ranks on the
    # cluster's GPUs, and a job may ask for more than this host has.
    worker_gpus.INVENTORY = [] if settings.ray_address else worker_gpus.detect_inventory(gpus_option)
    gpus = ",".join(str(g.index) for g in worker_gpus.INVENTORY) or "none"
    worker = FinetuneWorker(
        [get_queue(connection)],
        connection=connection,
        name=name or f"{os.uname().nodename}-gpu{gpus.replace(',', '_')}-{os.getpid()}",
        maintenance_interval=max(1, int(settings.reconcile_interval_s)),
        # Its heartbeats while a job runs, which also register the GPU: within the registration's TTL.
        job_monitoring_interval=max(1, min(DEFAULT_JOB_MONITORING_INTERVAL, int(settings.reconcile_interval_s))),
    )
    # The smallest of its cards: what a job it takes can count on.
    worker.gpu_memory_bytes = min((g.memory_bytes for g in worker_gpus.INVENTORY if g.memory_bytes), default=None)
    use_standby = settings.trainer_standby if settings.trainer_standby is not None else bool(worker.gpu_memory_bytes)
    use_standby = use_standby and not settings.ray_address  # Ray starts each rank where it places it
    # A standby trainer binds to its GPU as it imports, before any job: only a worker of one GPU
    # knows which that will be.
    if use_standby and len(worker_gpus.INVENTORY) <= 1:
        env = trainer_environment(settings.as_environment(), compile_cache_env(settings.data_dir.resolve() / "cache"))
        if worker_gpus.INVENTORY:
            standby_module.CARD = str(worker_gpus.INVENTORY[0].index)
            env.update(worker_gpus.cuda_devices_env(standby_module.CARD))
        # Where a trainer fork server runs (no GPU), the standby is a fork of it: no imports to pay.
        worker.standby = Standby(env, settings.data_dir.resolve() / "standby", settings.trainer_forkserver or None)
        worker.standby.ensure()
        preload = settings.trainer_standby_preload
        worker.preload_models = preload if preload is not None else bool(worker.gpu_memory_bytes)
        worker.offer_preload(None)  # the model of the last job before this worker started, if any
    logger.info(
        "worker %s on queue %r (GPUs: %s, %s; data under %s)",
        worker.name,
        settings.queue_name,
        gpus,
        f"{worker.gpu_memory_bytes / 2**30:.1f} GiB" if worker.gpu_memory_bytes else "no GPU memory known",
        settings.data_dir.resolve(),
    )
    Reserve.for_settings().ensure()
    with contextlib.suppress(*REDIS_ERRORS):  # Redis away: the maintenance registers them later
        HostGpus(connection).register(worker_gpus.INVENTORY)
    if settings.ray_address:
        worker.ray_capacity = CapacityWatch()
        with contextlib.suppress(*REDIS_ERRORS):
            worker.ray_capacity.refresh(connection)
    # The ORM's mappers are set up on first use; done here, before any SIGTERM can arrive, since RQ's
    # handler raises StopRequested wherever the worker is, and one raised mid-setup leaves every
    # mapper broken (the worker then hung until a second signal).
    configure_mappers()
    # Inherited by each work horse until its task sets its own handler (worker.tasks): a stop
    # that arrives in between must not kill the horse with SIGUSR2's default action.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        work_until_stopped(worker, burst=burst)
    finally:
        if worker.standby is not None:
            worker.standby.stop()


def work_until_stopped(worker: FinetuneWorker, *, burst: bool) -> None:
    """RQ's work loop, started again whenever it ends for any reason but a stop request or an
    empty queue in burst mode (Redis unreachable at start-up, or an error RQ does not handle)."""
    wait = 1.0
    while True:
        try:
            worker.work(burst=burst, with_scheduler=False)
        except REDIS_ERRORS as exc:  # at start-up (registering), or while tearing down
            worker.redis_away("starting or stopping the work loop", exc)
        if burst or worker.stop_asked:
            return
        logger.warning("the RQ work loop ended unexpectedly; starting it again in %.0f s", wait)
        time.sleep(wait)
        wait = min(wait * 2, RESTART_WAIT_MAX_S)
        with contextlib.suppress(*REDIS_ERRORS):
            worker.register_death()  # so that registering again is not refused as a name clash


if __name__ == "__main__":
    cli()
