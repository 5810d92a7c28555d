"""Failpoints: named moments in the trainer where a fault test can hold it, so that it can kill
processes or fill a disk at exactly that moment (the idea of etcd's gofail). Inert unless the
environment variable FINETUNE_FAILPOINTS names them; nothing sets it outside the fault tests.

    FINETUNE_FAILPOINTS="checkpoint_writing@40=pause,checkpoint_published=pause"

`pause` writes the marker file `<job dir>/failpoint-<name>` (holding the trainer's pid) and waits
until the test deletes it. `@40` limits the failpoint to the save of step 40."""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "FINETUNE_FAILPOINTS"
POLL_S = 0.05
# The places the trainer calls failpoint() with (tests/faults use them).
NAMES = frozenset({"checkpoint_writing", "checkpoint_published"})


def _parse(value: str) -> dict[str, tuple[str, int | None]]:
    points: dict[str, tuple[str, int | None]] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        where, _, action = item.partition("=")
        name, _, step = where.partition("@")
        if name not in NAMES or action != "pause":
            raise ValueError(f"{ENV}: cannot read {item!r} (known: {sorted(NAMES)}=pause)")
        points[name] = (action, int(step) if step else None)
    return points


def marker(job_dir: Path, name: str) -> Path:
    return job_dir / f"failpoint-{name}"


def failpoint(name: str, *, job_dir: Path, step: int | None = None) -> None:
    value = os.environ.get(ENV)
    if not value:
        return
    point = _parse(value).get(name)
    if point is None or (point[1] is not None and point[1] != step):
        return
    path = marker(job_dir, name)
    path.write_text(str(os.getpid()))
    while path.exists():
        time.sleep(POLL_S)
