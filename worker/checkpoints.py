"""Checkpoint records: what the trainer saved, what rotation removed, and file hashes.

The trainer records a checkpoint right after saving it (names and sizes, cheap); the worker
hashes its files afterwards in its own process, off the training path."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from sqlmodel import Session, select

from app.config import get_settings
from app.crud import add_event
from app.db import session_scope
from app.files import folder_files
from app.models import Checkpoint, CheckpointStatus, utcnow

logger = logging.getLogger(__name__)

HASH_CHUNK_BYTES = 8 * 1024 * 1024


def record_checkpoint(*, session: Session, job_id: int, folder: Path, step: int) -> Checkpoint:
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
    session.add(checkpoint)
    add_event(session=session, job_id=job_id, kind="checkpoint",
              message=f"saved {folder.name} at step {step} ({checkpoint.size_bytes} bytes, {len(files)} files)")
    return checkpoint


def mark_removed(*, session: Session, job_id: int, checkpoints_dir: Path) -> list[str]:
    """Records of checkpoints whose folder is gone (save_total_limit rotated them away)."""
    removed = []
    for checkpoint in session.exec(
        select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.status != CheckpointStatus.removed)
    ).all():
        if not (checkpoints_dir / checkpoint.name).is_dir():
            checkpoint.status, checkpoint.removed_at = CheckpointStatus.removed, utcnow()
            session.add(checkpoint)
            add_event(session=session, job_id=job_id, kind="checkpoint_removed",
                      message=f"{checkpoint.name} removed from disk (save_total_limit keeps the newest)")
            removed.append(checkpoint.name)
    return removed


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def hash_checkpoint(job_id: int, checkpoint_id: int) -> None:
    """Hash every file of one checkpoint and mark it ready; a folder that vanished meanwhile
    (rotated away) is marked removed instead."""
    with session_scope() as session:
        checkpoint = session.get(Checkpoint, checkpoint_id)
        if checkpoint is None or checkpoint.status != CheckpointStatus.hashing:
            return
        name, files, created_at = checkpoint.name, list(checkpoint.files), checkpoint.created_at
    folder = get_settings().checkpoints_dir(job_id) / name
    hashed = []
    try:
        for entry in files:
            hashed.append({**entry, "sha256": sha256_file(folder / entry["path"])})
    except FileNotFoundError:
        with session_scope() as session:
            mark_removed(session=session, job_id=job_id, checkpoints_dir=folder.parent)
        return
    with session_scope() as session:
        checkpoint = session.get(Checkpoint, checkpoint_id)
        # The trainer may have re-saved the same name while we hashed: keep its newer record.
        if checkpoint is None or checkpoint.created_at != created_at or checkpoint.status != CheckpointStatus.hashing:
            return
        checkpoint.files, checkpoint.status = hashed, CheckpointStatus.ready
        session.add(checkpoint)
    logger.info("job %s: %s hashed (%d files)", job_id, name, len(hashed))
