"""The trainer runs user data and third-party code: its environment (`/proc/<pid>/environ`, which
any code in it can read) holds what it needs and none of the service's secrets, on every path a
trainer starts by: a trainer started for its job, the worker's standby, each rank of a job on
several GPUs."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import job_spec, process_tree, trainer_pids, wait_until
from tests.faults.conftest import Cluster, kill

pytestmark = pytest.mark.slow

TOKEN = "api-token-the-trainer-must-not-see"
SECRETS = {
    "API_TOKENS": TOKEN,
    "WEBHOOK_SECRET": "whsec_dGhlIHRyYWluZXIgbXVzdCBub3Qgc2VlIHRoaXM=",
    "OPERATORS_OWN_SECRET": "some-cloud-key-the-trainer-must-not-see",
}


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    assert not any(secret.encode() in raw for secret in SECRETS.values()), f"a secret in the environment of {pid}"
    pairs = (item.decode().partition("=") for item in raw.split(b"\0") if item)
    return {name: value for name, _, value in pairs}


def assert_needs_only(pid: int, cluster: Cluster) -> None:
    env = environ(pid)
    leaked = sorted(set(env) & {*SECRETS, "REDIS_URL", "WEBHOOK_ALLOWED_HOSTS", "TRAINER_ENV_PASSTHROUGH"})
    assert leaked == [], f"trainer {pid} has {leaked}"
    # What it needs is all there: its settings, the Hub's (offline here), Python's, and what the
    # operator passes on (TRAINER_ENV_PASSTHROUGH).
    assert env["DATA_DIR"] == str(cluster.data_dir.resolve())
    assert env["DATABASE_URL"].startswith("sqlite:///")
    assert env["HF_HUB_OFFLINE"] == "1" and env["PATH"] and env["PYTHONPATH"]
    assert env["OPERATORS_WANDB_KEY"] == "passed-on-by-the-operator"


def standby_pid(cluster: Cluster) -> int | None:
    for pid in process_tree(cluster.worker.pid):
        try:
            if b"--standby" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                return pid
        except OSError:
            continue
    return None


def test_no_trainer_sees_the_services_secrets_on_any_start_path(cluster: Cluster, tiny_model: Path) -> None:
    cluster.env.update(SECRETS, OPERATORS_WANDB_KEY="passed-on-by-the-operator")
    cluster.env["TRAINER_ENV_PASSTHROUGH"] = "OPERATORS_WANDB_*"
    # Processes of their own, whose /proc environ is theirs (a forked trainer's shows the fork
    # server's: tests/test_forkserver.py checks what the fork gives it).
    cluster.env["TRAINER_FORKSERVER"] = ""
    cluster.start_redis()
    cluster.migrate()
    cluster.start_api()
    http = httpx.Client(base_url=cluster.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    cluster.clients.append(http)

    # The standby: started with the worker, before any job.
    cluster.start_worker(TRAINER_STANDBY="1")
    assert_needs_only(wait_until(lambda: standby_pid(cluster), 60, "the worker's standby trainer"), cluster)
    cluster.stop_workers()

    # A trainer started for its job, then both ranks of a job on two (pretended) GPUs.
    cluster.start_worker(WORKER_GPUS="0,1")
    spec = job_spec(tiny_model, cluster.chat_dataset(), max_steps=100_000, save_steps=100_000)
    for gpus in (1, 2):
        response = http.post("/jobs", json={**spec, "gpus": gpus, "strategy": "ddp" if gpus > 1 else "auto"})
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]

        def started(job_id: int = job_id, gpus: int = gpus) -> list[int] | None:
            found = trainer_pids(cluster.data_dir, job_id)
            return found if len(found) == gpus else None

        pids = wait_until(started, 120, f"the {gpus} trainer(s) of job {job_id}")
        for pid in pids:
            assert_needs_only(pid, cluster)
        kill(pids)

        def ended(job_id: int = job_id) -> bool:
            return bool(http.get(f"/jobs/{job_id}").json()["status"] == "failed")

        wait_until(ended, 60, f"job {job_id} to fail once its trainers are killed")
