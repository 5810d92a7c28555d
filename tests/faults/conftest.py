"""A whole service of real processes that a fault test can break: its own redis-server (so it can
be killed and restarted without touching other tests), the API under uvicorn, RQ workers, and
the trainers they start. Each piece can be killed (SIGKILL, SIGTERM) and started again."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.builders import chat_rows, write_jsonl
from tests.conftest import ROOT, START_TIMEOUT_S, free_port, process_tree, trainer_pids, wait_until

FINISHED = {"succeeded", "failed", "cancelled"}


def kill(pids: list[int], sig: signal.Signals = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


class Cluster:
    def __init__(
        self, root: Path, models_root: Path, *, data_dir: Path | None = None, settings: dict[str, str] | None = None
    ) -> None:
        self.root = root
        self.data_dir = data_dir or root / "data"
        self.datasets_dir = root / "datasets"
        self.datasets_dir.mkdir(parents=True, exist_ok=True)
        self.redis_port, self.api_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.env = {
            **os.environ,
            "DATA_DIR": str(self.data_dir),
            "DATABASE_URL": "",
            "REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "QUEUE_NAME": "faults",
            "ALLOWED_LOCAL_ROOTS": f"{models_root},{self.datasets_dir}",
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
            "PYTHONUNBUFFERED": "1",
            **(settings or {}),
        }
        self.redis: subprocess.Popen[bytes] | None = None
        self.api: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        # Every process started, restarted ones too: stop() reaps them all (a Popen dropped
        # before its process is reaped is a ResourceWarning).
        self.started: list[subprocess.Popen[bytes]] = []

    # ---- processes ------------------------------------------------------------------------------

    def _start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.root / f"{name}.log", "ab") as log:
            self.started.append(
                subprocess.Popen(args, cwd=ROOT, env=env or self.env, stdout=log, stderr=subprocess.STDOUT)
            )
        return self.started[-1]

    def start_redis(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is not installed (scripts/test installs it)"
        # No persistence: a restart loses every queued entry, the hardest case for the service.
        self.redis = self._start(
            "redis",
            [
                binary,
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.root),
            ],
        )

        def answers() -> bool:
            result = subprocess.run(["redis-cli", "-p", str(self.redis_port), "ping"], capture_output=True)
            return result.stdout.strip() == b"PONG"

        wait_until(answers, START_TIMEOUT_S, "redis-server to answer")

    def kill_redis(self) -> None:
        assert self.redis is not None
        self.redis.kill()
        self.redis.wait(10)

    def migrate(self) -> None:
        subprocess.run(
            [sys.executable, "-m", "alembic", "upgrade", "head"],
            cwd=ROOT,
            env=self.env,
            check=True,
            capture_output=True,
        )

    def start_api(self) -> None:
        self.api = self._start(
            "api",
            [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(self.api_port)],
        )

        def healthy() -> bool:
            try:
                return httpx.get(f"{self.url}/healthz", timeout=2).status_code in (200, 503)
            except httpx.HTTPError:
                return False

        wait_until(healthy, START_TIMEOUT_S, "the API to answer")

    def start_worker(self, **extra_env: str) -> subprocess.Popen[bytes]:
        """Start a worker and wait until it listens on its queue (its signal handlers are set)."""
        log = self.root / "worker.log"

        def listening() -> int:
            return log.read_text(errors="replace").count("*** Listening on") if log.exists() else 0

        before = listening()
        worker = self._start("worker", [sys.executable, "-m", "worker"], {**self.env, **extra_env})
        self.workers.append(worker)
        wait_until(lambda: listening() > before, START_TIMEOUT_S, "the worker to listen on its queue")
        return worker

    def start(self, **worker_env: str) -> Cluster:
        self.start_redis()
        self.migrate()
        self.start_api()
        self.start_worker(**worker_env)
        return self

    def everything(self) -> list[int]:
        """Every live process of this service: redis, API, workers, their horses and trainers."""
        roots = [p.pid for p in (self.redis, self.api, *self.workers) if p is not None and p.poll() is None]
        found = {pid for root in roots for pid in process_tree(root)}
        return sorted(found | set(trainer_pids(self.data_dir)))

    def kill_tree(self, process: subprocess.Popen[bytes]) -> None:
        kill(process_tree(process.pid))
        process.wait(10)

    def stop(self) -> None:
        kill(self.everything() + [p.pid for p in self.started if p.poll() is None])
        for process in self.started:
            process.wait(10)

    def logs(self) -> str:
        return "".join(
            f"----- {path.name} -----\n{path.read_text(errors='replace')[-4000:]}\n"
            for path in sorted(self.root.glob("*.log"))
        )

    # ---- the API, as a client ---------------------------------------------------------------------

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def submit(self, spec: dict[str, Any]) -> int:
        with self.http() as http:
            response = http.post("/jobs", json=spec)
        assert response.status_code == 201, response.text
        return int(response.json()["id"])

    def job(self, job_id: int) -> dict[str, Any]:
        with self.http() as http:
            return dict(http.get(f"/jobs/{job_id}").json())

    def events(self, job_id: int) -> list[tuple[str, str]]:
        with self.http() as http:
            return [(e["kind"], e["message"]) for e in http.get(f"/jobs/{job_id}/events").json()["items"]]

    def wait_for(self, job_id: int, statuses: set[str] = FINISHED, timeout_s: float = 240) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            try:
                record = self.job(job_id)
            except httpx.HTTPError:
                return None
            return record if record["status"] in statuses else None

        return dict(wait_until(reached, timeout_s, f"job {job_id} to reach {statuses}", interval_s=0.3))

    def wait_for_step(self, job_id: int, step: int, timeout_s: float = 180) -> None:
        wait_until(
            lambda: self.job(job_id)["progress"]["step"] >= step,
            timeout_s,
            f"job {job_id} at step {step}",
            interval_s=0.2,
        )

    def job_dir(self, job_id: int) -> Path:
        return self.data_dir / "jobs" / str(job_id)

    def wait_for_failpoint(self, job_id: int, name: str, timeout_s: float = 180) -> Path:
        from trainer.failpoints import marker

        path = marker(self.job_dir(job_id), name)
        wait_until(path.exists, timeout_s, f"the trainer of job {job_id} to reach failpoint {name}", interval_s=0.1)
        return path

    def chat_dataset(self, rows: int = 64) -> Path:
        return write_jsonl(self.datasets_dir / "chat.jsonl", chat_rows(rows))


@pytest.fixture
def cluster(tmp_path: Path, models_root: Path) -> Iterator[Cluster]:
    """The service's processes, not started: a test starts them (cluster.start()) with the
    settings it needs, and may replace cluster.data_dir before it does."""
    made = Cluster(tmp_path, models_root)
    try:
        yield made
    finally:
        made.stop()
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
