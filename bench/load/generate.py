"""Builds the data the load benchmark reads: a job database shaped like a busy service's and one
2 GiB checkpoint file.

    .venv/bin/python bench/load/generate.py [DATA_DIR] [--database-url postgresql+psycopg://...]

The database is migrated with Alembic (`alembic upgrade head`, as scripts/run does, on SQLite
and PostgreSQL alike) and then filled with raw SQL
(sqlite3 executemany, or psycopg COPY for PostgreSQL), not the ORM, so a million rows take
seconds: 10,000 jobs (finished ones of every kind, 20 queued, job 10000 running), 1,000,000
step-log rows (100 jobs of 10,000 steps, the running job among them), 50,000 events, and job
1's checkpoint `final` whose one file, model.safetensors, is 2 GiB of pseudo-random bytes under
DATA_DIR/jobs/1/checkpoints/final. A marker file (DATA_DIR/load-data.json) records what was
built: a second run with the same parameters reuses the SQLite database (migrated to head again,
should a migration have come since) and the file as they are (the writer of a previous run will
have added a few hundred step logs to the running job)."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from core.spec import JobSpec  # noqa: E402

DEFAULT_DATA_DIR = Path("/tmp/load-data")
MARKER = "load-data.json"

JOBS = 10_000
RUNNING_JOB = 10_000  # the job the writer keeps logging to
QUEUED_JOBS = range(9_980, 10_000)  # the newest jobs after the running one
LOG_JOBS = [*range(9_000, 9_099), RUNNING_JOB]  # 100 jobs with STEPS step logs each
STEPS = 10_000
RUNNING_TOTAL_STEPS = 2 * STEPS  # the running job is half way
EVENTS = 50_000
CHECKPOINT_JOB, CHECKPOINT_NAME, CHECKPOINT_FILE = 1, "final", "model.safetensors"
FILE_SIZE = 2 * 1024**3
SEED = 9
# What a different value of changes the data: the marker keeps it, and a mismatch rebuilds.
PARAMS = {
    "version": 2,  # 2: failure codes from core.contract.ErrorCode (1 wrote one the API refuses)
    "jobs": JOBS,
    "log_jobs": len(LOG_JOBS),
    "steps": STEPS,
    "events": EVENTS,
    "file_size": FILE_SIZE,
    "seed": SEED,
}

BLOCK = 64 * 1024**2
STEP_SECONDS = 2.0  # wall time of one optimizer step in the generated logs
GIB = 1024**3
H100_TOTAL = 85_520_809_984  # what NVML reports for an 80 GB H100

JOB_COLUMNS = (
    "id",
    "status",
    "created_at",
    "started_at",
    "finished_at",
    "spec",
    "backend",
    "versions",
    "step",
    "total_steps",
    "epoch",
    "eta_seconds",
    "phase",
    "metrics",
    "vram",
    "data_report",
    "error_code",
    "error_message",
    "cancel_requested_at",
    "attempts",
    "worker_name",
    "heartbeat_at",
)
STEP_LOG_COLUMNS = (
    "job_id",
    "created_at",
    "step",
    "epoch",
    "loss",
    "learning_rate",
    "grad_norm",
    "tokens_per_second",
    "num_tokens",
    "eval_loss",
    "vram_allocated",
    "vram_reserved",
    "vram_peak_allocated",
    "device_used",
    "device_total",
)
EVENT_COLUMNS = ("job_id", "created_at", "kind", "message")
CHECKPOINT_COLUMNS = ("job_id", "name", "step", "created_at", "status", "size_bytes", "files", "removed_at")

VERSIONS = {
    "python": "3.11.2",
    "torch": "2.11.0",
    "transformers": "5.17.0",
    "trl": "1.14.2",
    "datasets": "4.8.5",
    "accelerate": "1.15.0",
    "unsloth": "2026.10.9",
    "unsloth_zoo": "2026.10.9",
    "bitsandbytes": "0.50.2",
}
FAILURES = [
    (
        "cuda_oom",
        "CUDA ran out of memory while training (OutOfMemoryError: CUDA out of memory. Tried to allocate "
        "1.96 GiB). Lower per_device_train_batch_size or max_seq_length, then resubmit the job.",
    ),
    (
        "dataset_invalid",
        "1,204 of 61,000 rows are malformed (1.97%, over MAX_BAD_ROW_FRACTION 1%): line 17: "
        "'messages' is missing. Fix the rows, or the job's dataset settings, then resubmit the job.",
    ),
    (
        "trainer_crashed",
        "The trainer exited with code -9 while training. The trainer's full output is in the job's "
        "trainer.log. Fix what its traceback names, then resubmit the job.",
    ),
]


def spec_templates() -> list[dict[str, Any]]:
    """Job specs as POST /jobs stores them: validated by the service's own JobSpec."""
    raw = [
        {
            "model": "meta-llama/Llama-3.1-8B",
            "dataset": {"source": "allenai/tulu-3-sft-mixture"},
            "chat_template_from": "allenai/Llama-3.1-Tulu-3-8B",
            "validation": {"fraction": 0.02},
            "hyperparameters": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 64},
        },
        {
            "model": "Qwen/Qwen2.5-7B",
            "dataset": {"source": "HuggingFaceH4/ultrachat_200k", "split": "train_sft"},
            "validation": {"split": "test_sft"},
            "hyperparameters": {
                "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 16,
                "max_seq_length": 2048,
                "learning_rate": 1e-5,
                "lr_scheduler_type": "cosine",
            },
        },
        {
            "model": "mistralai/Mistral-7B-v0.3",
            "dataset": {"source": "teknium/OpenHermes-2.5", "columns": {"messages": "conversations"}},
            "hyperparameters": {"gradient_accumulation_steps": 32, "packing": True, "save_total_limit": 3},
        },
        {
            "model": "microsoft/phi-4",
            "dataset": {
                "source": "openai/gsm8k",
                "split": "train",
                "columns": {"prompt": "question", "completion": "answer"},
            },
            "hyperparameters": {"per_device_train_batch_size": 1, "max_seq_length": 1024, "num_train_epochs": 3},
        },
    ]
    specs = []
    for body in raw:
        spec = JobSpec.model_validate(body).model_dump(mode="json")
        del spec["dataset"]["file_id"]  # as crud.create_job stores specs that name no uploaded file
        specs.append(spec)
    return specs


def data_report(rng: random.Random, steps: int, hp: dict[str, Any], *, validation: bool) -> dict[str, Any]:
    """What the trainer reports about the data before training (trainer.data.data_report)."""
    sequences = steps * hp["per_device_train_batch_size"] * hp["gradient_accumulation_steps"]
    rows = sequences + rng.randrange(0, 500)
    median = rng.randrange(300, 1500)
    tokens = rows * median
    report: dict[str, Any] = {
        "checked_before_queuing": False,
        "rows": rows,
        "row_format": "messages",
        "bad_rows": 0,
        "bad_row_examples": [],
        "rows_used": rows,
        "tokens_per_row": {"min": 12, "median": median, "p95": median * 3, "max": median * 9},
        "rows_truncated": rows // 200,
        "tokens_cut_by_truncation": rows * 7,
        "tokens_per_epoch": tokens,
        "loss_tokens_per_epoch": tokens * 2 // 3,
        "sequences_per_epoch": sequences,
        "sequences_estimated": False,
        "optimizer_steps": steps,
        "tokens_to_train": tokens * 2,
    }
    if validation:
        report["validation"] = {
            "fraction": 0.02,
            "rows_used": rows // 50,
            "tokens": tokens // 50,
            "loss_tokens": tokens // 75,
        }
    return report


def vram_figures(rng: random.Random) -> dict[str, int]:
    allocated = int(rng.uniform(52, 58) * GIB)
    used = allocated + int(rng.uniform(6, 9) * GIB)
    return {
        "allocated": allocated,
        "reserved": allocated + 3 * GIB,
        "peak_allocated": allocated + 9 * GIB,
        "device_used": used,
        "device_total": H100_TOTAL,
        "device_used_peak": used + 2 * GIB,
    }


def metrics_at(rng: random.Random, step: int, total: int, lr: float) -> dict[str, float | None]:
    return {
        "loss": round(0.9 + 1.4 * math.exp(-4 * step / total) + rng.uniform(-0.05, 0.05), 4),
        "learning_rate": lr * max(0.0, 1 - step / total),
        "grad_norm": round(rng.uniform(0.3, 1.6), 4),
        "tokens_per_second": round(rng.uniform(8800, 9400), 1),
        "eval_loss": round(1.0 + 1.3 * math.exp(-4 * step / total), 4),
        "eval_step": step - step % 500,
    }


class Built:
    """The rows to load, and the times they refer to."""

    def __init__(self, now: datetime, file_sha256: str) -> None:
        self.now = now
        self.file_sha256 = file_sha256
        self.rng = random.Random(SEED)
        self.specs = spec_templates()
        self.started: dict[int, datetime] = {}  # log jobs: when step 1 began
        self.jobs = [self.job(job_id) for job_id in range(1, JOBS + 1)]
        self.events = list(self.all_events())

    def created_at(self, job_id: int) -> datetime:
        if job_id == RUNNING_JOB:  # started so that its step STEPS is now
            return self.now - timedelta(seconds=STEPS * STEP_SECONDS + 900)
        return self.now - timedelta(days=40) + timedelta(minutes=5 * job_id)

    def status(self, job_id: int) -> str:
        if job_id == RUNNING_JOB:
            return "running"
        if job_id in QUEUED_JOBS:
            return "queued"
        if job_id in (CHECKPOINT_JOB, 5) or job_id in LOG_JOBS:
            return "succeeded"
        draw = self.rng.random()
        return "succeeded" if draw < 0.7 else "failed" if draw < 0.9 else "cancelled"

    def job(self, job_id: int) -> tuple[Any, ...]:
        rng, status = self.rng, self.status(job_id)
        created = self.created_at(job_id)
        template = self.specs[job_id % len(self.specs)]
        hp = dict(template["hyperparameters"])
        if job_id in LOG_JOBS:
            total = RUNNING_TOTAL_STEPS if job_id == RUNNING_JOB else STEPS
            hp.update(max_steps=total, logging_steps=1, eval_steps=500, save_steps=2500)
        else:
            total = rng.randrange(200, 3000)
            hp["max_steps"] = total if rng.random() < 0.5 else None
        hp["learning_rate"] = rng.choice([5e-6, 1e-5, 2e-5])
        spec = {**template, "hyperparameters": hp}
        row: dict[str, Any] = dict.fromkeys(JOB_COLUMNS)
        row.update(id=job_id, status=status, created_at=created, spec=spec, step=0, attempts=0)
        if status == "queued":
            return tuple(row[c] for c in JOB_COLUMNS)
        started = created + timedelta(seconds=rng.uniform(5, 120))
        report = data_report(rng, total, hp, validation=template.get("validation") is not None)
        step = {
            "succeeded": total,
            "failed": rng.randrange(0, total),
            "cancelled": rng.randrange(1, total),
            "running": STEPS,
        }[status]
        row.update(
            started_at=started,
            backend="unsloth",
            versions=VERSIONS,
            step=step,
            total_steps=total,
            epoch=round(2.0 * step / total, 4),
            attempts=1,
            data_report=report,
            worker_name=f"gpu-node-{job_id % 4}-gpu{job_id % 8}-{40000 + job_id}",
            heartbeat_at=started + timedelta(seconds=step * STEP_SECONDS),
        )
        if step:
            row.update(metrics=metrics_at(rng, step, total, hp["learning_rate"]), vram=vram_figures(rng))
        if job_id in LOG_JOBS:
            self.started[job_id] = started
        if status == "running":
            row.update(phase="training", eta_seconds=(total - step) * STEP_SECONDS, heartbeat_at=self.now)
            return tuple(row[c] for c in JOB_COLUMNS)
        row["finished_at"] = started + timedelta(seconds=step * STEP_SECONDS + 60)
        if status == "failed":
            row["error_code"], row["error_message"] = rng.choice(FAILURES)
        elif status == "cancelled":
            row.update(
                error_code="cancelled",
                error_message=f"cancelled by request at step {step}",
                cancel_requested_at=row["finished_at"] - timedelta(seconds=20),
            )
        return tuple(row[c] for c in JOB_COLUMNS)

    def all_events(self) -> Iterator[tuple[Any, ...]]:
        """The events of each job in order: queued, started, training_started, the ending; the
        jobs with step logs get `evaluated` and `checkpoint` events between, EVENTS in all."""
        index = {c: i for i, c in enumerate(JOB_COLUMNS)}
        base = sum(
            1 if job[index["status"]] == "queued" else 3 if job[index["status"]] == "running" else 4
            for job in self.jobs
        )
        extra, spare = divmod(EVENTS - base, len(LOG_JOBS))
        for job in self.jobs:
            job_id, status, created = job[index["id"]], job[index["status"]], job[index["created_at"]]
            yield (
                job_id,
                created,
                "queued",
                "job accepted and queued; dataset checked when the job starts; "
                "planned peak GPU memory 71.4 GiB of 79.6 GiB (fits)",
            )
            if status == "queued":
                continue
            started, step = job[index["started_at"]], job[index["step"]]
            yield (job_id, started, "started", f"started on {job[index['worker_name']]} (attempt 1)")
            yield (
                job_id,
                started + timedelta(seconds=40),
                "training_started",
                f"training started: {job[index['total_steps']]} optimizer steps",
            )
            if job_id in LOG_JOBS:
                count = extra + (1 if LOG_JOBS.index(job_id) < spare else 0)
                for n in range(1, count + 1):
                    at = min(n * step // (count + 1), step)
                    when = started + timedelta(seconds=at * STEP_SECONDS + 41)
                    if n % 5:
                        yield (
                            job_id,
                            when,
                            "evaluated",
                            f"validation loss {1.0 + 1.3 * math.exp(-4 * n / count):.4f} at step {at}",
                        )
                    else:
                        yield (
                            job_id,
                            when,
                            "checkpoint",
                            f"saved checkpoint-{at} at step {at} "
                            f"(48200432117 bytes, 14 files); fsync and rename took 21.37 s",
                        )
            if status != "running":
                message = {
                    "succeeded": "succeeded",
                    "failed": f"failed: {job[index['error_message']]}",
                    "cancelled": f"cancelled: {job[index['error_message']]}",
                }[status]
                yield (job_id, job[index["finished_at"]], status, message)

    def step_logs(self) -> Iterator[tuple[Any, ...]]:
        rng = random.Random(SEED + 1)
        tokens_per_step = 2 * 64 * 900
        for job_id in LOG_JOBS:
            started = self.started[job_id]
            total = RUNNING_TOTAL_STEPS if job_id == RUNNING_JOB else STEPS
            allocated = int(rng.uniform(52, 58) * GIB)
            for step in range(1, STEPS + 1):
                loss = 0.9 + 1.4 * math.exp(-4 * step / total) + rng.uniform(-0.05, 0.05)
                used = allocated + rng.randrange(6 * GIB, 9 * GIB)
                yield (
                    job_id,
                    started + timedelta(seconds=step * STEP_SECONDS),
                    step,
                    2.0 * step / total,
                    loss,
                    2e-5 * min(1.0, step / 300) * (1 - step / total),
                    rng.uniform(0.3, 1.6),
                    rng.uniform(8800, 9400),
                    step * tokens_per_step,
                    1.0 + 1.3 * math.exp(-4 * step / total) if step % 500 == 0 else None,
                    allocated,
                    allocated + 3 * GIB,
                    allocated + 9 * GIB,
                    used,
                    H100_TOTAL,
                )

    def checkpoint(self) -> tuple[Any, ...]:
        job = self.jobs[CHECKPOINT_JOB - 1]
        index = {c: i for i, c in enumerate(JOB_COLUMNS)}
        files = [{"path": CHECKPOINT_FILE, "size": FILE_SIZE, "sha256": self.file_sha256}]
        return (
            CHECKPOINT_JOB,
            CHECKPOINT_NAME,
            job[index["step"]],
            job[index["finished_at"]],
            "ready",
            FILE_SIZE,
            files,
            None,
        )


# ---- the checkpoint file --------------------------------------------------------------------


def checkpoint_path(data_dir: Path) -> Path:
    return data_dir / "jobs" / str(CHECKPOINT_JOB) / "checkpoints" / CHECKPOINT_NAME / CHECKPOINT_FILE


def write_checkpoint_file(path: Path) -> str:
    """FILE_SIZE pseudo-random bytes (never a sparse or zero-filled file), written in 64 MiB
    blocks; returns its sha256."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    generator = np.random.PCG64(SEED)
    digest = hashlib.sha256()
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        for _ in range(FILE_SIZE // BLOCK):
            block = generator.random_raw(BLOCK // 8).tobytes()
            digest.update(block)
            handle.write(block)
    partial.replace(path)
    return digest.hexdigest()


# ---- loading --------------------------------------------------------------------------------


def to_sql(value: Any) -> Any:
    """A value as the ORM stores it in SQLite: JSON as json.dumps text, datetimes as naive UTC text."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
    if isinstance(value, dict | list):
        return json.dumps(value)
    return value


def insert_sql(table: str, columns: tuple[str, ...]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


def load_sqlite(db_path: Path, built: Built) -> None:
    connection = sqlite3.connect(db_path)
    try:
        connection.execute("PRAGMA synchronous=OFF")
        with connection:
            connection.executemany(insert_sql("job", JOB_COLUMNS), (tuple(map(to_sql, row)) for row in built.jobs))
            connection.executemany(
                insert_sql("job_event", EVENT_COLUMNS), (tuple(map(to_sql, row)) for row in built.events)
            )
            # The only datetime of a step log is its first column but one: format it alone.
            connection.executemany(
                insert_sql("step_log", STEP_LOG_COLUMNS),
                ((row[0], to_sql(row[1]), *row[2:]) for row in built.step_logs()),
            )
            connection.execute(insert_sql("checkpoint", CHECKPOINT_COLUMNS), tuple(map(to_sql, built.checkpoint())))
        connection.execute("ANALYZE")
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()


def postgres_conninfo(database_url: str) -> str:
    """A SQLAlchemy URL (postgresql+psycopg://...) as libpq takes it."""
    scheme, rest = database_url.split("://", 1)
    return f"{scheme.split('+', 1)[0]}://{rest}"


def to_pg(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, dict | list) else value


def load_postgres(database_url: str, built: Built) -> None:
    import psycopg

    with psycopg.connect(postgres_conninfo(database_url)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM job")
        existing = cursor.fetchone()
        if existing is not None and existing[0]:
            raise SystemExit(f"{database_url}: the job table already has rows; give a fresh database")
        tables = [
            ("job", JOB_COLUMNS, iter(built.jobs)),
            ("job_event", EVENT_COLUMNS, iter(built.events)),
            ("step_log", STEP_LOG_COLUMNS, built.step_logs()),
            ("checkpoint", CHECKPOINT_COLUMNS, iter([built.checkpoint()])),
        ]
        for table, columns, rows in tables:
            with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(tuple(map(to_pg, row)))
        # Job ids were given explicitly: move the sequence past them, as inserts through the ORM would.
        cursor.execute("SELECT setval(pg_get_serial_sequence('job', 'id'), (SELECT max(id) FROM job))")
        connection.commit()
        cursor.execute("ANALYZE")


def migrate(data_dir: Path, database_url: str) -> str:
    """`alembic upgrade head`, as scripts/run and the image do (a no-op on a database already
    there); returns the revision the database is at."""
    env = {**os.environ, "DATA_DIR": str(data_dir), "DATABASE_URL": database_url}
    done = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "alembic"), "upgrade", "head"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"alembic upgrade head failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    if database_url:
        import psycopg

        with psycopg.connect(postgres_conninfo(database_url)) as connection:
            row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    else:
        connection = sqlite3.connect(data_dir / "jobs.db")
        try:
            row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
        finally:
            connection.close()
    return str(row[0]) if row else ""


def generate(data_dir: Path, database_url: str = "") -> dict[str, Any]:
    """Build (or reuse) the data; returns what the benchmark needs to know about it."""
    started = time.monotonic()
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    marker_path = data_dir / MARKER
    marker = json.loads(marker_path.read_text()) if marker_path.exists() else {}
    same = marker.get("params") == PARAMS
    file_path = checkpoint_path(data_dir)
    if same and marker.get("file_sha256") and file_path.is_file() and file_path.stat().st_size == FILE_SIZE:
        sha256, file_reused = marker["file_sha256"], True
    else:
        marker = {}
        marker_path.unlink(missing_ok=True)
        sha256, file_reused = write_checkpoint_file(file_path), False
        marker_path.write_text(json.dumps({"params": PARAMS, "file_sha256": sha256}))
    db_path = data_dir / "jobs.db"
    if database_url:
        revision = migrate(data_dir, database_url)
        load_postgres(database_url, Built(datetime.now(UTC), sha256))
        db_reused = False
    elif marker.get("sqlite_loaded") and db_path.exists():
        revision = migrate(data_dir, "")  # a database built before the newest migration gets it
        if revision != marker.get("alembic_revision"):  # tables rebuilt by batch migrations lose their statistics
            connection = sqlite3.connect(db_path)
            try:
                connection.execute("ANALYZE")
            finally:
                connection.close()
            marker_path.write_text(json.dumps({**marker, "alembic_revision": revision}))
        db_reused = True
    else:
        for leftover in (db_path, db_path.with_name("jobs.db-wal"), db_path.with_name("jobs.db-shm")):
            leftover.unlink(missing_ok=True)
        revision = migrate(data_dir, "")
        load_sqlite(db_path, Built(datetime.now(UTC), sha256))
        marker_path.write_text(
            json.dumps({"params": PARAMS, "file_sha256": sha256, "sqlite_loaded": True, "alembic_revision": revision})
        )
        db_reused = False
    return {
        "data_dir": str(data_dir),
        "database": "postgresql" if database_url else "sqlite",
        "file": str(file_path),
        "file_size": FILE_SIZE,
        "file_sha256": sha256,
        "file_reused": file_reused,
        "database_reused": db_reused,
        "alembic_revision": revision,
        "params": PARAMS,
        "seconds": round(time.monotonic() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", nargs="?", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument(
        "--database-url",
        default="",
        help="a fresh PostgreSQL database (postgresql+psycopg://...); default: SQLite in DATA_DIR",
    )
    args = parser.parse_args()
    summary = generate(args.data_dir, args.database_url)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
