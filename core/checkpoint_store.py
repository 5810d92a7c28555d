"""A job's checkpoint folders on disk and their records in the database.

A checkpoint is written under a hidden staging name (`.partial-checkpoint-40`) and renamed to
its real name only when every file is on disk (core/checkpoint_files.py), so a folder with a real
name is complete. What is checked here covers what that cannot: folders written before staging
existed, or damaged afterwards. Used by the trainer (which checkpoint to resume from), the
worker (records after its trainer exits) and the reconciler (records of a job whose worker died)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from core.contract import EventKind
from core.events import add_event
from core.folders import folder_files
from core.models import Checkpoint, CheckpointStatus, Job, JobStatus, utcnow
from core.shared_store import StorageUnavailable, get_store

logger = logging.getLogger(__name__)

PARTIAL_PREFIX = ".partial-"
FINAL_NAME = "final"
INTERMEDIATE_RE = re.compile(r"^checkpoint-(\d+)$")
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# Held by a job's trainer for its whole life (trainer/lifeline.py).
TRAINER_LOCK = "trainer.lock"


def checkpoint_step(name: str) -> int | None:
    match = INTERMEDIATE_RE.match(name)
    return int(match.group(1)) if match else None


def weights_problem(folder: Path) -> str | None:
    if not (folder / "config.json").is_file():
        return "config.json is missing"
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{WEIGHTS_INDEX} cannot be read"
        missing = sorted(s for s in shards if not (folder / s).is_file())
        return f"weight shard(s) {', '.join(missing)} missing" if missing else None
    if not (folder / WEIGHTS_FILE).is_file():
        return f"neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX} is there"
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from (intermediate) or loaded (final); None when complete."""
    if not folder.is_dir():
        return "it is not a folder"
    problem = weights_problem(folder)
    if problem or folder.name == FINAL_NAME:
        return problem
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "trainer_state.json is missing or unreadable"
    if state.get("global_step") != checkpoint_step(folder.name):
        return f"trainer_state.json is for step {state.get('global_step')}"
    if not (folder / "optimizer.pt").is_file():
        return "optimizer.pt is missing"
    return None


def intermediate_folders(checkpoints_dir: Path) -> list[Path]:
    """checkpoint-N folders, newest step first."""
    if not checkpoints_dir.is_dir():
        return []
    found = [
        (step, path)
        for path in checkpoints_dir.iterdir()
        if (step := checkpoint_step(path.name)) is not None and path.is_dir()
    ]
    return [path for _step, path in sorted(found, reverse=True)]


def newest_complete(
    checkpoints_dir: Path, untrusted: Mapping[str, str] | None = None
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete intermediate checkpoint, and the newer ones that are not complete
    (with why), which a resume must skip. `untrusted`: names not to resume from (checkpoints
    known corrupt), with why; such a folder is skipped too."""
    skipped: list[tuple[Path, str]] = []
    for folder in intermediate_folders(checkpoints_dir):
        problem = (untrusted or {}).get(folder.name) or checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


def sweep_partials(checkpoints_dir: Path) -> list[tuple[str, int]]:
    """Remove staging folders a stopped trainer left behind: (name, bytes freed) for each. Only
    call this when no trainer of the job is running."""
    removed: list[tuple[str, int]] = []
    if not checkpoints_dir.is_dir():
        return removed
    for path in sorted(checkpoints_dir.iterdir()):
        if path.name.startswith(PARTIAL_PREFIX) and path.is_dir():
            size = sum(s for _p, s in folder_files(path))
            shutil.rmtree(path, ignore_errors=True)
            removed.append((path.name, size))
    return removed


def record_checkpoint(*, session: Session, job_id: int, folder: Path, step: int, note: str = "") -> Checkpoint:
    """Record a complete folder (names and sizes; the worker hashes the files afterwards)."""
    files: list[dict[str, Any]] = [{"path": path, "size": size, "sha256": None} for path, size in folder_files(folder)]
    checkpoint = session.exec(
        select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.name == folder.name)
    ).first()
    if checkpoint is None:
        checkpoint = Checkpoint(job_id=job_id, name=folder.name, step=step)
    # A resumed job saves the same step again: the newer folder replaces the record.
    checkpoint.step, checkpoint.files = step, files
    checkpoint.size_bytes = sum(f["size"] for f in files)
    checkpoint.status, checkpoint.removed_at, checkpoint.created_at = CheckpointStatus.hashing, None, utcnow()
    # A new folder: what was known of the old one's verification is not about it.
    checkpoint.verified_at = checkpoint.verify_requested_at = None
    checkpoint.changed_seen_at = checkpoint.verify_claimed_at = None
    session.add(checkpoint)
    add_event(
        session=session,
        job_id=job_id,
        kind=EventKind.checkpoint,
        message=f"saved {folder.name} at step {step} ({checkpoint.size_bytes} bytes, {len(files)} files){note}",
    )
    return checkpoint


def mark_removed(
    *, session: Session, job_id: int, checkpoints_dir: Path, why: str = "save_total_limit keeps the newest"
) -> list[str]:
    """Records of checkpoints whose folder is gone (save_total_limit rotated them away)."""
    removed: list[str] = []
    in_store = committed_in_store(job_id)
    if in_store is None:
        return removed  # the shared store cannot say what it holds: nothing is known gone
    for checkpoint in session.exec(
        select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.status != CheckpointStatus.removed)
    ).all():
        if not (checkpoints_dir / checkpoint.name).is_dir() and checkpoint.name not in in_store:
            checkpoint.status, checkpoint.removed_at = CheckpointStatus.removed, utcnow()
            session.add(checkpoint)
            add_event(
                session=session,
                job_id=job_id,
                kind=EventKind.checkpoint_removed,
                message=f"{checkpoint.name} removed from disk ({why})",
            )
            removed.append(checkpoint.name)
    return removed


def committed_in_store(job_id: int) -> set[str] | None:
    """The job's checkpoints committed to the shared store (empty without one; None when it cannot
    be read): with a store, a folder missing from this host's DATA_DIR is not a checkpoint gone."""
    store = get_store()
    if store is None:
        return set()
    try:
        return set(store.committed(job_id))
    except StorageUnavailable as exc:
        logger.warning("job %s: the shared store cannot list its checkpoints: %s", job_id, exc)
        return None


def sync_records(*, session: Session, job_id: int, checkpoints_dir: Path) -> list[str]:
    """Record the complete folders on disk that have no live record: a checkpoint finished just
    before its trainer or worker died is listed (and downloadable) all the same. Returns their names."""
    recorded = {
        c.name
        for c in session.exec(
            select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.status != CheckpointStatus.removed)
        ).all()
    }
    candidates = intermediate_folders(checkpoints_dir)
    if (checkpoints_dir / FINAL_NAME).is_dir():
        candidates.append(checkpoints_dir / FINAL_NAME)
    added = []
    for folder in candidates:
        if folder.name in recorded or checkpoint_problem(folder) is not None:
            continue
        step = checkpoint_step(folder.name)
        if step is None:  # final is saved after the last step, which no file of its own names
            job = session.get(Job, job_id)
            step = (job.total_steps or job.step) if job is not None else 0
        record_checkpoint(
            session=session,
            job_id=job_id,
            folder=folder,
            step=step,
            note="; found complete on disk after its trainer stopped",
        )
        added.append(folder.name)
    return added


def trainer_running(job_dir: Path) -> bool:
    """Whether a trainer process of this job is alive: it holds the job's POSIX lock."""
    try:
        fd = os.open(job_dir / TRAINER_LOCK, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # releases the probe's lock, if it got it
    return False


def sweep_finished_jobs(*, session: Session, jobs_dir: Path) -> list[tuple[int, str, int]]:
    """Remove unfinished checkpoint folders left in jobs that have ended and whose trainer is gone
    (a trainer killed mid-save, and its job failed or was cancelled before another attempt
    cleaned up). Returns (job id, folder, bytes) for each."""
    found: dict[int, list[Path]] = {}
    for partial in jobs_dir.glob(f"*/checkpoints/{PARTIAL_PREFIX}*"):
        job_folder = partial.parent.parent.name
        if job_folder.isdigit():
            found.setdefault(int(job_folder), []).append(partial)
    if not found:
        return []
    finished = {
        job_id
        for job_id in session.exec(
            select(Job.id).where(
                col(Job.id).in_(found),
                col(Job.status).in_([JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled]),
            )
        )
        if job_id is not None
    }
    removed = []
    for job_id in sorted(finished):
        if trainer_running(jobs_dir / str(job_id)):
            continue
        for name, size in sweep_partials(jobs_dir / str(job_id) / "checkpoints"):
            removed.append((job_id, name, size))
    return removed
