"""Jobs placed by Ray (RAY_ADDRESS, worker/ray_placement.py) on a Ray cluster of real processes on
this machine: a head and a second node started with `ray start`, one CPU each, so that a job of
two ranks can only be placed across both nodes, where its ranks join with gloo. One cluster for
each group of the module's tests, in one test process (tests/conftest.py: ONE_PROCESS_GROUPS):
starting one takes about 15 s of the 2-core machine. The ranks' trainers are forked by this host's
trainer fork server (TRAINER_FORKSERVER), as on any host without GPUs, except in the test that
starts them as processes of their own (what a GPU node does)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from scripts.service_harness import (
    ROOT,
    START_TIMEOUT_S,
    free_port,
    process_tree,
    trainer_pids,
    trainer_rank,
    unmeasured_environment,
    wait_until,
)
from tests.conftest import Env, Service, job_spec

NODE_OPTIONS = (
    "--num-cpus=1",
    "--object-store-memory=100000000",
    "--disable-usage-stats",
    "--node-ip-address=127.0.0.1",
)


@dataclass
class RayCluster:
    address: str
    temp_dir: Path
    env: dict[str, str]
    nodes: list[str] = field(default_factory=list)

    def ray(self, *args: str) -> subprocess.CompletedProcess[str]:
        binary = shutil.which("ray")
        assert binary is not None, "ray is not installed (the ray extra, in dev)"
        return subprocess.run([binary, *args], env=self.env, capture_output=True, text=True, timeout=120, check=False)

    def add_node(self, name: str) -> None:
        started = self.ray("start", f"--address={self.address}", f"--resources={json.dumps({name: 1})}", *NODE_OPTIONS)
        assert started.returncode == 0, started.stdout + started.stderr
        self.nodes.append(name)

    def head_node_id(self) -> str:
        """The head node's id (the cluster's own processes run there: it is never the one killed)."""
        script = (
            f"import ray; ray.init(address='{self.address}'); "
            "print(next(n['NodeID'] for n in ray.nodes() if n['Alive'] and 'node_a' in n['Resources']))"
        )
        done = subprocess.run(
            [sys.executable, "-c", script], env=self.env, capture_output=True, text=True, timeout=120, check=True
        )
        return done.stdout.strip().splitlines()[-1]

    def processes(self) -> list[int]:
        """Every process of this cluster: their command lines name its temp dir (or they descend
        from one that does)."""
        roots = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if str(self.temp_dir).encode() in (entry / "cmdline").read_bytes():
                        roots.append(int(entry.name))
                except OSError:
                    continue
        return sorted({pid for root in roots for pid in process_tree(root)})

    def stop(self) -> None:
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    # A short path: Ray's Unix sockets live under it (at most 107 characters).
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    # Ray's own processes unmeasured: coverage would trace its agents and workers for the module's
    # life, and they end by SIGKILL, which saves nothing. The trainers Ray's workers start are
    # measured still: the worker passes them its COVERAGE_* variables (TRAINER_ENV_KEPT).
    env = {
        **unmeasured_environment(),
        "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))),
        "OMP_NUM_THREADS": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    port = free_port()
    cluster = RayCluster(f"127.0.0.1:{port}", temp_dir, env)
    try:
        head = cluster.ray(
            "start",
            "--head",
            f"--port={port}",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=false",
            f"--resources={json.dumps({'node_a': 1})}",
            *NODE_OPTIONS,
        )
        assert head.returncode == 0, head.stdout + head.stderr
        cluster.add_node("node_b")

        def two_nodes() -> bool:
            status = cluster.ray("status", f"--address={cluster.address}")
            return "node_a" in status.stdout and "node_b" in status.stdout

        wait_until(two_nodes, START_TIMEOUT_S, "both Ray nodes to join")
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def ray_service(env: Env, tmp_path: Path, ray_cluster: RayCluster) -> Iterator[Service]:
    settings = {
        **env.vars,
        "RAY_ADDRESS": ray_cluster.address,
        "RAY_PLACEMENT_STRATEGY": "STRICT_SPREAD",
        "STORAGE_URL": str(tmp_path / "shared"),
    }
    running = Service(tmp_path / "service", data_dir=env.data_dir, redis_url=env.redis_url, settings=settings)
    try:
        yield running.start()
    finally:
        running.stop()
        print(running.logs())


def test_the_embedded_default_never_imports_ray() -> None:
    """Without RAY_ADDRESS the API, the worker and its task module load no part of Ray."""
    code = (
        "import sys, app.main, worker.__main__, worker.tasks, core.shared_store; "
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
def test_a_two_rank_job_is_placed_by_ray_across_two_nodes_and_trains_with_gloo(
    ray_service: Service, tiny_model: Path, chat_dataset: Path
) -> None:
    service = ray_service
    job_id = service.submit({**job_spec(tiny_model, chat_dataset), "gpus": 2, "strategy": "ddp"})
    record = service.wait_for(job_id, timeout_s=300)
    assert record["status"] == "succeeded", record["error"]
    with service.http() as http:
        events = http.get(f"/jobs/{job_id}/events").json()["items"]
        steps = [row["step"] for row in http.get(f"/jobs/{job_id}/logs").json()["items"]]
        checkpoints = {c["name"] for c in http.get(f"/jobs/{job_id}/checkpoints").json()["items"]}
    placed = [e["message"] for e in events if e["kind"] == "placed"]
    assert len(placed) == 1 and placed[0].startswith("placed by Ray: rank 0 on ")
    nodes = record["placement"]["ranks"]
    assert [r["rank"] for r in nodes] == [0, 1]
    assert nodes[0]["node_id"] != nodes[1]["node_id"]  # one rank on each node: gloo across them
    assert steps == [2, 4, 6]  # rank 0 alone logs: each step once
    assert checkpoints == {"checkpoint-3", "checkpoint-6", "final"}
    assert (service.job_dir(job_id) / "trainer-rank1.log").is_file()
    shared = Path(service.env["STORAGE_URL"]) / "jobs" / str(job_id) / "checkpoints"
    assert {p.name for p in shared.glob("*.manifest.json")} == {
        "checkpoint-3.manifest.json",
        "checkpoint-6.manifest.json",
        "final.manifest.json",
    }


@pytest.mark.slow  # it starts the service; and it must run before the head-lost test, last of the slow ones
def test_a_job_larger_than_the_whole_ray_cluster_is_refused_naming_its_size(
    ray_service: Service, ray_cluster: RayCluster, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    """The worker asks Ray for its alive nodes and records the room they have (one CPU a rank
    here, one rank a node under STRICT_SPREAD): a job with more ranks is a 422 at once, not a
    placement group that waits for ever."""
    from core.ray_capacity import read_capacity

    # A Ray driver of its own connects (seconds; a minute and more on a loaded 2-core machine).
    wait_until(lambda: read_capacity(env.redis()) is not None, 180, "the cluster's capacity")
    capacity = read_capacity(env.redis())
    assert capacity is not None and capacity.address == ray_cluster.address
    most = capacity.most_ranks
    assert most >= 2 and capacity.unit == "CPU"  # node_a, node_b (and node_c once the kill test added it)
    with ray_service.http() as http:
        refused = http.post("/jobs", json={**job_spec(tiny_model, chat_dataset), "gpus": most + 1, "strategy": "ddp"})
        assert refused.status_code == 422, refused.text
        assert (
            f"gpus: the job asks for {most + 1} ranks and the Ray cluster at {ray_cluster.address} has room for "
            f"{most} rank(s) at most under RAY_PLACEMENT_STRATEGY=STRICT_SPREAD, each taking 1 CPUs"
        ) in refused.text
        assert http.get("/jobs").json()["items"] == []  # nothing was queued


@pytest.mark.slow
def test_a_rank_lost_past_ray_max_failures_fails_the_job_naming_the_rank(
    env: Env, tmp_path: Path, ray_cluster: RayCluster, tiny_model: Path, chat_dataset: Path
) -> None:
    """RAY_MAX_FAILURES=0: the first rank Ray loses ends the job, failed, in words that name the rank
    and how it ended; Ray does not place it again and no trainer is left."""
    settings = {
        **env.vars,
        "RAY_ADDRESS": ray_cluster.address,
        "RAY_PLACEMENT_STRATEGY": "STRICT_SPREAD",
        "RAY_MAX_FAILURES": "0",
        "STORAGE_URL": str(tmp_path / "shared"),
        # Each rank's trainer a process its Ray worker starts, as on a GPU node (the other tests'
        # ranks are forked by this host's trainer fork server).
        "TRAINER_FORKSERVER": "",
    }
    service = Service(tmp_path / "service", data_dir=env.data_dir, redis_url=env.redis_url, settings=settings)
    try:
        service.start()
        spec = job_spec(tiny_model, chat_dataset, max_steps=100_000, logging_steps=1, save_steps=100_000)
        job_id = service.submit({**spec, "gpus": 2, "strategy": "ddp"})
        service.wait_for_step(job_id, 2)
        ranks = {trainer_rank(pid): pid for pid in trainer_pids(service.data_dir, job_id)}
        assert set(ranks) == {0, 1}, ranks
        os.kill(ranks[1], signal.SIGKILL)

        record = service.wait_for(job_id, timeout_s=180)
        assert (record["status"], record["error"]["code"]) == ("failed", "trainer_crashed"), record["error"]
        assert "Rank 1 of 2 (placed by Ray) was killed by SIGKILL" in record["error"]["message"]
        messages = [message for _kind, message in service.events(job_id)]
        assert not [m for m in messages if m.startswith("Ray restarted")], messages
        assert len([m for m in messages if m.startswith("placed by Ray")]) == 1, messages
        wait_until(lambda: trainer_pids(service.data_dir, job_id) == [], 60, "every rank's trainer to end")
    finally:
        service.stop()
        print(service.logs())


def node_processes(node_id: str) -> list[int]:
    """The processes of one Ray node: its raylet and agents (their command lines name the node's
    id) and what they started (the node's Ray workers, and the trainers those started)."""
    roots = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if node_id.encode() in (entry / "cmdline").read_bytes():
                    roots.append(int(entry.name))
            except OSError:
                continue
    return sorted({pid for root in roots for pid in process_tree(root)})


@pytest.mark.slow
def test_a_node_killed_mid_job_is_replaced_and_the_job_resumes_from_its_newest_published_checkpoint(
    ray_service: Service, ray_cluster: RayCluster, tiny_model: Path, chat_dataset: Path
) -> None:
    service = ray_service
    if "node_c" not in ray_cluster.nodes:  # a third node, for the ranks to move to
        ray_cluster.add_node("node_c")
    spec = job_spec(tiny_model, chat_dataset, max_steps=40, save_steps=5, logging_steps=1)
    job_id = service.submit({**spec, "gpus": 2, "strategy": "ddp"})
    shared = Path(service.env["STORAGE_URL"]) / "jobs" / str(job_id) / "checkpoints"
    wait_until(lambda: (shared / "checkpoint-5.manifest.json").exists(), 300, "checkpoint-5 to be published")
    ranks = service.job(job_id)["placement"]["ranks"]
    # Any node of the job but the head (the head holds the cluster itself).
    head = ray_cluster.head_node_id()
    victim = next(r for r in ranks if r["node_id"] != head)
    step_at_kill = service.job(job_id)["progress"]["step"]
    # The node's processes, and its rank's trainer: forked by this host's trainer fork server, it
    # descends from none of them (it would end on its own, its Ray worker gone: a node dies at once).
    trainer = [pid for pid in trainer_pids(service.data_dir, job_id) if trainer_rank(pid) == victim["rank"]]
    for pid in [*node_processes(victim["node_id"]), *trainer]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    record = service.wait_for(job_id, timeout_s=400)
    assert record["status"] == "succeeded", record["error"]
    with service.http() as http:
        events = http.get(f"/jobs/{job_id}/events").json()["items"]
        steps = [row["step"] for row in http.get(f"/jobs/{job_id}/logs", params={"limit": 100}).json()["items"]]
    messages = [e["message"] for e in events]
    restarts = [m for m in messages if m.startswith("Ray restarted the job's 2 ranks")]
    assert restarts, messages
    resumed = [m for m in messages if m.startswith("resuming from checkpoint-")]
    assert resumed, messages
    assert int(resumed[-1].split("checkpoint-")[1].split(",")[0]) >= 5
    # Placed, and placed again: on a loaded machine Ray may restart the group more than once (seen:
    # three placements), each time resuming as above; the steps below are still logged once each.
    assert len([m for m in messages if m.startswith("placed by Ray")]) >= 2, messages
    assert steps == list(range(1, 41)), f"step_at_kill {step_at_kill}: {steps}"  # each step once
    new_ranks = record["placement"]["ranks"]
    assert victim["node_id"] not in {r["node_id"] for r in new_ranks}


@pytest.mark.slow
def test_the_ray_head_lost_mid_job_ends_the_job_in_words_and_leaves_no_trainer(
    ray_service: Service, ray_cluster: RayCluster, tiny_model: Path, chat_dataset: Path
) -> None:
    """The whole cluster goes (its head and every node): the job is not left `running`; each attempt
    says the cluster was lost, and once MAX_ATTEMPTS are spent it fails `worker_lost`. Last of the
    module: it takes the module's cluster down."""
    service = ray_service
    spec = job_spec(tiny_model, chat_dataset, max_steps=100_000, logging_steps=1, save_steps=100_000)
    job_id = service.submit({**spec, "gpus": 2, "strategy": "ddp"})
    service.wait_for_step(job_id, 2)
    ray_cluster.stop()  # every process of the cluster, the head's among them

    record = service.wait_for(job_id, timeout_s=300)
    assert (record["status"], record["error"]["code"]) == ("failed", "worker_lost"), record["error"]
    messages = [message for _kind, message in service.events(job_id)]
    lost = [m for m in messages if f"the Ray cluster at RAY_ADDRESS={ray_cluster.address} was lost" in m]
    assert lost, messages
    wait_until(lambda: trainer_pids(service.data_dir, job_id) == [], 60, "every rank's trainer to end")
