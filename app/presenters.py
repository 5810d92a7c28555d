"""Turning rows into the public records the API returns."""

from __future__ import annotations

from typing import Any, TypeVar
from urllib.parse import quote

from app.schemas import (
    CheckpointFile,
    CheckpointPublic,
    EventPublic,
    FilePublic,
    JobError,
    JobPublic,
    JobVram,
    Metrics,
    Placement,
    Progress,
    StepLogPublic,
    TrainerPath,
    Vram,
)
from core.config import get_settings
from core.contract import CheckpointStatus, ErrorCode, EventKind, Phase, understood
from core.data_report import DataReport
from core.db import get_engine
from core.models import Checkpoint, Job, JobEvent, JobStatus, Project, StepLog, UploadedFile

GIB = 1024**3
V = TypeVar("V", bound=Vram)


def vram(values: dict[str, Any] | None, model: type[V] = Vram) -> V:  # type: ignore[assignment]
    values = {k: v for k, v in (values or {}).items() if k in model.model_fields}
    for key in ("allocated", "reserved", "peak_allocated", "device_used", "device_total", "device_used_peak"):
        if values.get(key) is not None:
            values[f"{key}_gib"] = round(values[key] / GIB, 3)
    return model(**values)


# Project names by (database, id): a project is never renamed nor deleted, so a name read once stays.
_PROJECT_NAMES: dict[tuple[str, int], str] = {}


def project_name(project_id: int) -> str:
    """The project's name (blocking: one read the first time a process meets the project)."""
    key = (get_settings().sqlalchemy_url, project_id)
    name = _PROJECT_NAMES.get(key)
    if name is None:
        from sqlmodel import Session

        with Session(get_engine()) as session:
            project = session.get(Project, project_id)
        name = project.name if project is not None else f"#{project_id}"
        if len(_PROJECT_NAMES) > 10_000:
            _PROJECT_NAMES.clear()
        _PROJECT_NAMES[key] = name
    return name


def job_public(job: Job) -> JobPublic:
    assert job.id is not None
    percent = None
    if job.total_steps:
        percent = round(100.0 * min(job.step, job.total_steps) / job.total_steps, 2)
    base = f"/jobs/{job.id}"
    status, status_raw = understood(JobStatus, job.status)
    phase, phase_raw = understood(Phase, job.phase) if status == JobStatus.running else (None, None)
    code, code_raw = understood(ErrorCode, job.error_code)
    return JobPublic(
        id=job.id,
        project=project_name(job.project_id),
        submitted_by=job.submitted_by,
        status=status or JobStatus.unknown,
        status_raw=status_raw,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        spec=job.spec,
        backend=job.backend,
        versions=job.versions,
        trainer=TrainerPath.model_validate(job.trainer) if job.trainer else None,
        attempts=job.attempts,
        phase=phase,
        phase_raw=phase_raw,
        cancel_requested=job.cancel_requested_at is not None,
        progress=Progress(
            step=job.step,
            total_steps=job.total_steps,
            epoch=job.epoch,
            percent=percent,
            eta_seconds=job.eta_seconds,
            stalled_since=job.stalled_since if job.status == JobStatus.running else None,
        ),
        metrics=Metrics(**{**(job.metrics or {}), "trained_tokens": job.trained_tokens}),
        vram=vram(job.vram, JobVram),
        placement=Placement.model_validate(job.placement) if job.placement else None,
        data_report=DataReport.model_validate(job.data_report) if job.data_report else None,
        error=JobError(code=code, code_raw=code_raw, message=job.error_message or "") if code else None,
        links={
            "self": base,
            "logs": f"{base}/logs",
            "events": f"{base}/events",
            "checkpoints": f"{base}/checkpoints",
            "cancel": f"{base}/cancel",
            "pause": f"{base}/pause",
            "resume": f"{base}/resume",
            "watch": f"{base}/watch",
        },
    )


def step_log_public(row: StepLog) -> StepLogPublic:
    return StepLogPublic(
        step=row.step,
        epoch=row.epoch,
        created_at=row.created_at,
        loss=row.loss,
        learning_rate=row.learning_rate,
        grad_norm=row.grad_norm,
        tokens_per_second=row.tokens_per_second,
        num_tokens=row.num_tokens,
        eval_loss=row.eval_loss,
        method_metrics=row.method_metrics,
        vram=vram(
            {
                "allocated": row.vram_allocated,
                "reserved": row.vram_reserved,
                "peak_allocated": row.vram_peak_allocated,
                "device_used": row.device_used,
                "device_total": row.device_total,
            }
        ),
    )


def event_public(row: JobEvent) -> EventPublic:
    assert row.id is not None
    kind, kind_raw = understood(EventKind, row.kind)
    return EventPublic(
        id=row.id, created_at=row.created_at, kind=kind or EventKind.unknown, kind_raw=kind_raw, message=row.message
    )


def checkpoint_public(row: Checkpoint) -> CheckpointPublic:
    base = f"/jobs/{row.job_id}/checkpoints/{quote(row.name)}"
    status, status_raw = understood(CheckpointStatus, row.status)
    return CheckpointPublic(
        name=row.name,
        step=row.step,
        created_at=row.created_at,
        status=status or CheckpointStatus.unknown,
        status_raw=status_raw,
        size=row.size_bytes,
        files=[
            CheckpointFile(
                path=f["path"],
                size=f["size"],
                sha256=f.get("sha256"),
                url=f"{base}/files/{quote(f['path'])}",
                corrupt=bool(f.get("corrupt")),
            )
            for f in row.files
        ],
        archive_url=f"{base}/archive",
        verified_at=row.verified_at,
        verify_requested_at=row.verify_requested_at,
    )


def file_public(row: UploadedFile) -> FilePublic:
    assert row.id is not None
    return FilePublic(
        id=row.id,
        project=project_name(row.project_id),
        created_at=row.created_at,
        filename=row.filename,
        size=row.size_bytes,
        sha256=row.sha256,
        row_format=row.row_format,  # type: ignore[arg-type]
        columns=row.columns or [],
        rows=row.rows,
        bad_rows=row.bad_rows,
        bad_row_examples=row.bad_row_examples or [],
    )
