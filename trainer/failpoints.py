"""Failpoints: named moments in the trainer where a fault test can hold it, so that it can kill
processes or fill a disk at exactly that moment (the idea of etcd's gofail). Inert unless the
environment variable FINETUNE_FAILPOINTS names them; nothing sets it outside the fault tests.

    FINETUNE_FAILPOINTS="checkpoint_writing@40=pause,checkpoint_published=pause"

`pause` writes the marker file `<job dir>/failpoint-<name>` (holding the trainer's pid) and waits
until the test deletes it. `@40` limits the failpoint to the save of step 40, once.

    FINETUNE_FAILPOINTS="training_step=oom>2"

    FINETUNE_FAILPOINTS="training_step@3=pause"

holds the trainer in the middle of a step (its first micro-batch after step 3), in the step's
compute and outside any write to the job database: a trainer hung in a kernel or a collective.

`oom>2` raises torch's OutOfMemoryError, with CUDA's message, at a training step whose
micro-batch is larger than 2: a CPU test of what the service does when a job exceeds the card.

    FINETUNE_FAILPOINTS="stop_signals=ignore"

The trainer ignores the worker's cancel and pause signals (SIGUSR1, SIGUSR2), as if they had gone
astray: a request must still reach it through its request file (core/stop_requests.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "FINETUNE_FAILPOINTS"
POLL_S = 0.05
# The places the trainer calls failpoint() with (tests/faults use them).
NAMES = frozenset({"checkpoint_writing", "checkpoint_published", "training_step", "stop_signals"})


def _parse(value: str) -> dict[str, tuple[str, int | None]]:
    points: dict[str, tuple[str, int | None]] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        where, _, action = item.partition("=")
        name, _, step = where.partition("@")
        known = action == "pause" or (action.startswith("oom>") and action[4:].isdigit()) or (action == "ignore")
        if name not in NAMES or not known:
            raise ValueError(
                f"{ENV}: cannot read {item!r} (known: {sorted(NAMES)}=pause, training_step=oom>N, stop_signals=ignore)"
            )
        points[name] = (action, int(step) if step else None)
    return points


def ignores_stop_signals() -> bool:
    value = os.environ.get(ENV)
    return value is not None and _parse(value).get("stop_signals", ("", None))[0] == "ignore"


def marker(job_dir: Path, name: str) -> Path:
    return job_dir / f"failpoint-{name}"


def out_of_memory_above(micro_batch: int) -> None:
    """The `training_step=oom>N` failpoint: a CUDA OOM for any micro-batch above N."""
    value = os.environ.get(ENV)
    point = _parse(value).get("training_step") if value else None
    if point is None or not point[0].startswith("oom>") or micro_batch <= int(point[0][4:]):
        return
    import torch

    raise torch.OutOfMemoryError(
        f"CUDA out of memory. Tried to allocate 2.00 GiB (failpoint: micro-batch {micro_batch} > {point[0][4:]})"
    )


_held: set[tuple[str, int]] = set()


def failpoint(name: str, *, job_dir: Path, step: int | None = None) -> None:
    value = os.environ.get(ENV)
    if not value:
        return
    point = _parse(value).get(name)
    if point is None or point[0] != "pause" or (point[1] is not None and point[1] != step):
        return
    if point[1] is not None:  # `@N` holds the trainer once (a step has several micro-batches)
        if (name, point[1]) in _held:
            return
        _held.add((name, point[1]))
    path = marker(job_dir, name)
    path.write_text(str(os.getpid()))
    while path.exists():
        time.sleep(POLL_S)
