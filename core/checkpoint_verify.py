"""Checkpoints checked against the sha256 their files had when they were saved.

Disks rot and people edit files: a checkpoint whose bytes no longer match its recorded hashes
must not be served as intact, nor resumed from. Three things find out:

- the schedule: every CHECKPOINT_VERIFY_INTERVAL_S each ready checkpoint's files are hashed
  again, by the API's verifier loop (verify_due), off every request path;
- a request: POST /jobs/{id}/checkpoints/{name}/verify (`finetune verify`) asks for the same at
  once, for one checkpoint;
- a change seen in passing: each file's size and mtime are kept from when it was hashed; a download
  or a resume that sees other ones notes it (changed_seen_at) and the verifier hashes those files,
  and only those, again.

A file that no longer matches marks the checkpoint `corrupt`, with a `checkpoint_corrupt` event
naming it: that file is not served (409) and the job does not resume from the checkpoint. One
that matches again (restored from a backup, say) makes the checkpoint `ready` again, with a
`checkpoint_verified` event. Several API processes may verify at once: a claim (a conditional
update) gives each checkpoint to one of them; a claim older than VERIFY_CLAIM_LEASE_S was left by a
verifier that died and is taken back."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, and_, case, or_, update
from sqlmodel import Session, col, select

from core.checkpoint_files import hashed_entry, unchanged_since_hashed
from core.checkpoint_store import committed_in_store, mark_removed
from core.config import get_settings
from core.contract import EventKind
from core.db import session_scope
from core.events import add_event
from core.models import Checkpoint, CheckpointStatus, utcnow
from core.shared_store import SharedStore, StorageUnavailable, get_store

logger = logging.getLogger(__name__)

# A verifier that has held a checkpoint this long has died (a 32 GB checkpoint hashes in about a
# minute): another takes it back.
VERIFY_CLAIM_LEASE_S = 3600.0


def _due(now: datetime) -> ColumnElement[bool]:
    """Checkpoints a verifier should look at now, and that no live verifier holds."""
    settings = get_settings()
    asked = or_(col(Checkpoint.verify_requested_at).is_not(None), col(Checkpoint.changed_seen_at).is_not(None))
    wanted = and_(col(Checkpoint.status).in_([CheckpointStatus.ready, CheckpointStatus.corrupt]), asked)
    if settings.checkpoint_verify_interval_s > 0:
        scheduled = and_(
            col(Checkpoint.status) == CheckpointStatus.ready,
            or_(
                col(Checkpoint.verified_at).is_(None),
                col(Checkpoint.verified_at) < now - timedelta(seconds=settings.checkpoint_verify_interval_s),
            ),
        )
        wanted = or_(wanted, scheduled)
    free = or_(
        col(Checkpoint.verify_claimed_at).is_(None),
        col(Checkpoint.verify_claimed_at) < now - timedelta(seconds=VERIFY_CLAIM_LEASE_S),
    )
    return and_(wanted, free)


@dataclass(frozen=True)
class Claimed:
    """What a verifier read when it claimed a checkpoint: its result is written only while the
    record is the same one (a resumed job may save the same name again meanwhile)."""

    checkpoint_id: int
    job_id: int
    name: str
    created_at: datetime
    files: list[dict[str, Any]]
    status: str
    claimed_at: datetime
    requested_at: datetime | None
    changed_seen_at: datetime | None
    whole: bool  # every file (the schedule, a request), or only those whose stat changed

    @classmethod
    def of(cls, row: Checkpoint, now: datetime, *, whole: bool | None = None) -> Claimed:
        assert row.id is not None
        if whole is None:
            interval = get_settings().checkpoint_verify_interval_s
            scheduled = (
                interval > 0
                and row.status == CheckpointStatus.ready
                and (row.verified_at is None or row.verified_at < now - timedelta(seconds=interval))
            )
            whole = row.verify_requested_at is not None or scheduled
        return cls(
            row.id,
            row.job_id,
            row.name,
            row.created_at,
            [dict(f) for f in row.files],
            str(row.status),
            now,
            row.verify_requested_at,
            row.changed_seen_at,
            whole,
        )


def _claim(checkpoint_id: int) -> Claimed | None:
    with session_scope() as session:
        now = utcnow()
        won = session.execute(
            update(Checkpoint)
            .where(col(Checkpoint.id) == checkpoint_id, _due(now))
            .values(verify_claimed_at=now)
            .execution_options(synchronize_session=False)
        )
        if won.rowcount != 1:  # type: ignore[attr-defined]
            return None
        session.commit()
        row = session.get(Checkpoint, checkpoint_id, populate_existing=True)
        assert row is not None
        return Claimed.of(row, now)


def verify_due(limit: int = 4) -> int:
    """Verify up to `limit` checkpoints that are due (asked-for ones first); returns how many.
    Blocking, and as long as the hashing takes: the API runs it in a thread of its own."""
    with session_scope() as session:
        due = session.exec(
            select(Checkpoint.id)
            .where(_due(utcnow()))
            .order_by(
                case((col(Checkpoint.verify_requested_at).is_not(None), 0), else_=1),
                case((col(Checkpoint.changed_seen_at).is_not(None), 0), else_=1),
                col(Checkpoint.verified_at),
                col(Checkpoint.id),
            )
            .limit(limit)
        ).all()
    done = 0
    for checkpoint_id in due:
        assert checkpoint_id is not None
        claimed = _claim(checkpoint_id)
        if claimed is not None:
            verify(claimed)
            done += 1
    return done


def _hash_again(claimed: Claimed, folder: Path) -> tuple[list[dict[str, Any]], list[str], int]:
    """The files' records after looking at them, the problems found (one per bad file), and how
    many files were hashed."""
    files, problems, hashed = [], [], 0
    for entry in claimed.files:
        path = folder / entry["path"]
        kept = {key: value for key, value in entry.items() if key != "corrupt"}
        try:
            stat = path.stat()
        except FileNotFoundError:
            files.append({**kept, "corrupt": True})
            problems.append(f"{entry['path']} is missing")
            continue
        if entry.get("sha256") is None:
            files.append(entry)  # never hashed: nothing to hold it against
            continue
        if not claimed.whole and unchanged_since_hashed(entry, stat) and not entry.get("corrupt"):
            files.append(entry)  # unchanged since it was hashed: the schedule will come to it
            continue
        if stat.st_size != entry["size"]:
            files.append({**kept, "corrupt": True})
            problems.append(f"{entry['path']} is {stat.st_size} bytes, not the {entry['size']} it was saved with")
            continue
        try:
            now_hashed = hashed_entry(entry, path)
        except FileNotFoundError:  # removed while it was read (the checkpoint rotated away?)
            files.append({**kept, "corrupt": True})
            problems.append(f"{entry['path']} is missing")
            continue
        hashed += 1
        if now_hashed["sha256"] == entry["sha256"]:
            files.append({key: value for key, value in now_hashed.items() if key != "corrupt"})
        else:
            files.append({**kept, "corrupt": True})
            problems.append(
                f"{entry['path']} does not match the sha256 it was saved with "
                f"({entry['sha256'][:12]}..., now {now_hashed['sha256'][:12]}...)"
            )
    return files, problems, hashed


def _hash_in_store(claimed: Claimed, store: SharedStore) -> tuple[list[dict[str, Any]], list[str], int]:
    """_hash_again for a checkpoint this host has no copy of: every file read from the shared store."""
    files, problems = [], []
    for entry in claimed.files:
        kept = {key: value for key, value in entry.items() if key != "corrupt"}
        if entry.get("sha256") is None:
            files.append(entry)
            continue
        try:
            size, sha256 = store.hash_object(store.file_key(claimed.job_id, claimed.name, entry["path"]))
        except FileNotFoundError:
            files.append({**kept, "corrupt": True})
            problems.append(f"{entry['path']} is missing from the shared store")
            continue
        if size == entry["size"] and sha256 == entry["sha256"]:
            files.append(kept)
        else:
            files.append({**kept, "corrupt": True})
            problems.append(f"{entry['path']} in the shared store does not match the sha256 it was saved with")
    return files, problems, len(files)


def verify(claimed: Claimed, *, claim_held: bool = True) -> None:
    """Hash the claimed checkpoint's files again (all of them, or those whose stat changed) and
    record what was found. Without `claim_held` (a resume that cannot wait for the verifier
    holding it), the result is written all the same, and the holder's is written after it."""
    folder = get_settings().checkpoints_dir(claimed.job_id) / claimed.name
    store = get_store()
    if folder.is_dir():
        files, problems, hashed = _hash_again(claimed, folder)
    elif store is not None and claimed.name in (committed_in_store(claimed.job_id) or ()):
        try:
            files, problems, hashed = _hash_in_store(claimed, store)  # trained on another host
        except StorageUnavailable as exc:
            logger.warning("checkpoint %s of job %s not verified: %s", claimed.name, claimed.job_id, exc)
            with session_scope() as session:
                _release(session, claimed)
            return
    else:  # rotated away or deleted, before or while it was read
        with session_scope() as session:
            mark_removed(
                session=session, job_id=claimed.job_id, checkpoints_dir=folder.parent, why="its folder is gone"
            )
            _release(session, claimed)
        return
    status = CheckpointStatus.corrupt if problems else CheckpointStatus.ready
    same_record = [
        col(Checkpoint.id) == claimed.checkpoint_id,
        col(Checkpoint.created_at) == claimed.created_at,
        col(Checkpoint.status).in_([CheckpointStatus.ready, CheckpointStatus.corrupt]),
    ]
    values: dict[str, Any] = {
        "files": files,
        "status": status,
        # Asked for again while this ran: the next pass looks again.
        "verify_requested_at": _cleared(col(Checkpoint.verify_requested_at), claimed.requested_at),
        "changed_seen_at": _cleared(col(Checkpoint.changed_seen_at), claimed.changed_seen_at),
    }
    if claimed.whole:
        values["verified_at"] = claimed.claimed_at
    if claim_held:
        same_record.append(col(Checkpoint.verify_claimed_at) == claimed.claimed_at)
        values["verify_claimed_at"] = None
    with session_scope() as session:
        recorded = session.execute(
            update(Checkpoint).where(*same_record).values(**values).execution_options(synchronize_session=False)
        )
        if recorded.rowcount != 1:  # type: ignore[attr-defined]
            logger.info("checkpoint %s of job %s changed while it was verified", claimed.name, claimed.job_id)
            return
        _report(session, claimed, problems, hashed, len(files))


def _cleared(column: Any, seen: datetime | None) -> Any:
    """NULL if the column still holds what the claim saw, else what it holds now."""
    if seen is None:
        return column
    return case((column == seen, None), else_=column)


def _release(session: Session, claimed: Claimed) -> None:
    session.execute(
        update(Checkpoint)
        .where(col(Checkpoint.id) == claimed.checkpoint_id, col(Checkpoint.verify_claimed_at) == claimed.claimed_at)
        .values(verify_claimed_at=None, verify_requested_at=None, changed_seen_at=None)
        .execution_options(synchronize_session=False)
    )


def _report(session: Session, claimed: Claimed, problems: list[str], hashed: int, files: int) -> None:
    name, job_id = claimed.name, claimed.job_id
    if problems:
        if claimed.status != CheckpointStatus.corrupt or claimed.requested_at is not None:
            add_event(
                session=session,
                job_id=job_id,
                kind=EventKind.checkpoint_corrupt,
                message=f"{name} is corrupt: {'; '.join(problems)}. Its bad files are not served and the job "
                f"does not resume from it; restore them and POST /jobs/{job_id}/checkpoints/{name}/verify, or "
                f"delete the checkpoint",
            )
        logger.warning("job %s: %s is corrupt: %s", job_id, name, "; ".join(problems))
    elif claimed.status == CheckpointStatus.corrupt:
        add_event(
            session=session,
            job_id=job_id,
            kind=EventKind.checkpoint_verified,
            message=f"{name} is intact again: its {files} files match the sha256 they were saved with",
        )
    elif claimed.requested_at is not None:
        add_event(
            session=session,
            job_id=job_id,
            kind=EventKind.checkpoint_verified,
            message=f"{name} verified on request: its {files} files match the sha256 they were saved with",
        )
    logger.info("job %s: %s verified (%d of %d files hashed)", job_id, name, hashed, files)


def note_changed(session: Session, checkpoint_id: int) -> None:
    """A download or a resume saw a file whose size or mtime differ from its hashing's: the
    verifier hashes the changed files again (once: a note already there stays)."""
    session.execute(
        update(Checkpoint)
        .where(col(Checkpoint.id) == checkpoint_id, col(Checkpoint.changed_seen_at).is_(None))
        .values(changed_seen_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def request_verification(session: Session, checkpoint: Checkpoint) -> None:
    """Every file of the checkpoint hashed again as soon as a verifier can (POST .../verify)."""
    if checkpoint.verify_requested_at is None:
        checkpoint.verify_requested_at = utcnow()
        session.add(checkpoint)


def corrupt_checkpoints(session: Session, job_id: int) -> dict[str, str]:
    """The job's checkpoints known corrupt: name -> its bad files (a resume skips them)."""
    rows = session.exec(
        select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.status == CheckpointStatus.corrupt)
    ).all()
    return {row.name: ", ".join(f["path"] for f in row.files if f.get("corrupt")) or "a file" for row in rows}


def changed_since_hashed(folder: Path, files: list[dict[str, Any]]) -> list[str]:
    """The hashed files whose size or mtime differ from when they were hashed (or are gone)."""
    changed = []
    for entry in files:
        if entry.get("sha256") is None:
            continue
        try:
            if unchanged_since_hashed(entry, os.stat(folder / entry["path"])):
                continue
        except FileNotFoundError:
            pass
        changed.append(entry["path"])
    return changed


def resume_problem(job_id: int, folder: Path) -> str | None:
    """Why the job must not resume from this complete checkpoint folder: it is known corrupt, or a
    file changed since it was hashed no longer matches (those files, and only those, are hashed
    now: the resume path pays for what changed, nothing else). None when it may."""
    claimed: Claimed | None = None
    with session_scope() as session:
        query = select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.name == folder.name)
        row = session.exec(query).first()
        if row is None or row.status not in (CheckpointStatus.ready, CheckpointStatus.corrupt):
            return None  # not hashed yet (saved just before a crash): nothing to hold it against
        if row.status == CheckpointStatus.ready:
            changed = changed_since_hashed(folder, row.files)
            if not changed:
                return None
            logger.info("job %s: %s changed since it was hashed (%s); hashing those", job_id, row.name, changed)
            claimed = Claimed.of(row, utcnow(), whole=False)
    if claimed is not None:
        verify(claimed, claim_held=False)
    with session_scope() as session:
        corrupt = corrupt_checkpoints(session, job_id)
    if folder.name in corrupt:
        return f"it is corrupt: {corrupt[folder.name]} no longer match the sha256 they were saved with"
    return None
