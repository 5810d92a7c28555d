"""Static checks of compose.yaml via `docker-compose config` (no Docker engine needed).

CI must install the `docker-compose` command (Debian: apt package `docker-compose`).
Locally the tests are skipped when it is missing; with CI set they fail instead.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose_bin() -> str:
    path = shutil.which("docker-compose")
    if path is None:
        msg = "docker-compose not found on PATH (install the `docker-compose` apt package)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def _compose(compose_bin: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [compose_bin, "-f", "compose.yaml", "config", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def config(compose_bin: str) -> dict:
    # Compose v2 can print JSON. Debian bookworm's docker-compose is v1.29,
    # which only prints YAML and answers the unknown `--format` with its usage
    # text and exit code 0, so fall back to parsing YAML when that isn't JSON.
    res = _compose(compose_bin, "--format", "json")
    if res.returncode == 0:
        try:
            return json.loads(res.stdout)
        except json.JSONDecodeError:
            pass
    import yaml

    res = _compose(compose_bin)
    assert res.returncode == 0, res.stderr
    return yaml.safe_load(res.stdout)


def _command(svc: dict) -> list[str]:
    cmd = svc.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def _mounts(svc: dict) -> dict[str, str]:
    """target -> source, for both v1 short strings and v2 long-form dicts."""
    out = {}
    for v in svc.get("volumes", []):
        if isinstance(v, str):
            source, target = v.split(":")[:2]
        else:
            source, target = v.get("source"), v["target"]
        out[target] = source
    return out


def test_compose_config_is_valid(compose_bin: str) -> None:
    res = _compose(compose_bin, "--quiet")
    assert res.returncode == 0, res.stderr


def test_redis_uses_append_only_file(config: dict) -> None:
    cmd = _command(config["services"]["redis"])
    assert "--appendonly" in cmd
    assert cmd[cmd.index("--appendonly") + 1] == "yes"


def test_worker_reserves_a_gpu(config: dict) -> None:
    devices = config["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) and int(d.get("count", 0)) >= 1
        for d in devices
    ), devices


def test_worker_command(config: dict) -> None:
    assert _command(config["services"]["worker"]) == ["python", "-m", "worker"]


def test_api_and_worker_share_data_volume(config: dict) -> None:
    api = _mounts(config["services"]["api"]).get("/data")
    worker = _mounts(config["services"]["worker"]).get("/data")
    assert api and api == worker, (api, worker)
    # A named volume (declared at top level), not a bind mount of some host path.
    assert api in config.get("volumes", {}), config.get("volumes")


def test_api_and_worker_share_environment(config: dict) -> None:
    api_env = config["services"]["api"]["environment"]
    assert api_env == config["services"]["worker"]["environment"]
    assert api_env["DATA_DIR"] == "/data"
    assert api_env["REDIS_URL"] == "redis://redis:6379/0"
    # Unset on purpose: the app falls back to SQLite under DATA_DIR.
    assert "DATABASE_URL" not in api_env


CLUSTER = ("ray-head", "ray-node", "cluster-api", "cluster-worker")


def test_the_default_stack_has_no_cluster_settings(config: dict) -> None:
    api_env = config["services"]["api"]["environment"]
    assert not {"RAY_ADDRESS", "STORAGE_URL", "DATABASE_URL"} & set(api_env)


def test_the_cluster_profile_shares_one_environment_with_ray_postgres_and_the_bucket(config: dict) -> None:
    services = config["services"]
    envs = [services[name]["environment"] for name in CLUSTER]
    assert all(env == envs[0] for env in envs), envs
    env = envs[0]
    assert env["RAY_ADDRESS"] == "ray-head:6379"
    assert env["STORAGE_URL"].startswith("s3://") and env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert env["DATABASE_URL"].startswith("postgresql+psycopg://") and "@postgres:5432/" in env["DATABASE_URL"]
    for name in CLUSTER:
        assert services[name]["build"]["args"]["EXTRAS"] == "gpu,trackers,postgres,s3,ray", name
    assert _command(services["cluster-worker"]) == ["python", "-m", "worker"]
    assert _command(services["ray-head"])[:3] == ["ray", "start", "--head"]
    devices = services["ray-node"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices
