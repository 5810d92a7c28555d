"""A job starts only when the disk under DATA_DIR can hold its planned checkpoints: it waits in
the queue with the reason in its events (not failed) until space is freed, for instance by
deleting old jobs or checkpoints (DELETE /jobs/{id}, DELETE /jobs/{id}/checkpoints/{name})."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass

from pydantic import ValidationError

from core.config import get_settings
from core.contract import EventKind
from core.db import session_scope
from core.diskspace import gib
from core.events import add_event
from core.folders import folder_files
from core.models import Job
from core.planner import PlanError, plan_disk, read_config, shape_from_config
from core.spec import JobSpec
from worker.waits import still_queued, until_worker_stops

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shortfall:
    needed_bytes: int  # what the job's checkpoints still need, plus MIN_FREE_DISK_BYTES
    free_bytes: int

    def describe(self, job: Job) -> str:
        return (
            f"waiting for disk space: its checkpoints need about {gib(self.needed_bytes)} more under DATA_DIR "
            f"(MIN_FREE_DISK_BYTES included) and {gib(self.free_bytes)} is free. It starts by itself once "
            f"space is freed, e.g. by deleting finished jobs (DELETE /jobs/{{id}}) or checkpoints"
        )


def shortfall(job: Job) -> Shortfall | None:
    """What the disk lacks for this job, or None when it fits or cannot be planned (the model's
    config.json unreadable here, or a checkpoint count known only once the data is read)."""
    settings = get_settings()
    try:
        spec = JobSpec.model_validate(job.spec)
        shape = shape_from_config(read_config(spec.model, allow_network=False))
    except (PlanError, ValidationError) as exc:
        logger.info("job %s: disk not planned before starting (%s)", job.id, exc)
        return None
    report = job.data_report or {}
    rows = report.get("rows_used") or (report.get("rows", 0) - report.get("bad_rows", 0)) or None
    checkpoints_dir = settings.checkpoints_dir(job.id or 0)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_disk(
        shape, spec.hyperparameters, checkpoints_dir, rows=rows, method=spec.method, row_format=report.get("row_format")
    )
    if plan.required_bytes is None:
        return None
    # A resumed job's checkpoints on disk are part of what it keeps (rotation deletes old ones).
    already = sum(size for _path, size in folder_files(checkpoints_dir))
    needed = max(0, plan.required_bytes - already) + settings.min_free_disk_bytes
    free = shutil.disk_usage(checkpoints_dir).free
    return Shortfall(needed, free) if free < needed else None


def wait_for_disk(job_id: int) -> bool:
    """Block until the job's checkpoints fit (True), or until the job is no longer queued or the
    worker is asked to stop (False). The first wait is told in an event, not every poll."""
    settings = get_settings()
    announced = False
    with until_worker_stops() as stop:
        while not stop.is_set():
            with session_scope() as session:
                job = session.get(Job, job_id)
                if not still_queued(job):
                    return False
                assert job is not None
                lacking = shortfall(job)
                if lacking is None:
                    if announced:
                        add_event(
                            session=session, job_id=job_id, kind=EventKind.waiting_for_disk, message="disk space freed"
                        )
                    return True
                if not announced:
                    add_event(
                        session=session, job_id=job_id, kind=EventKind.waiting_for_disk, message=lacking.describe(job)
                    )
                    announced = True
                    logger.warning("job %s: %s", job_id, lacking.describe(job))
            time.sleep(settings.disk_wait_poll_s)
    return False
