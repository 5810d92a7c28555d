"""Fixtures that start real services: a redis-server on a free port, SQLite in a temp dir
(built through the Alembic migrations), the API under uvicorn and a real worker process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from alembic.config import Config
from redis import Redis

from scripts.service_harness import (  # noqa: F401  (process_tree, trainer_pids: the tests take them from here)
    JOB_TIMEOUT_S,
    ROOT,
    START_TIMEOUT_S,
    Service,
    free_port,
    process_tree,
    redis_server_command,
    trainer_pids,
    wait_until,
)
from tests.builders import TINY, build_llama, cache_hub_dataset, cache_hub_model, chat_rows, write_jsonl

# The Hub is the one thing tests cannot reach (HF_HUB_OFFLINE): these Hub ids are in the tests' own
# Hugging Face cache (hf_home), as stubs that a submit accepts and nothing trains on.
HUB_MODEL, HUB_DATASET = "test-org/stub-llama", "test-org/stub-chat"
HUB_SPEC = {"model": HUB_MODEL, "dataset": {"source": HUB_DATASET}}


# Tests that run one after another in one test process, sharing what its module fixtures started,
# by group (the longest prefix of a test's id names its group): the Ray tests share a Ray cluster
# (starting one costs 15 to 30 s of the 2-core machine). They are the longest chain of the run, so
# they go to two processes, each with a cluster of its own: the two tests that kill a rank and a
# node of it, and the others (the head-lost test, which takes its cluster down, last of them).
ONE_PROCESS_GROUPS = {
    "tests/test_ray_placement.py": "ray",
    "tests/test_ray_placement.py::test_a_rank_lost_past_ray_max_failures": "ray-faults",
    "tests/test_ray_placement.py::test_a_node_killed_mid_job": "ray-faults",
}


def one_process_group(nodeid: str) -> str | None:
    prefixes = [prefix for prefix in ONE_PROCESS_GROUPS if nodeid == prefix or nodeid.startswith(prefix + "::")]
    return ONE_PROCESS_GROUPS[max(prefixes, key=len)] if prefixes else None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first, each group in its own order: in parallel (scripts/test runs pytest -n),
    the long tests start while short ones are left to fill the other processes, so a run does not
    end with one long test running alone. First of all the tests of ONE_PROCESS_GROUPS: one after
    another, they are the longest chains of the run."""
    items.sort(
        key=lambda item: (
            item.get_closest_marker("slow") is None,
            one_process_group(item.nodeid) is None,
        )
    )


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """pytest-xdist's `load` distribution (each test to the next process that is nearly done),
    except that each group of ONE_PROCESS_GROUPS goes to one process as a whole. (xdist's own
    `loadgroup` does this by the xdist_group mark, by renaming each test's id, which pytest 9.2
    ignores: pytest-xdist issue 1386.)"""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Groups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return one_process_group(nodeid) or nodeid

    return Groups(config, log)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (scripts/test installs it)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        redis_server_command(port, workdir, binary),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = Redis(port=port)

    def ping() -> bool:
        try:
            return bool(client.ping())
        except Exception:
            return False

    wait_until(ping, START_TIMEOUT_S, "redis-server to answer")
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(models_root: Path) -> Path:
    """A random-weight Llama of about 100k parameters with a chat template."""
    return build_llama(models_root / "tiny-llama")


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HF_HOME for the tests' processes, never the developer's own cache (whose contents would
    change what a submit plans): HUB_MODEL (a tiny Llama's config, tokenizer and weights file
    names; nothing loads) and HUB_DATASET (a datasets cache folder) in it."""
    home = tmp_path_factory.mktemp("hf-home")
    config = {"model_type": "llama", "vocab_size": 512, "max_position_embeddings": 4096, **TINY}
    stub = {"config.json": json.dumps(config).encode(), "tokenizer_config.json": b"{}", "model.safetensors": b""}
    cache_hub_model(home / "hub", HUB_MODEL, stub)
    cache_hub_dataset(home / "datasets", HUB_DATASET)
    return home


# What the tests' trainers read at import (huggingface_hub, datasets and transformers keep these
# from their import on): the trainer fork server is started with them.
HUB_VARIABLES = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # torch's CPU threads: on the tiny model's tensors a second thread only spins (three times
    # the CPU of a training test), and the tests run side by side anyway (scripts/test).
    "OMP_NUM_THREADS": "1",
}


def hub_paths(hf_home: Path) -> dict[str, str]:
    return {
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_DATASETS_CACHE": str(hf_home / "datasets"),
    }


@pytest.fixture(scope="session")
def trainer_forkserver(tmp_path_factory: pytest.TempPathFactory, hf_home: Path) -> Iterator[str]:
    """A trainer fork server (trainer/forkserver.py) for this test process's jobs: torch,
    transformers and TRL are imported once, not once per job (4 to 6 s of CPU each, more than
    the tiny model's training). Started with what a trainer's environment keeps of ours
    (TRAINER_ENV_KEPT), as an operator would."""
    from fnmatch import fnmatchcase

    from worker.tasks import TRAINER_ENV_KEPT

    folder = tmp_path_factory.mktemp("forkserver")
    socket_path = folder / "trainer.sock"
    kept = {k: v for k, v in os.environ.items() if any(fnmatchcase(k, p) for p in TRAINER_ENV_KEPT)}
    env = {**kept, **HUB_VARIABLES, **hub_paths(hf_home), "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with open(folder / "forkserver.log", "ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "trainer", "--forkserver", str(socket_path)],
            cwd=folder,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    # Waited for (about 8 s of imports on this machine, more under coverage): a job that came before
    # the socket exists would start a trainer of its own and pay those imports itself.
    wait_until(lambda: socket_path.exists() or server.poll() is not None, 180, "the trainer fork server")
    assert server.poll() is None, (folder / "forkserver.log").read_text()[-3000:]
    yield str(socket_path)
    server.terminate()
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@pytest.fixture(scope="session")
def service_zygote(tmp_path_factory: pytest.TempPathFactory, hf_home: Path) -> Iterator[str]:
    """A service zygote (scripts/service_zygote.py) for this test process's services: the API and
    each worker are forked from it with their libraries imported (about 2 s of CPU less a start,
    under coverage), then run as their command lines would. Not waited for: a service started
    before it listens starts its processes as before (scripts/service_harness.py), and so does one
    whose hub variables, read at import, are not the tests' own (HUB_VARIABLES, hub_paths)."""
    from scripts.service_harness import ZYGOTE_ENV

    folder = tmp_path_factory.mktemp("zygote")
    socket_path = folder / "zygote.sock"
    with open(folder / "zygote.log", "ab") as log:
        zygote = subprocess.Popen(
            [sys.executable, "-m", "scripts.service_zygote", str(socket_path)],
            cwd=ROOT,
            env={**os.environ, **HUB_VARIABLES, **hub_paths(hf_home), "PYTHONUNBUFFERED": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    os.environ[ZYGOTE_ENV] = str(socket_path)
    yield str(socket_path)
    del os.environ[ZYGOTE_ENV]
    zygote.kill()
    zygote.wait()


@dataclass
class Env:
    data_dir: Path
    datasets_dir: Path
    redis_url: str
    queue_name: str
    vars: dict[str, str]

    def redis(self) -> Redis:
        return Redis.from_url(self.redis_url)


@pytest.fixture(scope="session")
def migrated_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A SQLite job database that the Alembic migrations built, once a session: each test's
    database is a copy of it (the same file the migrations would write, without the half second
    they take)."""
    data_dir = tmp_path_factory.mktemp("migrated")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DATA_DIR", str(data_dir))
        patch.setenv("DATABASE_URL", "")
        clear_caches()
        migrate()
        clear_caches()
    database = data_dir / "jobs.db"
    # The migrations' engine is disposed: every write is in the file, none left in a -wal beside it.
    assert database.is_file() and not database.with_name("jobs.db-wal").exists()
    yield database
    clear_caches()


@pytest.fixture
def env(
    tmp_path: Path,
    redis_url: str,
    models_root: Path,
    hf_home: Path,
    migrated_database: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Env]:
    """Settings for one test: its own DATA_DIR, queue and SQLite file, migrated to head. A test
    marked slow (it trains, or starts the service) gets the test process's trainer fork server and
    service zygote; the quick loop's tests (`-m "not slow"`) do neither, and do not start them
    (about 20 s of CPU a test process)."""
    slow = request.node.get_closest_marker("slow") is not None
    trainer_forkserver = request.getfixturevalue("trainer_forkserver") if slow else ""
    if slow:
        request.getfixturevalue("service_zygote")
    data_dir, datasets_dir = tmp_path / "data", tmp_path / "datasets"
    datasets_dir.mkdir()
    queue_name = f"test-{os.getpid()}-{tmp_path.name}"
    variables = {
        "DATA_DIR": str(data_dir),
        "REDIS_URL": redis_url,
        "QUEUE_NAME": queue_name,
        "ALLOWED_LOCAL_ROOTS": f"{models_root},{datasets_dir}",
        "DATABASE_URL": "",
        "HEARTBEAT_INTERVAL_S": "1",
        "STALE_AFTER_S": "5",
        "RECONCILE_INTERVAL_S": "2",
        "API_TOKENS": "",
        # Read-after-write: these tests change jobs behind the API's back and read them at once
        # (the record cache's own tests set a max age).
        "RECORD_MAX_AGE_S": "0",
        # The model hub is the one thing tests cannot reach: fail fast instead of waiting.
        **HUB_VARIABLES,
        **hub_paths(hf_home),
        # Each job's trainer forked from one that imported its libraries once (a test of how a
        # trainer process starts sets it to "", as a test not marked slow has it).
        "TRAINER_FORKSERVER": trainer_forkserver,
    }
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    # huggingface_hub reads these once, at import: tell the already-imported module too.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    clear_caches()
    data_dir.mkdir()
    shutil.copyfile(migrated_database, data_dir / "jobs.db")
    yield Env(data_dir, datasets_dir, redis_url, queue_name, variables)
    clear_caches()


def clear_caches() -> None:
    from core.config import get_settings
    from core.db import get_engine
    from core.queue import get_redis
    from core.shared_store import get_store

    if get_engine.cache_info().currsize:
        get_engine().dispose()
    for cached in (get_settings, get_engine, get_redis, get_store):
        cached.cache_clear()


def migrate() -> None:
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")


@pytest.fixture
def client(env: Env) -> Iterator[httpx.Client]:
    """The API in-process (no lifespan, so no background reconcile loop)."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    # Not entered as a context manager: that would run the lifespan and its reconcile loop.
    test_client = TestClient(create_app(), raise_server_exceptions=True)
    yield test_client
    test_client.close()


@pytest.fixture
def chat_dataset(env: Env) -> Path:
    return write_jsonl(env.datasets_dir / "chat.jsonl", chat_rows(64))


def job_spec(model: Path, dataset: Path, **hyperparameters: object) -> dict[str, object]:
    return {
        "model": str(model),
        "dataset": {"source": str(dataset)},
        "hyperparameters": {
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 2,
            "max_seq_length": 64,
            "learning_rate": 1e-3,
            "max_steps": 6,
            "logging_steps": 2,
            "save_steps": 3,
            **hyperparameters,
        },
    }


def run_to_end(client: httpx.Client, spec: dict[str, object]) -> dict[str, Any]:
    """Submit a spec and run its task in this process (claim, trainer child, finish): no RQ worker."""
    from worker.tasks import run_job

    response = client.post("/jobs", json=spec)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    run_job(job_id)
    return dict(client.get(f"/jobs/{job_id}").json())


@pytest.fixture
def service(env: Env, tmp_path: Path) -> Iterator[Service]:
    """The API under uvicorn and one worker, as separate processes, as a user runs them, on the
    test's settings and the session's redis-server."""
    running = Service(tmp_path / "service", data_dir=env.data_dir, redis_url=env.redis_url, settings=env.vars)
    try:
        yield running.start()
    finally:
        running.stop()
        print(running.logs())


def trainer_pid(job_id: int, data_dir: Path) -> int:
    pids = trainer_pids(data_dir, job_id)
    assert pids, f"no trainer process for job {job_id}"
    return pids[0]


def wait_for_status(http: httpx.Client, job_id: int, statuses: set[str], timeout_s: float = JOB_TIMEOUT_S) -> dict:
    def finished() -> dict | None:
        record = http.get(f"/jobs/{job_id}").json()
        return record if record["status"] in statuses else None

    return wait_until(finished, timeout_s, f"job {job_id} to reach {statuses}", interval_s=0.5)


def raw_get_scope(path: str) -> dict[str, Any]:
    """The ASGI scope of a plain GET of `path`, for tests that call an app directly (to send a path
    no HTTP client would, or to watch the messages it sends)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
