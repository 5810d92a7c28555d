"""Dropping the optimizer state of a succeeded job's intermediate checkpoints (the spec's
`drop_optimizer_state_on_success`): the weights stay downloadable, the disk gets back what the
optimizer took (for paged_adamw_8bit, as much as the bf16 weights; for AdamW in fp32, twice)."""

from __future__ import annotations

from pathlib import Path

from sqlmodel import Session, select

from core.checkpoint_store import FINAL_NAME
from core.contract import CheckpointStatus, EventKind
from core.events import add_event
from core.models import Checkpoint

OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")


def drop_optimizer_state(*, session: Session, job_id: int, checkpoints_dir: Path) -> int:
    """Delete the optimizer files of every kept intermediate checkpoint, update their records and
    say what was freed in an event. Returns the bytes freed."""
    dropped: list[str] = []
    freed = 0
    for checkpoint in session.exec(
        select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.status != CheckpointStatus.removed)
    ).all():
        if checkpoint.name == FINAL_NAME:
            continue
        gone = [f for f in checkpoint.files if f["path"] in OPTIMIZER_FILES]
        for entry in gone:
            (checkpoints_dir / checkpoint.name / entry["path"]).unlink(missing_ok=True)
        if gone:
            size = sum(int(f["size"]) for f in gone)
            checkpoint.files = [f for f in checkpoint.files if f["path"] not in OPTIMIZER_FILES]
            checkpoint.size_bytes -= size
            session.add(checkpoint)
            dropped.append(checkpoint.name)
            freed += size
    if dropped:
        add_event(
            session=session,
            job_id=job_id,
            kind=EventKind.optimizer_state_dropped,
            message=f"dropped the optimizer state of {', '.join(dropped)}: {freed} bytes freed "
            f"({freed / 1024**3:.2f} GiB); their weights stay downloadable, they cannot be resumed from",
        )
    session.commit()
    return freed
