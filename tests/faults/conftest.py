"""A whole service of real processes that a fault test can break: its own redis-server (so it can
be killed and restarted without touching other tests), the API under uvicorn, RQ workers, and
the trainers they start. Each piece can be killed (SIGKILL, SIGTERM) and started again."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scripts.service_harness import Service, kill
from tests.builders import chat_rows, write_jsonl
from tests.conftest import hub_paths

__all__ = ["Cluster", "fill", "kill"]


class Cluster(Service):
    """The harness's service with its own redis-server, fast heartbeats and a dataset folder."""

    def __init__(self, root: Path, models_root: Path) -> None:
        self.datasets_dir = root / "datasets"
        self.datasets_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(
            root,
            allowed_roots=[models_root, self.datasets_dir],
            settings={
                "QUEUE_NAME": "faults",
                "API_TOKENS": "",
                "HEARTBEAT_INTERVAL_S": "1",
                "STALE_AFTER_S": "5",
                "RECONCILE_INTERVAL_S": "2",
                "ENQUEUE_GRACE_S": "2",
                "CANCEL_GRACE_S": "20",
                "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": "1",  # one torch CPU thread: tests/conftest.py says why
            },
        )

    def chat_dataset(self, rows: int = 64) -> Path:
        return write_jsonl(self.datasets_dir / "chat.jsonl", chat_rows(rows))


@pytest.fixture
def cluster(
    tmp_path: Path,
    models_root: Path,
    hf_home: Path,
    trainer_forkserver: str,
    service_zygote: str,
    migrated_database: Path,
) -> Iterator[Cluster]:
    """The service's processes, not started: a test starts them (cluster.start()) with the
    settings it needs, and may replace cluster.data_dir before it does. One-process jobs' trainers
    are forked from the test process's trainer fork server (tests/conftest.py), which saves each
    the import of torch and TRL; a test about how a trainer starts sets TRAINER_FORKSERVER="".
    Its SQLite database is a copy of the session's migrated one, so that starting it spares the
    `alembic upgrade head` process (a data_dir put in its place is migrated as a user's would be)."""
    made = Cluster(tmp_path, models_root)
    made.env.update(hub_paths(hf_home), TRAINER_FORKSERVER=trainer_forkserver)
    made.data_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(migrated_database, made.data_dir / "jobs.db")
    try:
        yield made
    finally:
        made.stop(graceful=False)  # a fault test leaves nothing worth a graceful end
        print(made.logs())


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Any]:
    """mount(path, size): a small tmpfs at `path`, unmounted after the test; the test is skipped
    where the machine does not let it mount one (needs root or CAP_SYS_ADMIN)."""
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
        )
        if result.returncode != 0:
            pytest.skip(
                f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode}); "
                "the full-disk faults need root or CAP_SYS_ADMIN"
            )
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        for _ in range(50):  # processes killed a moment ago may still hold files open
            if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:  # still busy (the cluster's processes are stopped after this fixture): detach it
            subprocess.run(["umount", "--lazy", str(path)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write zeros into `folder` until its filesystem is full."""
    path = folder / "filler.bin"
    chunk = b"\0" * (1024 * 1024)
    with open(path, "wb", buffering=0) as handle:
        for block in (chunk, b"\0" * 4096, b"\0"):  # then the last few bytes
            try:
                while True:
                    handle.write(block)
            except OSError:
                pass
    return path
