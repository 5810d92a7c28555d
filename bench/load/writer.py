"""The training side of the load benchmark: keeps the running job's record and step logs moving
while the API is under load, through the worker's and trainer's own code.

    DATA_DIR=/tmp/load-data .venv/bin/python bench/load/writer.py --job-id 10000 --rate 5

Each step is what the trainer does per logged step: JobReporter.on_step_end, then
JobReporter._write_log inside app.db.session_scope() (one step_log INSERT, the job's UPDATE).
The memory figures come from a stand-in for trainer.gpu.MemoryProbe that reads as an 80 GB H100
would (this machine may have no GPU), on SQLite and PostgreSQL alike. Every HEARTBEAT_INTERVAL_S
the worker's watch loop
(worker.tasks.TrainerWatch.poll_database) heartbeats the job, as a live worker would, so the
API's reconciler does not take the job for lost; it also polls once a second like the worker.
DATA_DIR and DATABASE_URL select the database, as for the service. On SIGTERM or SIGINT it stops
and writes the latency of its database writes as JSON to --stats."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType, SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sqlalchemy import func  # noqa: E402
from sqlmodel import select  # noqa: E402
from transformers import TrainerControl, TrainerState  # noqa: E402

from core.config import get_settings  # noqa: E402
from core.db import session_scope  # noqa: E402
from core.models import Job, StepLog  # noqa: E402
from trainer.callbacks import JobReporter  # noqa: E402
from worker.tasks import POLL_INTERVAL_S, TrainerWatch  # noqa: E402

GIB = 1024**3
TOKENS_PER_STEP = 2 * 64 * 900


class H100MemoryProbe:
    """trainer.gpu.MemoryProbe's interface with the figures of a training 8B model on an H100."""

    def __init__(self) -> None:
        self.reads = 0

    def read(self) -> dict[str, int | None]:
        self.reads += 1
        used = 63 * GIB + (self.reads % 7) * 64 * 1024**2
        return {
            "allocated": 54 * GIB,
            "reserved": 57 * GIB,
            "peak_allocated": 63 * GIB,
            "device_used": used,
            "device_total": 85_520_809_984,
            "device_used_peak": 64 * GIB,
        }

    def close(self) -> None:
        """Nothing to release: no sampler thread."""


def percentile(sorted_values: list[float], share: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(share * len(sorted_values)))]


class Writer:
    def __init__(self, job_id: int, rate: float) -> None:
        self.job_id = job_id
        self.period = 1.0 / rate
        self.stopping = threading.Event()
        self.write_seconds: list[float] = []
        self.heartbeat_seconds: list[float] = []
        with session_scope() as session:
            job = session.get(Job, job_id)
            if job is None or job.total_steps is None:
                raise SystemExit(f"job {job_id} is missing or has no total_steps: run bench/load/generate.py")
            self.total_steps = job.total_steps
            last = session.exec(select(func.max(StepLog.step)).where(StepLog.job_id == job_id)).one()
        self.step = int(last or job.step)
        self.reporter = JobReporter(
            job_id=job_id,
            memory=H100MemoryProbe(),  # type: ignore[arg-type]
            checkpoints_dir=get_settings().checkpoints_dir(job_id),
            tokens_trained=lambda: float(self.step * TOKENS_PER_STEP),
            paused_seconds=lambda: 0.0,
        )
        self.watch = TrainerWatch(job_id)

    def heartbeat(self) -> None:
        started = time.perf_counter()
        self.watch.poll_database(heartbeat=True)
        self.heartbeat_seconds.append(time.perf_counter() - started)

    def write_step(self) -> None:
        """One logged step, as JobReporter.on_step_end and on_log write it."""
        self.step += 1
        state = TrainerState(
            global_step=self.step, max_steps=self.total_steps, epoch=2.0 * self.step / self.total_steps
        )
        args = SimpleNamespace(save_steps=self.total_steps)  # on_step_end reads only save_steps
        self.reporter.on_step_end(args, state, TrainerControl())  # type: ignore[arg-type]
        remaining = max(0.0, 1 - self.step / self.total_steps)
        metrics: dict[str, float | None] = {
            "loss": round(0.95 + 0.4 * remaining + 0.03 * ((self.step * 7919) % 13 - 6) / 6, 4),
            "learning_rate": 2e-5 * remaining,
            "grad_norm": round(0.5 + (self.step % 11) / 10, 3),
            "tokens_per_second": 9120.5,
        }
        started = time.perf_counter()
        with session_scope() as session:
            self.reporter._write_log(
                session, state, metrics, self.reporter.memory.read(), float(self.step * TOKENS_PER_STEP)
            )
        self.write_seconds.append(time.perf_counter() - started)

    def run(self, ready_file: Path | None) -> None:
        """Write a step every period (never in bursts to catch up: a trainer slowed by its
        writes is slowed), heartbeat every HEARTBEAT_INTERVAL_S, poll like the worker between."""
        self.heartbeat()
        self.write_step()
        if ready_file is not None:
            ready_file.write_text(str(self.step))
        interval = get_settings().heartbeat_interval_s
        next_step = next_poll = time.monotonic() + self.period
        last_beat = time.monotonic()
        while not self.stopping.is_set():
            now = time.monotonic()
            if now >= next_step:
                self.write_step()
                next_step = max(next_step + self.period, time.monotonic())
            if now >= next_poll:
                if now - last_beat >= interval:
                    self.heartbeat()
                    last_beat = now
                else:
                    self.watch.poll_database(heartbeat=False)
                next_poll = now + POLL_INTERVAL_S
            self.stopping.wait(max(0.0, min(next_step, next_poll) - time.monotonic()))

    def stats(self) -> dict[str, Any]:
        writes = sorted(self.write_seconds)
        beats = sorted(self.heartbeat_seconds)

        def ms(value: float | None) -> float | None:
            return None if value is None else round(1000 * value, 2)

        return {
            "job_id": self.job_id,
            "gpu_memory_figures": "h100",
            "rows_written": len(writes),
            "last_step": self.step,
            "write_ms": {
                "p50": ms(percentile(writes, 0.5)),
                "p99": ms(percentile(writes, 0.99)),
                "max": ms(writes[-1] if writes else None),
            },
            "heartbeats": len(beats),
            "heartbeat_ms_max": ms(beats[-1] if beats else None),
        }

    def close(self) -> None:
        self.watch.hasher.shutdown()
        shutil.rmtree(self.watch.workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job-id", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=5.0, help="step-log rows a second")
    parser.add_argument("--ready-file", type=Path, help="written once the first heartbeat and row are committed")
    parser.add_argument("--stats", type=Path, help="where to write the write latencies (JSON) when stopped")
    args = parser.parse_args()
    writer = Writer(args.job_id, args.rate)

    def stop(_signum: int, _frame: FrameType | None) -> None:
        writer.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        writer.run(args.ready_file)
    finally:
        writer.close()
        summary = json.dumps(writer.stats())
        if args.stats is not None:
            args.stats.write_text(summary)
        print(summary, flush=True)


if __name__ == "__main__":
    main()
