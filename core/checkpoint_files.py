"""Checkpoints made durable, and their files hashed.

The trainer writes each checkpoint under a staging name and publishes it here: every file and
folder is fsynced, then the folder is renamed to its real name and the parent fsynced, so a
crash at any moment leaves either the complete folder or no folder of that name (and a staging
folder that the next start removes). The worker hashes the files afterwards, in its own
process, off the training path. Records live in core.checkpoint_store."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from sqlmodel import select

from core.checkpoint_store import PARTIAL_PREFIX, mark_removed
from core.config import get_settings
from core.db import session_scope
from core.models import Checkpoint, CheckpointStatus, Job, utcnow
from core.shared_store import Manifest, StorageUnavailable, fsync_path, get_store

logger = logging.getLogger(__name__)

HASH_CHUNK_BYTES = 8 * 1024 * 1024


def staging_path(final: Path) -> Path:
    return final.with_name(f"{PARTIAL_PREFIX}{final.name}")


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` to the disk."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


def publish(staging: Path, final: Path) -> float:
    """Make a fully written staging folder visible under its real name, durably. A folder of that
    name from an earlier attempt is replaced. Returns the seconds spent (fsync is most of it)."""
    started = time.monotonic()
    fsync_tree(staging)
    if final.exists():
        # Renaming onto a non-empty folder fails: move the old one aside first.
        old = final.with_name(f"{PARTIAL_PREFIX}old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    fsync_path(final.parent)
    return time.monotonic() - started


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def hashed_entry(entry: dict[str, Any], path: Path) -> dict[str, Any]:
    """A file's record with its sha256, and its size and mtime as they were when it was hashed: a
    file whose stat differs later has changed since, and its sha256 is no longer vouched for."""
    before = path.stat()
    return {**entry, "sha256": sha256_file(path), "size": before.st_size, "mtime_ns": before.st_mtime_ns}


def unchanged_since_hashed(entry: dict[str, Any], stat: os.stat_result) -> bool:
    """Whether a file's stat is the one it had when it was hashed (a record from before stats
    were kept has no mtime: not vouched for)."""
    return stat.st_size == entry.get("size") and stat.st_mtime_ns == entry.get("mtime_ns")


def published_manifest(job_id: int, name: str) -> Manifest | None:
    store = get_store()
    return store.manifest(job_id, name) if store is not None else None


def entry_from_manifest(entry: dict[str, Any], published: dict[str, Any], path: Path) -> dict[str, Any]:
    """A file's record with the sha256 its copy to the shared store computed from the same bytes
    (no second read), and this host's stat of it where it has the file."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return {**entry, "sha256": published["sha256"], "size": published["size"]}
    if st.st_size != published["size"]:
        return hashed_entry(entry, path)  # not the bytes that were published: hash what is here
    return {**entry, "sha256": published["sha256"], "size": st.st_size, "mtime_ns": st.st_mtime_ns}


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
        manifest = published_manifest(job_id, name)
        for entry in files:
            published = manifest.entry(entry["path"]) if manifest is not None else None
            if published is not None:
                hashed.append(entry_from_manifest(entry, published, folder / entry["path"]))
            else:
                hashed.append(hashed_entry(entry, folder / entry["path"]))
    except StorageUnavailable as exc:
        logger.warning("job %s: %s not hashed yet, the shared store does not answer: %s", job_id, name, exc)
        return
    except FileNotFoundError:
        with session_scope() as session:
            mark_removed(session=session, job_id=job_id, checkpoints_dir=folder.parent)
        return
    with session_scope() as session:
        checkpoint = session.get(Checkpoint, checkpoint_id)
        # The trainer may have re-saved the same name while we hashed: keep its newer record.
        if checkpoint is None or checkpoint.created_at != created_at or checkpoint.status != CheckpointStatus.hashing:
            return
        checkpoint.files, checkpoint.status, checkpoint.verified_at = hashed, CheckpointStatus.ready, utcnow()
        session.add(checkpoint)
    logger.info("job %s: %s hashed (%d files)", job_id, name, len(hashed))


def hash_unfinished(limit: int = 8) -> int:
    """Hash checkpoints of finished jobs still waiting for their hashes (recorded by the
    reconciler after their worker died, so no job's worker will). Returns how many were hashed."""
    with session_scope() as session:
        pending = session.exec(
            select(Checkpoint.job_id, Checkpoint.id)
            .join(Job, Job.id == Checkpoint.job_id)  # type: ignore[arg-type]
            .where(Checkpoint.status == CheckpointStatus.hashing, Job.finished_at != None)  # noqa: E711
            .limit(limit)
        ).all()
    for job_id, checkpoint_id in pending:
        assert checkpoint_id is not None
        hash_checkpoint(job_id, checkpoint_id)
    return len(pending)
