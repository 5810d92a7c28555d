"""per_device_train_batch_size "auto": the planner's candidates (the same effective batch, what fits
the card), the refusals, and a job that times them and trains with the one it chose."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from core.planner import GIB, auto_micro_batches, plan_memory, shape_from_config, with_micro_batch
from core.spec import Hyperparameters
from tests.builders import LLAMA_3_1_8B
from tests.conftest import Env, job_spec, run_to_end
from tests.test_planner import config_only_model


def test_the_planner_proposes_the_largest_micro_batches_that_fit_with_the_same_effective_batch() -> None:
    shape = shape_from_config(dict(LLAMA_3_1_8B))
    recipe = Hyperparameters(per_device_train_batch_size="auto", gradient_accumulation_steps=64)
    assert recipe.micro_batch == 2 and recipe.sequences_per_step == 128
    # An 80 GiB card holds micro-batch 16 of 4096 tokens (planned 18), not 32.
    assert auto_micro_batches(shape, recipe, 80 * GIB) == [16, 8, 4]
    assert plan_memory(shape, with_micro_batch(recipe, 16), 80 * GIB).verdict == "fits"
    assert plan_memory(shape, with_micro_batch(recipe, 32), 80 * GIB).verdict != "fits"
    chosen = with_micro_batch(recipe, 16)
    assert (chosen.per_device_train_batch_size, chosen.gradient_accumulation_steps) == (16, 8)
    # Only sizes that divide the effective batch: 2 x 3 = 6 sequences a step.
    assert auto_micro_batches(
        shape, Hyperparameters(per_device_train_batch_size="auto", gradient_accumulation_steps=3), 80 * GIB
    ) == [2, 1]
    # No card known: the largest that divide it, up to 64.
    assert auto_micro_batches(shape, recipe, None) == [64, 32, 16]
    # Nothing fits a 24 GiB card: 1, and the plan says why.
    assert auto_micro_batches(shape, recipe, 24 * GIB) == [1]


def test_auto_is_for_sft_on_one_gpu_and_the_estimate_names_the_candidates(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    auto = job_spec(tiny_model, chat_dataset, per_device_train_batch_size="auto")
    dpo = client.post("/jobs", json={**auto, "method": "dpo"})
    assert dpo.status_code == 422
    assert dpo.json()["errors"] == [
        {
            "field": "hyperparameters.per_device_train_batch_size",
            "message": '"auto" is for method sft on one GPU (this job: method dpo, gpus 1); give a number',
        }
    ]
    two = client.post("/jobs", json={**auto, "gpus": 2})
    assert two.status_code == 422 and "(this job: method sft, gpus 2)" in two.text

    eight_b = config_only_model(tiny_model.parent / "llama-8b-config", LLAMA_3_1_8B)
    spec = job_spec(
        eight_b, chat_dataset, per_device_train_batch_size="auto", gradient_accumulation_steps=64, max_seq_length=4096
    )
    body = client.post("/jobs/estimate", json={**spec, "gpu_memory_bytes": 80 * GIB}).json()
    assert body["auto_micro_batch"] == {"candidates": [16, 8, 4], "sequences_per_step": 128}
    at_16 = job_spec(
        eight_b, chat_dataset, per_device_train_batch_size=16, gradient_accumulation_steps=8, max_seq_length=4096
    )
    planned = client.post("/jobs/estimate", json={**at_16, "gpu_memory_bytes": 80 * GIB}).json()
    assert body["memory"]["total_bytes"] == planned["memory"]["total_bytes"]
    assert body["time"] == planned["time"]
    stored = client.post("/jobs", json=job_spec(tiny_model, chat_dataset, per_device_train_batch_size="auto")).json()
    assert stored["spec"]["hyperparameters"]["per_device_train_batch_size"] == "auto"


@pytest.mark.slow
def test_auto_job_times_the_candidates_and_trains_with_the_fastest(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    # The effective batch: the recipe's micro-batch 2 x accumulation 2 = 4 sequences a step.
    record = run_to_end(client, job_spec(tiny_model, chat_dataset, per_device_train_batch_size="auto"))
    assert record["status"] == "succeeded", record["error"]
    hp = record["spec"]["hyperparameters"]
    micro, accumulation = hp["per_device_train_batch_size"], hp["gradient_accumulation_steps"]
    assert micro in (4, 2, 1) and micro * accumulation == 4  # the stored spec shows the sizes that ran
    events = client.get(f"/jobs/{record['id']}/events").json()["items"]
    (chosen,) = [e["message"] for e in events if e["kind"] == "micro_batch_chosen"]
    assert chosen.startswith(
        f'per_device_train_batch_size "auto" chose {micro} x {accumulation} (micro-batch x accumulation; 4 sequences '
        "per step, as given) of the planner's candidates 4, 2, 1, timed on full 64-token sequences: 4: "
    )
    assert chosen.count(" tokens/s") == 3
    assert record["placement"]["effective_batch"] == 4
    assert record["progress"]["step"] == 6
