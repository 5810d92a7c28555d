"""A worker's GPUs: the host's inventory it registers, and the lease a job waits for before it
starts (core/gpu_leases.py holds the Redis side; docs/scheduling.md the design)."""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from sqlmodel import Session

from core.config import get_settings
from core.contract import EventKind
from core.db import session_scope
from core.events import add_event
from core.gpu_leases import Gpu, HostGpus, OverQuota, Waiter
from core.models import Job, Project
from core.planner import PlanError, estimate_seconds, read_config, shape_from_config
from core.spec import JobSpec
from worker.waits import still_queued, until_worker_stops

logger = logging.getLogger(__name__)

# This worker's GPUs, set at its start (worker/__main__.py); its work horses inherit it.
INVENTORY: list[Gpu] = []


def parse_gpu_list(text: str) -> list[int]:
    """ "0,1,2,3" or "0-3" (or a mix) -> [0, 1, 2, 3]."""
    indices: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(f"{part!r} is not a GPU index or range (like 0,1 or 0-3)")
        indices.extend(range(int(low), int(high or low) + 1))
    if len(set(indices)) != len(indices):
        raise ValueError(f"GPU list {text!r} names a card twice")
    return indices


def describe_gpus(indices: list[int]) -> list[Gpu]:
    """Name, UUID and memory of each card from NVML. A host without NVIDIA GPUs (a CPU test host)
    gets placeholders: each of its "GPUs" is a rank on the CPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        host = socket.gethostname()
        return [Gpu(index=i, name="cpu", uuid=f"CPU-{host}-{i}") for i in indices]
    described = []
    for index in indices:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(handle)
        uuid = pynvml.nvmlDeviceGetUUID(handle)
        try:
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            capability: str | None = f"{major}.{minor}"
        except pynvml.NVMLError:
            capability = None
        described.append(
            Gpu(
                index=index,
                name=name.decode() if isinstance(name, bytes) else str(name),
                uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                memory_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                compute_capability=capability,
            )
        )
    return described


def memory_info(index: int) -> Any | None:
    """NVML's memory figures of a card (its index as nvidia-smi numbers it: `.total`, `.free`,
    `.used`, bytes); None without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
    except Exception:  # no driver or NVML library (a CPU host): nothing known
        return None


def free_memory_bytes(index: int) -> int | None:
    info = memory_info(index)
    return int(info.free) if info is not None else None


# FP8 matmuls (torch._scaled_mm) need Ada (8.9) or Hopper (9.0) and newer.
FP8_MIN_CAPABILITY = (8, 9)


def fp8_problem(inventory: list[Gpu]) -> str:
    """Why this worker cannot train a precision fp8 job ("" when it can): no GPU, a card older
    than FP8_MIN_CAPABILITY, or no torchao to import (looked up without importing it or torch)."""
    import importlib.util

    real = [g for g in inventory if g.memory_bytes]
    if not real:
        return "no NVIDIA GPU"
    for gpu in real:
        if gpu.compute_capability is None:
            continue  # NVML did not say: the trainer checks with torch
        major, _, minor = gpu.compute_capability.partition(".")
        if (int(major), int(minor or 0)) < FP8_MIN_CAPABILITY:
            return f"{gpu.describe()} has compute capability {gpu.compute_capability}, below 8.9"
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed"
    return ""


def detect_inventory(option: str | None = None) -> list[Gpu]:
    """The GPUs this worker leases to its jobs: `--gpus`, else WORKER_GPUS, else the indices in
    CUDA_VISIBLE_DEVICES (or the cards its UUIDs name), else every GPU NVML sees (none on a host without
    NVIDIA GPUs)."""
    text = option or get_settings().worker_gpus
    if text is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None and all(p.strip().isdigit() for p in visible.split(",") if p.strip()):
            text = visible
    if text is not None:
        return describe_gpus(parse_gpu_list(text))
    try:
        import pynvml

        pynvml.nvmlInit()
        count = int(pynvml.nvmlDeviceGetCount())
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:  # cards named by UUID: their indices (a MIG slice has none: not leased)
            uuids = [p.strip() for p in visible.split(",") if p.strip().startswith("GPU-")]
            return describe_gpus([int(pynvml.nvmlDeviceGetIndex(pynvml.nvmlDeviceGetHandleByUUID(u))) for u in uuids])
    except Exception:
        return []
    return describe_gpus(list(range(count)))


@dataclass
class Lease:
    """The GPUs a job holds while it runs; renewed by the work horse, released at the end."""

    job_id: int
    gpus: list[Gpu]
    host: HostGpus | None = None  # None: a worker without an inventory (a CPU host), nothing leased
    renewed_at: float = field(default_factory=time.monotonic)
    project: str = ""  # the job's project id, as the line counts its cards

    @property
    def indices(self) -> list[int]:
        return [g.index for g in self.gpus]

    def cuda_visible_devices(self) -> str | None:
        return ",".join(str(i) for i in self.indices) if self.host is not None else None

    def renew_if_due(self, every_s: float, ends_in_s: float | None = None) -> None:
        """Keep the lease; `ends_in_s`, the job's ETA when it has one, tells the line when its
        cards should be free (its backfilling reads it)."""
        if self.host is None or time.monotonic() - self.renewed_at < every_s:
            return
        try:
            held = self.host.renew(self.job_id, self.indices, ends_in_s)
        except RedisError as exc:  # Redis away: the lease may lapse; the trainer goes on meanwhile
            logger.warning("job %s: could not renew its GPU lease (%s)", self.job_id, exc)
            return
        self.renewed_at = time.monotonic()
        if held < len(self.indices):
            # Redis lost the lease (restarted without persistence): take the same cards back.
            logger.warning("job %s: Redis had lost its lease on GPUs %s; taking them again", self.job_id, self.indices)
            others = self.host.reclaim(self.job_id, self.indices, self.project)
            if others:
                logger.error("job %s: GPUs %s were leased to another job meanwhile", self.job_id, others)

    def release(self) -> None:
        if self.host is None:
            return
        try:
            self.host.release(self.job_id, self.indices)
        except RedisError as exc:  # the lease lapses by itself within LEASE_TTL_S
            logger.warning("job %s: could not release GPUs %s (%s)", self.job_id, self.indices, exc)

    def placement(
        self, world_size: int, strategy: str, effective_batch: int, fsdp_layout: str | None = None
    ) -> dict[str, object]:
        return {
            "host": self.host.host if self.host is not None else socket.gethostname(),
            "gpus": [asdict(g) for g in self.gpus],
            "world_size": world_size,
            "strategy": strategy,
            "effective_batch": effective_batch,
            "fsdp_layout": fsdp_layout,
        }


def cuda_devices_env(visible: str) -> dict[str, str]:
    """The trainer's view of its cards. NVML numbers them (the inventory) in PCI bus order; CUDA's
    default order is another."""
    return {"CUDA_VISIBLE_DEVICES": visible, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


class CannotFitHost(Exception):
    """The job asks for more GPUs than this host has."""


def planned_seconds(job: Job, spec: JobSpec) -> float | None:
    """The planner's estimate of the job's run time (None: unknown), for the line's backfilling."""
    report = job.data_report or {}
    rows = report.get("rows_used") or (report.get("rows", 0) - report.get("bad_rows", 0)) or None
    try:
        shape = shape_from_config(read_config(spec.model, allow_network=False))
    except PlanError:
        return None
    return estimate_seconds(
        shape, spec.hyperparameters, gpus=spec.gpus, rows=rows, gpu_train_flops=get_settings().gpu_train_flops
    )


def waiter_of(session: Session, job: Job, estimate_s: float | None) -> Waiter:
    """The job as the GPU line sees it: its priority, its project and that project's max_gpus
    (read at each poll: an admin may change it while the job waits)."""
    project = session.get(Project, job.project_id)
    return Waiter(
        priority=int((job.spec or {}).get("priority", 0)),
        project=str(job.project_id),
        max_gpus=project.max_gpus if project is not None else None,
        estimate_s=estimate_s,
    )


def wait_for_gpus(job_id: int, need: int, connection: Redis, inventory: list[Gpu]) -> Lease | None:
    """Block until the job holds `need` GPUs of this host (the Lease), or until it is no longer
    queued or the worker is asked to stop (None). The first wait is told in an event with the
    job's place in line (and each change of why it waits: the line, or its project's max_gpus).
    `inventory` is this worker's own cards; the job may get any of the host's (every live
    worker's)."""
    if not inventory:
        return Lease(job_id, [])
    settings = get_settings()
    host = HostGpus(connection)
    host.register(inventory)
    cards = host.inventory()
    if need > len(cards):
        raise CannotFitHost(
            f"the job asks for {need} GPUs and this worker's host has {len(cards)} "
            f"({', '.join(str(g.index) for g in cards)})"
        )
    announced: str | None = None  # why the job waits, as its last event said
    estimate_s: float | None = None
    estimated = False
    with until_worker_stops() as stop:
        while not stop.is_set():
            with session_scope() as session:
                job = session.get(Job, job_id)
                if not still_queued(job):
                    break
                assert job is not None
                if not estimated:
                    estimated, estimate_s = True, planned_seconds(job, JobSpec.model_validate(job.spec))
                waiter = waiter_of(session, job, estimate_s)
                answer = host.try_acquire(job_id, need, waiter=waiter)
                if isinstance(answer, list):
                    by_index = {g.index: g for g in host.inventory()}
                    if announced:
                        add_event(
                            session=session,
                            job_id=job_id,
                            kind=EventKind.waiting_for_gpus,
                            message=f"GPUs {', '.join(map(str, answer))} are free for it now",
                        )
                    return Lease(job_id, [by_index[i] for i in answer], host, project=waiter.project)
                if isinstance(answer, OverQuota):
                    if announced != "quota":
                        project = session.get(Project, job.project_id)
                        name = project.name if project is not None else job.project_id
                        message = (
                            f"waiting for its project's GPUs: project {name} holds {answer.held} of the "
                            f"{waiter.max_gpus} it may hold at once (quota max_gpus) and the job needs {need}"
                        )
                        add_event(session=session, job_id=job_id, kind=EventKind.waiting_for_gpus, message=message)
                        logger.info("job %s: %s", job_id, message)
                        announced = "quota"
                elif announced != "line":
                    holders = host.holders()
                    busy = ", ".join(f"GPU {i} by job {j}" for i, j in sorted(holders.items())) or "none"
                    line = "it is next in line" if answer == 1 else f"{answer - 1} job(s) are ahead of it in line"
                    message = (
                        f"waiting for {need} of the {len(cards)} GPUs of host {host.host}: {line}; held now: {busy}"
                    )
                    add_event(session=session, job_id=job_id, kind=EventKind.waiting_for_gpus, message=message)
                    logger.info("job %s: %s", job_id, message)
                    announced = "line"
            time.sleep(settings.gpu_wait_poll_s)
    host.leave_line(job_id)
    return None
