"""Jobs on several GPUs, on the CPU: two trainer ranks joined by gloo train the tiny model through
the same DDP code path as a GPU job (a worker started with a GPU list fakes the host's cards)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from scripts.service_harness import kill, trainer_rank
from tests.conftest import Env, Service, job_spec, process_tree, trainer_pids, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def two_gpu_service(env: Env, tmp_path: Path) -> Service:
    running = Service(tmp_path / "service", data_dir=env.data_dir, redis_url=env.redis_url, settings=env.vars)
    try:
        running.start(WORKER_GPUS="0,1")
        yield running
    finally:
        running.stop()
        print(running.logs())


def ddp_spec(model: Path, dataset: Path, **hyperparameters: object) -> dict[str, object]:
    return {**job_spec(model, dataset, **hyperparameters), "gpus": 2, "strategy": "ddp"}


def test_a_two_rank_job_trains_logs_once_and_saves_one_loadable_final(
    two_gpu_service: Service, tiny_model: Path, chat_dataset: Path
) -> None:
    service = two_gpu_service
    # The fork server forks each rank once it is up (a job that comes before starts its own processes).
    wait_until(lambda: os.path.exists(service.env["TRAINER_FORKSERVER"]), 120, "the trainer fork server")
    job_id = service.submit(ddp_spec(tiny_model, chat_dataset))
    record = service.wait_for(job_id, {"succeeded", "failed", "cancelled"}, timeout_s=240)
    assert record["status"] == "succeeded", record["error"]
    placement = record["placement"]
    assert placement["world_size"] == 2 and placement["strategy"] == "ddp"
    assert [g["index"] for g in placement["gpus"]] == [0, 1]
    assert placement["effective_batch"] == 2 * 2 * 2  # micro-batch x accumulation x GPUs
    assert placement["fsdp_layout"] is None  # a layout is FSDP's alone

    with service.http() as http:
        steps = [row["step"] for row in http.get(f"/jobs/{job_id}/logs").json()["items"]]
        checkpoints = {c["name"] for c in http.get(f"/jobs/{job_id}/checkpoints").json()["items"]}
    assert steps == [2, 4, 6]  # rank 0 alone logs: each step once
    assert checkpoints == {"checkpoint-3", "checkpoint-6", "final"}
    assert record["metrics"]["tokens_per_second"] is not None

    job_dir = service.job_dir(job_id)
    # Each rank forked by the tests' trainer fork server (TRAINER_FORKSERVER), each writing its own log.
    for log in ("trainer.log", "trainer-rank1.log"):
        assert "from the fork server" in (job_dir / log).read_text()
    assert {p.name for p in (job_dir / "checkpoints" / "checkpoint-3").glob("rng_state_*.pth")} == {
        "rng_state_0.pth",
        "rng_state_1.pth",
    }
    final = job_dir / "checkpoints" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    generated = model.generate(**tokenizer("hello", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > 1
    assert trainer_pids(service.data_dir, job_id) == []


def wait_for_two_ranks(service: Service, job_id: int) -> dict[int, int]:
    """rank -> pid, once both ranks train."""
    service.wait_for_step(job_id, 2)
    ranks = {trainer_rank(pid): pid for pid in trainer_pids(service.data_dir, job_id)}
    assert set(ranks) == {0, 1}, ranks
    return {rank: pid for rank, pid in ranks.items() if rank is not None}


def test_a_cancel_stops_every_rank(two_gpu_service: Service, tiny_model: Path, chat_dataset: Path) -> None:
    service = two_gpu_service
    job_id = service.submit(ddp_spec(tiny_model, chat_dataset, max_steps=2000, logging_steps=1, save_steps=5000))
    wait_for_two_ranks(service, job_id)
    with service.http() as http:
        assert http.post(f"/jobs/{job_id}/cancel").status_code == 200
    record = service.wait_for(job_id, {"cancelled", "failed", "succeeded"}, timeout_s=120)
    assert record["status"] == "cancelled", record["error"]
    assert record["progress"]["step"] < 2000
    wait_until(lambda: not trainer_pids(service.data_dir, job_id), 30, "both ranks to end")


def test_a_rank_that_dies_fails_the_job_by_name_and_leaves_no_process(
    two_gpu_service: Service, tiny_model: Path, chat_dataset: Path
) -> None:
    service = two_gpu_service
    job_id = service.submit(ddp_spec(tiny_model, chat_dataset, max_steps=2000, logging_steps=1, save_steps=5000))
    ranks = wait_for_two_ranks(service, job_id)
    os.kill(ranks[1], signal.SIGKILL)
    record = service.wait_for(job_id, {"cancelled", "failed", "succeeded"}, timeout_s=120)
    assert record["status"] == "failed"
    assert record["error"]["code"] == "trainer_crashed"
    message = record["error"]["message"]
    assert message.startswith("Rank 1 of 2 was killed by SIGKILL; the other ranks were stopped."), message
    assert "trainer-rank1.log" in message
    wait_until(lambda: not trainer_pids(service.data_dir, job_id), 30, "rank 0 to end too")
    horse_and_children = [p for w in service.workers for p in process_tree(w.pid)]
    assert ranks[0] not in horse_and_children and ranks[1] not in horse_and_children


def test_more_gpus_than_any_host_has_is_refused_at_submit(
    two_gpu_service: Service, tiny_model: Path, chat_dataset: Path
) -> None:
    with two_gpu_service.http() as http:
        response = http.post("/jobs", json={**ddp_spec(tiny_model, chat_dataset), "gpus": 3})
    assert response.status_code == 422
    assert "asks for 3 GPUs of one host and the largest host has 2" in response.json()["detail"]


def started_after_finished(later: dict[str, object], earlier: dict[str, object]) -> bool:
    return str(later["started_at"]) >= str(earlier["finished_at"])


def test_two_workers_share_the_hosts_gpus_without_starving_a_big_job(
    env: Env, tmp_path: Path, tiny_model: Path, chat_dataset: Path
) -> None:
    settings = {**env.vars, "GPU_WAIT_POLL_S": "0.5"}
    service = Service(tmp_path / "service", data_dir=env.data_dir, redis_url=env.redis_url, settings=settings)
    try:
        service.start(WORKER_GPUS="0,1")
        service.start_worker(WORKER_GPUS="0,1")
        long_run = {"max_steps": 5000, "logging_steps": 1, "save_steps": 10000}
        # Two one-GPU jobs run at once, each on a card of its own.
        first = service.submit(job_spec(tiny_model, chat_dataset, **long_run))
        second = service.submit(job_spec(tiny_model, chat_dataset, **long_run))
        service.wait_for_step(first, 1)
        service.wait_for_step(second, 1)
        cards = {job: [g["index"] for g in service.job(job)["placement"]["gpus"]] for job in (first, second)}
        assert sorted(cards.values()) == [[0], [1]], cards
        with service.http() as http:
            http.post(f"/jobs/{second}/cancel")
        service.wait_for(second, {"cancelled"})

        # A two-GPU job waits for the card the first job holds; a one-GPU job that comes after it
        # waits behind it, although a card is free before the two-GPU job can start.
        big = service.submit(ddp_spec(tiny_model, chat_dataset))
        wait_until(lambda: "waiting_for_gpus" in dict(service.events(big)), 60, "the big job to wait")
        small = service.submit(job_spec(tiny_model, chat_dataset))
        with service.http() as http:
            http.post(f"/jobs/{first}/cancel")
        records = {job: service.wait_for(job, {"succeeded", "failed"}, timeout_s=240) for job in (big, small)}
        assert [records[job]["status"] for job in (big, small)] == ["succeeded", "succeeded"]
        assert started_after_finished(records[small], records[big])
        assert "waiting_for_gpus" in dict(service.events(small))
        first_record = service.job(first)
        assert first_record["status"] == "cancelled"
        assert started_after_finished(records[big], first_record)
    finally:
        service.stop()
        print(service.logs())


def test_an_fsdp_job_without_cuda_fails_early_saying_what_to_do(
    two_gpu_service: Service, tiny_model: Path, chat_dataset: Path
) -> None:
    # accelerate shards only across accelerator devices: FSDP itself is measured on the GPU
    # machine (scripts/gpu_multi.py); here the job must fail at once, in words, on every rank.
    service = two_gpu_service
    job_id = service.submit({**ddp_spec(tiny_model, chat_dataset), "strategy": "fsdp"})
    record = service.wait_for(job_id, {"succeeded", "failed", "cancelled"}, timeout_s=240)
    assert record["status"] == "failed"
    assert record["placement"]["fsdp_layout"] == "sharded"  # planned by the worker; cards of unknown size: lean
    assert record["error"]["code"] == "gpu_unavailable"
    assert "strategy 'fsdp' needs CUDA GPUs" in record["error"]["message"]
    assert "strategy 'ddp'" in record["error"]["message"]
    wait_until(lambda: not trainer_pids(service.data_dir, job_id), 30, "both ranks to end")


def test_a_two_rank_job_of_a_lost_worker_resumes_on_the_same_gpus(
    two_gpu_service: Service, tiny_model: Path, chat_dataset: Path
) -> None:
    service = two_gpu_service
    spec = ddp_spec(tiny_model, chat_dataset, max_steps=40, logging_steps=1, save_steps=5, save_total_limit=2)
    job_id = service.submit(spec)
    service.wait_for_step(job_id, 7)
    # The host loses the worker, its work horse and both ranks at once. Its lease on the two
    # GPUs stays in Redis until it lapses; the job's next attempt takes its own cards back.
    kill(process_tree(service.worker.pid))
    service.worker.wait(10)
    service.start_worker(WORKER_GPUS="0,1")
    record = service.wait_for(job_id, {"succeeded", "failed", "cancelled"}, timeout_s=240)
    assert record["status"] == "succeeded", record["error"]
    assert record["attempts"] == 2 and record["placement"]["world_size"] == 2
    kinds = [kind for kind, _message in service.events(job_id)]
    assert "retried" in kinds and "resumed" in kinds
    with service.http() as http:
        steps = [row["step"] for row in http.get(f"/jobs/{job_id}/logs", params={"limit": 5000}).json()["items"]]
    assert steps == list(range(1, 41))
