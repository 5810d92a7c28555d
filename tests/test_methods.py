"""Preference and reward methods, trained end to end on the CPU with the tiny model: each job
succeeds on TRL's trainer of its method, logs that method's metrics in its step logs, record and
events, and leaves a final model that loads and generates; a DPO run's reward margin grows on an
easy preference set and a GRPO run's reward rises on an exact-match task; a DPO job paused and
resumed trains exactly as one that was not; a GRPO job cancelled while it generates ends cancelled."""

from __future__ import annotations

import math
from pathlib import Path
from statistics import mean
from typing import Any

import httpx
import pytest

from tests.builders import preference_rows, reachable_answer_rows, unpaired_rows, write_jsonl
from tests.conftest import Env, Service, job_spec, run_to_end, trainer_pids, wait_for_status, wait_until

pytestmark = pytest.mark.slow
FINISHED = {"succeeded", "failed", "cancelled"}


# The GRPO tests' grader: 1 for a completion that is exactly the row's answer.
EXACT_ANSWER = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "eq",
}


def method_spec(model: Path, dataset: Path, method: str, **hyperparameters: Any) -> dict[str, Any]:
    spec = job_spec(model, dataset, **hyperparameters)
    spec["method"] = method
    return spec


def step_logs(http: httpx.Client, job_id: int) -> list[dict[str, Any]]:
    rows = list(http.get(f"/jobs/{job_id}/logs", params={"limit": 5000}).json()["items"])
    steps = [row["step"] for row in rows]
    assert steps == sorted(set(steps)), f"a step was logged twice: {steps}"
    return rows


def series(rows: list[dict[str, Any]], name: str) -> list[float]:
    return [row["method_metrics"][name] for row in rows if (row["method_metrics"] or {}).get(name) is not None]


def rises(values: list[float], k: int, by: float) -> bool:
    """The mean of the last k values exceeds the first k's by `by`: a trend, not one lucky step."""
    return len(values) >= 2 * k and mean(values[-k:]) > mean(values[:k]) + by


def final_model_generates(data_dir: Path, job_id: int) -> str:
    """The final checkpoint loads with transformers as it is and generates."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = data_dir / "jobs" / str(job_id) / "checkpoints" / "final"
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    inputs = tokenizer("the cat", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] > inputs["input_ids"].shape[1]
    return str(tokenizer.decode(output[0]))


def test_grpo_job_learns_an_exact_answer_and_logs_reward_kl_and_lengths(
    client: httpx.Client, env: Env, tiny_model: Path
) -> None:
    rows = reachable_answer_rows(tiny_model, 16)
    dataset = write_jsonl(env.datasets_dir / "answers.jsonl", rows)
    spec = method_spec(
        tiny_model,
        dataset,
        "grpo",
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        max_steps=16,
        logging_steps=1,
        save_steps=8,
        learning_rate=1e-2,
        num_generations=8,
        max_completion_length=1,
        top_k=4,
        beta=0.04,
    )
    spec["grader"] = dict(EXACT_ANSWER)
    record = run_to_end(client, spec)
    assert record["status"] == "succeeded", record["error"]
    assert record["trainer"] == {
        "method": "grpo",
        "trainer_class": "GRPOTrainer",
        "path": "trl",
        "reference": "model",
        "precision": "fp32",
    }
    report = record["data_report"]
    assert (report["rows"], report["row_format"], report["sequences_per_epoch"]) == (16, "prompt_only", 128)
    logs = step_logs(client, record["id"])
    assert [row["step"] for row in logs] == list(range(1, 17))
    rewards = series(logs, "reward")
    assert rises(rewards, 4, 0.15), rewards
    assert all(name in logs[-1]["method_metrics"] for name in ("reward_std", "kl", "completions/mean_length"))
    assert logs[-1]["method_metrics"]["completions/mean_length"] == 1
    assert series(logs, "rewards/exact/mean") == rewards  # the grader's own, under its name
    assert all(row["tokens_per_second"] for row in logs[1:])
    assert record["metrics"]["method_metrics"]["reward"] == rewards[-1]
    final_model_generates(env.data_dir, record["id"])


STEPS = 100


def test_dpo_job_widens_its_margin_and_trains_alike_when_paused_and_resumed(
    service: Service, env: Env, tiny_model: Path
) -> None:
    """The uninterrupted job shows the metrics, the margin growing and the final model; the paused
    one (the fault that matters here) resumes at the checkpoint its pause saved and logs the same
    loss, learning rate and rewards at every step, each step once."""
    http = service.http()
    rows = preference_rows(128)
    rows.insert(5, {**rows[5], "rejected": rows[5]["chosen"]})  # a pair that teaches nothing: flagged, skipped
    dataset = write_jsonl(env.datasets_dir / "pairs.jsonl", rows)
    spec = method_spec(
        tiny_model,
        dataset,
        "dpo",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        max_steps=STEPS,
        logging_steps=1,
        save_steps=1000,
        seed=7,
        beta=0.1,
    )
    submitted = http.post("/jobs", json=spec)
    assert submitted.status_code == 201, submitted.text
    report = submitted.json()["data_report"]
    assert (report["rows"], report["row_format"], report["pairs"], report["identical_pairs"]) == (
        129,
        "preference",
        128,
        1,
    )
    assert report["bad_row_examples"] == ["line 6: 'chosen' and 'rejected' are the same, so the pair teaches nothing"]
    reference = submitted.json()["id"]
    record = wait_for_status(http, reference, FINISHED)
    assert record["status"] == "succeeded", record["error"]
    assert record["spec"]["hyperparameters"]["loss_type"] == "sigmoid"  # TRL's default, filled in
    assert record["trainer"] == {
        "method": "dpo",
        "trainer_class": "DPOTrainer",
        "path": "trl",
        "reference": "model",
        "precision": "fp32",
    }
    logs = step_logs(http, reference)
    margins = series(logs, "rewards/margins")
    assert len(margins) == STEPS and rises(margins, 10, 0.2), margins
    assert mean(series(logs, "rewards/accuracies")[-10:]) > 0.9
    own = record["metrics"]["method_metrics"]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(own)
    assert record["data_report"]["sequences_per_epoch"] == 128
    final_model_generates(env.data_dir, reference)

    job_id = http.post("/jobs", json=spec).json()["id"]
    wait_until(lambda: http.get(f"/jobs/{job_id}").json()["progress"]["step"] >= 3, 120, "training to start")
    assert http.post(f"/jobs/{job_id}/pause").status_code == 200
    paused = wait_for_status(http, job_id, {"paused", *FINISHED}, timeout_s=60)
    assert paused["status"] == "paused", paused["error"]
    paused_at = paused["progress"]["step"]
    assert 3 <= paused_at < STEPS
    assert trainer_pids(env.data_dir, job_id) == []
    assert http.post(f"/jobs/{job_id}/resume").json()["status"] == "queued"
    resumed = wait_for_status(http, job_id, FINISHED)
    assert resumed["status"] == "succeeded", resumed["error"]
    kinds = [e["kind"] for e in http.get(f"/jobs/{job_id}/events").json()["items"]]
    assert "resumed" in kinds

    expected, got = step_logs(http, reference), step_logs(http, job_id)
    assert [row["step"] for row in got] == [row["step"] for row in expected] == list(range(1, STEPS + 1))
    for before, after in zip(expected, got, strict=True):
        assert math.isclose(after["loss"], before["loss"], rel_tol=1e-5), (after["step"], after, before)
        assert math.isclose(after["learning_rate"], before["learning_rate"], rel_tol=1e-9)
        for name in ("rewards/margins", "rewards/chosen", "rewards/accuracies"):
            assert math.isclose(
                after["method_metrics"][name], before["method_metrics"][name], rel_tol=1e-4, abs_tol=1e-6
            ), (after["step"], name)


def test_orpo_and_kto_jobs_train_on_plain_pairs_and_unpaired_rows(
    client: httpx.Client, env: Env, tiny_model: Path
) -> None:
    pairs = write_jsonl(env.datasets_dir / "plain-pairs.jsonl", preference_rows(32, chat=False))
    orpo = run_to_end(client, method_spec(tiny_model, pairs, "orpo", max_steps=4, logging_steps=2, save_steps=3))
    assert orpo["status"] == "succeeded", orpo["error"]
    assert orpo["trainer"] == {
        "method": "orpo",
        "trainer_class": "ORPOTrainer",
        "path": "trl",
        "reference": None,
        "precision": "fp32",
    }
    assert {"log_odds_ratio", "nll_loss", "rewards/margins"} <= set(orpo["metrics"]["method_metrics"])
    names = [c["name"] for c in client.get(f"/jobs/{orpo['id']}/checkpoints").json()["items"]]
    assert names == ["checkpoint-3", "final"]
    assert all(row["tokens_per_second"] for row in step_logs(client, orpo["id"])[1:])

    unpaired = write_jsonl(env.datasets_dir / "unpaired.jsonl", unpaired_rows(32))
    kto = run_to_end(client, method_spec(tiny_model, unpaired, "kto", max_steps=4, logging_steps=2, save_steps=100))
    assert kto["status"] == "succeeded", kto["error"]
    assert kto["trainer"]["trainer_class"] == "KTOTrainer" and kto["trainer"]["reference"] == "model"
    report = kto["data_report"]
    assert (report["row_format"], report["desirable_rows"], report["undesirable_rows"]) == (
        "unpaired_preference",
        16,
        16,
    )
    assert {"kl", "rewards/chosen", "rewards/rejected"} <= set(kto["metrics"]["method_metrics"])
    final_model_generates(env.data_dir, kto["id"])


def test_a_grpo_job_cancelled_while_it_generates_ends_cancelled_in_seconds(
    service: Service, env: Env, tiny_model: Path
) -> None:
    """A GRPO step spends most of its time generating, outside the training loop's own checks: a
    cancel still ends the job within the grace period, the trainer is gone, and it is never queued
    again."""
    http = service.http()
    dataset = write_jsonl(env.datasets_dir / "answers.jsonl", reachable_answer_rows(tiny_model, 16))
    spec = method_spec(
        tiny_model,
        dataset,
        "grpo",
        per_device_train_batch_size=8,
        max_steps=2000,
        logging_steps=1,
        save_steps=1000,
        num_generations=8,
        max_completion_length=16,
    )
    spec["grader"] = dict(EXACT_ANSWER)
    submitted = http.post("/jobs", json=spec)
    assert submitted.status_code == 201, submitted.text
    job_id = submitted.json()["id"]
    wait_until(lambda: http.get(f"/jobs/{job_id}").json()["progress"]["step"] >= 2, 120, "training to start")
    assert http.post(f"/jobs/{job_id}/cancel").status_code == 200
    # Within the worker's grace period and the kill after it, on a loaded machine too.
    record = wait_for_status(http, job_id, {*FINISHED, "paused"}, timeout_s=60)
    assert record["status"] == "cancelled", record["error"]
    assert record["progress"]["step"] < 2000
    assert trainer_pids(env.data_dir, job_id) == []
    kinds = [e["kind"] for e in http.get(f"/jobs/{job_id}/events").json()["items"]]
    assert "requeued" not in kinds, kinds
