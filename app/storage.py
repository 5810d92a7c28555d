"""GET /storage: where the disk under DATA_DIR goes (job folders, uploads, caches), and the files
no record names: folders of jobs the database does not know (a database restored from a backup,
a crash between the row and the folder), checkpoints without a record, and uploads without one.
Nothing found is deleted: each is listed with its size and why, for a person to decide."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from sqlmodel import Session, col, select

from app.uploads import INCOMING_PREFIX
from core.checkpoint_store import FINAL_NAME, PARTIAL_PREFIX, checkpoint_step
from core.config import get_settings
from core.contract import CheckpointStatus
from core.folders import folder_files
from core.models import Checkpoint, Job, JobStatus, UploadedFile


@dataclass
class Orphan:
    path: str  # relative to DATA_DIR
    bytes: int
    reason: str


@dataclass
class StorageReport:
    free_bytes: int
    total_bytes: int
    jobs_bytes: int = 0
    files_bytes: int = 0
    cache_bytes: int = 0
    orphans: list[Orphan] = field(default_factory=list)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(size for _name, size in folder_files(path))


def scan(session: Session) -> StorageReport:
    settings = get_settings()
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    usage = shutil.disk_usage(data_dir)
    report = StorageReport(free_bytes=usage.free, total_bytes=usage.total)
    jobs_dir, files_dir, cache_dir = data_dir / "jobs", settings.files_dir().resolve(), data_dir / "cache"
    report.cache_bytes = _size(cache_dir) if cache_dir.is_dir() else 0

    def orphan(path: Path, reason: str, size: int | None = None) -> None:
        size = _size(path) if size is None else size
        report.orphans.append(Orphan(str(path.relative_to(data_dir)), size, reason))

    folders = (
        sorted((p for p in jobs_dir.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name))  # 2 before 10
        if jobs_dir.is_dir()
        else []
    )
    ids = [int(p.name) for p in folders if p.name.isdigit()]
    jobs = {job.id: job for job in session.exec(select(Job).where(col(Job.id).in_(ids))).all()} if ids else {}
    live = {
        (c.job_id, c.name)
        for c in session.exec(
            select(Checkpoint).where(col(Checkpoint.job_id).in_(ids), Checkpoint.status != CheckpointStatus.removed)
        ).all()
    }
    for folder in folders:
        size = _size(folder)
        report.jobs_bytes += size
        job = jobs.get(int(folder.name)) if folder.name.isdigit() else None
        if job is None or job.deleted_at is not None:
            why = "no job of this id in the database" if job is None else "its job was deleted"
            orphan(folder, why, size)
            continue
        checkpoints = folder / "checkpoints"
        for child in sorted(checkpoints.iterdir()) if checkpoints.is_dir() else []:
            if not child.is_dir():
                continue
            # A status another version wrote reads as its plain word: not known to be finished.
            if child.name.startswith(PARTIAL_PREFIX) and isinstance(job.status, JobStatus) and job.status.finished:
                orphan(child, "an unfinished checkpoint its stopped trainer left")
            elif (checkpoint_step(child.name) is not None or child.name == FINAL_NAME) and (
                job.id,
                child.name,
            ) not in live:
                orphan(child, "a checkpoint folder with no record (deleted or rotated away while its trainer ran?)")

    stored = {Path(path).name for path in session.exec(select(UploadedFile.path)).all()}
    for path in sorted(files_dir.iterdir()) if files_dir.is_dir() else []:
        if not path.is_file():
            continue
        report.files_bytes += path.stat().st_size
        if path.name not in stored and not path.name.startswith(INCOMING_PREFIX):
            orphan(path, "an uploaded file with no record")
    return report
