"""The Alembic migrations build exactly the schema core.models describes, on SQLite and on
PostgreSQL, and the API works on a database they built."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine, make_url
from sqlmodel import SQLModel

from tests.conftest import ROOT, Env, clear_caches

TABLES = {
    "job",
    "step_log",
    "job_event",
    "checkpoint",
    "file",
    "webhook_delivery",
    "openai_job",
    "project",
    "principal",
    "api_token",
    "audit_entry",
    "idempotency_key",
    "planner_measurement",
    "alembic_version",
}
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
SPEC = {
    "model": "meta-llama/Llama-3.1-8B",
    "dataset": {"source": "allenai/tulu-3-sft-mixture", "split": "train[:1%]"},
    "chat_template_from": "allenai/Llama-3.1-Tulu-3-8B",
    "hyperparameters": {"learning_rate": 5e-6, "num_train_epochs": 2, "max_steps": None, "warmup_ratio": 0.03},
}


def alembic_config() -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["configure_logger"] = False
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def schema_differences(engine: Engine) -> list[object]:
    import core.models  # noqa: F401  (registers the tables on SQLModel.metadata)

    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True, "compare_server_default": True})
        return list(compare_metadata(context, SQLModel.metadata))


def current_engine() -> Engine:
    from core.config import get_settings
    from core.db import make_engine

    return make_engine(get_settings().sqlalchemy_url)


@pytest.fixture
def empty_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    data_dir = tmp_path / "data"
    monkeypatch.setenv("DATA_DIR", str(data_dir))
    monkeypatch.setenv("DATABASE_URL", "")
    clear_caches()
    yield data_dir / "jobs.db"
    clear_caches()


def test_alembic_builds_schema_matching_models(empty_sqlite: Path) -> None:
    command.upgrade(alembic_config(), "head")

    assert empty_sqlite.is_file()
    engine = current_engine()
    try:
        assert set(sa.inspect(engine).get_table_names()) == TABLES
        assert schema_differences(engine) == []
        with engine.connect() as connection:
            assert (
                connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one() == head_revision()
            )
        # The comparison is not blind: against no models at all it sees every table.
        with engine.connect() as connection:
            context = MigrationContext.configure(connection)
            removed = {diff[1].name for diff in compare_metadata(context, sa.MetaData()) if diff[0] == "remove_table"}
        assert removed == TABLES - {"alembic_version"}

        command.downgrade(alembic_config(), "base")
        assert set(sa.inspect(engine).get_table_names()) == {"alembic_version"}
    finally:
        engine.dispose()


# --- PostgreSQL ------------------------------------------------------------------------


@pytest.fixture
def postgres_database(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh, uniquely named database on the test server, dropped afterwards."""
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is the `postgres` extra")
    base = make_url(os.environ.get("POSTGRES_TEST_URL") or DEFAULT_POSTGRES_URL)
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    try:
        with admin.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        message = f"PostgreSQL at {base.render_as_string(hide_password=True)} is unreachable: {exc.orig}"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI must run the PostgreSQL tests; set POSTGRES_TEST_URL)")
        pytest.skip(message)
    name = f"finetune_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        clear_caches()  # the app's pooled connections would block the DROP
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def aware(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() == timedelta(0), value
    return parsed


@pytest.mark.postgres
def test_migrations_and_job_round_trip_on_postgresql(
    env: Env, postgres_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.main import create_app

    monkeypatch.setenv("DATABASE_URL", postgres_database)
    # The spec names the Hub ids of the README's example, which the tests' cache does not hold:
    # this test is about the database, so the submit does not look for them.
    monkeypatch.setenv("HUB_CHECK_AT_SUBMIT", "false")
    clear_caches()
    command.upgrade(alembic_config(), "head")

    engine = current_engine()
    try:
        assert engine.dialect.name == "postgresql"
        assert set(sa.inspect(engine).get_table_names()) == TABLES
        assert schema_differences(engine) == []
    finally:
        engine.dispose()

    api = TestClient(create_app(), raise_server_exceptions=True)  # no lifespan: no reconcile loop
    before = datetime.now(UTC)
    response = api.post("/jobs", json=SPEC)
    assert response.status_code == 201, response.text
    record = response.json()
    job_id = record["id"]
    assert record["status"] == "queued"
    assert record["spec"]["dataset"] == {"source": "allenai/tulu-3-sft-mixture", "split": "train[:1%]", "columns": {}}
    assert record["spec"]["chat_template_from"] == "allenai/Llama-3.1-Tulu-3-8B"
    assert record["spec"]["hyperparameters"]["learning_rate"] == 5e-6
    assert record["spec"]["hyperparameters"]["max_steps"] is None
    assert record["spec"]["hyperparameters"]["warmup_ratio"] == 0.03
    created_at = aware(record["created_at"])
    assert before - timedelta(seconds=1) <= created_at <= datetime.now(UTC) + timedelta(seconds=1)

    assert api.get(f"/jobs/{job_id}").json() == record  # read back from the database as stored
    assert api.get("/jobs").json() == {"items": [record], "next_cursor": None}
    assert api.get("/jobs", params={"status": "queued"}).json()["items"] == [record]
    assert api.get("/jobs", params={"status": "running"}).json()["items"] == []

    # `paused` is a value 0006 added to PostgreSQL's native enum type.
    assert api.post(f"/jobs/{job_id}/pause").json()["status"] == "paused"
    assert api.get("/jobs", params={"status": "paused"}).json()["items"][0]["id"] == job_id
    resumed = api.post(f"/jobs/{job_id}/resume").json()
    assert resumed["status"] == "queued"

    cancelled = api.post(f"/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200
    body = cancelled.json()
    assert body["status"] == "cancelled"
    assert body["error"] == {"code": "cancelled", "message": "cancelled before it started"}
    assert body["spec"] == record["spec"]
    assert aware(body["created_at"]) == created_at
    assert created_at <= aware(body["finished_at"]) <= datetime.now(UTC) + timedelta(seconds=1)
    assert api.get(f"/jobs/{job_id}").json() == body
    again = api.post(f"/jobs/{job_id}/cancel")
    assert (again.status_code, again.json()) == (
        409,
        {"error": "Conflict", "detail": f"job {job_id} has already finished (cancelled); there is nothing to cancel"},
    )
    events = api.get(f"/jobs/{job_id}/events").json()["items"]
    assert [(e["kind"], e["message"]) for e in events] == [
        (
            "queued",
            "job accepted and queued; the dataset is read and checked when the job starts; not planned "
            "before queuing: config.json of 'meta-llama/Llama-3.1-8B' could not be fetched: "
            "LocalEntryNotFoundError",
        ),
        ("paused", f"paused before it started; POST /jobs/{job_id}/resume queues it again"),
        ("resume_requested", "resumed: queued again"),
        ("cancelled", "cancelled before it started"),
    ]
    assert all(aware(e["created_at"]) >= created_at for e in events)

    # What a GPU job writes: an H100's memory in a step log, a checkpoint larger than 2 GiB (32-bit
    # columns refused both on PostgreSQL before 0005).
    from core.db import session_scope
    from core.models import Checkpoint, StepLog

    with session_scope() as session:
        session.add(
            StepLog(
                job_id=job_id,
                step=1,
                num_tokens=5 * 2**31,
                vram_allocated=35 * 2**30,
                vram_reserved=40 * 2**30,
                vram_peak_allocated=36 * 2**30,
                device_used=53 * 2**30,
                device_total=80 * 2**30,
            )
        )
        session.add(Checkpoint(job_id=job_id, name="checkpoint-1", step=1, size_bytes=32 * 2**30))
    log = api.get(f"/jobs/{job_id}/logs").json()["items"][0]
    assert (log["num_tokens"], log["vram"]["device_total"]) == (5 * 2**31, 80 * 2**30)
    assert api.get(f"/jobs/{job_id}/checkpoints").json()["items"][0]["size"] == 32 * 2**30
    with session_scope() as session:  # 32-bit columns cannot hold them: the downgrade below would refuse
        session.execute(sa.delete(StepLog))
        session.execute(sa.delete(Checkpoint))

    # The column really keeps the zone (not a naive timestamp that happens to read back right).
    engine = current_engine()
    try:
        with engine.connect() as connection:
            kind = connection.execute(sa.text("SELECT pg_typeof(created_at)::text FROM job")).scalar_one()
        assert kind == "timestamp with time zone"
    finally:
        engine.dispose()

    command.downgrade(alembic_config(), "base")
    engine = current_engine()
    try:
        assert set(sa.inspect(engine).get_table_names()) == {"alembic_version"}
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_postgresql_can_upgrade_again_after_downgrade_to_base(
    env: Env, postgres_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", postgres_database)
    clear_caches()
    command.upgrade(alembic_config(), "head")
    command.downgrade(alembic_config(), "base")
    command.upgrade(alembic_config(), "head")

    engine = current_engine()
    try:
        assert schema_differences(engine) == []
    finally:
        engine.dispose()


def test_jobs_and_files_that_existed_before_0012_belong_to_the_default_project(empty_sqlite: Path) -> None:
    from app.main import create_app

    command.upgrade(alembic_config(), "0011")
    engine = current_engine()
    try:
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "INSERT INTO job (id, status, created_at, spec, step, attempts, requested_restarts) "
                    "VALUES (7, 'succeeded', CURRENT_TIMESTAMP, :spec, 0, 1, 0)"
                ),
                {"spec": '{"model": "org/m", "dataset": {"source": "org/d"}}'},
            )
            connection.execute(
                sa.text(
                    "INSERT INTO file (id, created_at, filename, path, size_bytes, sha256, rows, bad_rows) "
                    "VALUES (3, CURRENT_TIMESTAMP, 'a.jsonl', 'files/3.jsonl', 1, 'x', 1, 0)"
                )
            )
    finally:
        engine.dispose()
    command.upgrade(alembic_config(), "head")
    api = TestClient(create_app(), raise_server_exceptions=True)
    assert api.get("/jobs/7").json()["project"] == "default"
    assert api.get("/files/3").json()["project"] == "default"
    project = api.get("/admin/projects").json()["items"]
    assert [(p["name"], p["usage"]["queued_jobs"]) for p in project] == [("default", 0)]
    # A project made afterwards gets the next id, on SQLite as on PostgreSQL (whose sequence 0012 moves).
    assert api.post("/admin/projects", json={"name": "vision"}).status_code == 201
    command.downgrade(alembic_config(), "0011")


def test_jobs_stored_while_bf16_was_the_default_keep_bf16_after_0017(empty_sqlite: Path) -> None:
    """A spec leaves an option at its default out; 0017 writes bf16 into the specs stored while that
    was the default, so that "auto" (the default since) does not change a resumed job's numerics."""
    from app.main import create_app

    command.upgrade(alembic_config(), "0016")
    engine = current_engine()
    try:
        with engine.begin() as connection:
            insert = sa.text(
                "INSERT INTO job (id, status, created_at, spec, step, attempts, requested_restarts, project_id) "
                "VALUES (:id, 'succeeded', CURRENT_TIMESTAMP, :spec, 0, 1, 0, 1)"
            )
            connection.execute(insert, {"id": 7, "spec": '{"model": "org/m", "dataset": {"source": "org/d"}}'})
            fp8 = '{"model": "org/m", "dataset": {"source": "org/d"}, "precision": "fp8", "fp8_recipe": "rowwise"}'
            connection.execute(insert, {"id": 8, "spec": fp8})
            connection.execute(insert, {"id": 9, "spec": "{}"})  # a deleted job's
    finally:
        engine.dispose()
    command.upgrade(alembic_config(), "head")
    api = TestClient(create_app(), raise_server_exceptions=True)
    assert api.get("/jobs/7").json()["spec"]["precision"] == "bf16"
    assert api.get("/jobs/8").json()["spec"]["precision"] == "fp8"
    engine = current_engine()
    try:
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT spec FROM job WHERE id = 9")).scalar_one() in ("{}", {})
    finally:
        engine.dispose()
