"""Preference and reward methods, trained end to end on the CPU with the tiny model: each job
succeeds on TRL's trainer of its method, logs that method's metrics in its step logs, record and
events, and leaves a final model that loads and generates; a DPO run's reward margin grows on an
easy preference set and a GRPO run's reward rises on an exact-match task; a DPO job paused and
resumed trains exactly as one that was not."""

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
    spec["grader"] = {
        "type": "string_check",
        "name": "exact",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}",
        "operation": "eq",
    }
    record = run_to_end(client, spec)
    assert record["status"] == "succeeded", record["error"]
    assert record["trainer"] == {"method": "grpo", "trainer_class": "GRPOTrainer", "path": "trl", "reference": "model"}
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
