"""The planner learns: a succeeded job's measured peak and tokens/s are kept beside its plan, and
POST /jobs/estimate corrects its figures with the closest measured jobs of the same shape."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from core.planner import GIB, plan_memory, shape_from_config
from core.spec import Hyperparameters
from tests.builders import LLAMA_3_1_8B
from tests.conftest import Env, job_spec, run_to_end
from tests.test_planner import config_only_model

CARD = 80 * GIB


def measurement(model: Path, **fields: object) -> int:
    """A measurement row as a finished job of the 8B shape on an 80 GiB card would leave it."""
    from core.db import session_scope
    from core.measurements import shape_key
    from core.models import PlannerMeasurement

    shape = shape_from_config(dict(LLAMA_3_1_8B))
    values: dict[str, object] = {
        "job_id": 1000,
        "model": str(model),
        "shape_key": shape_key(shape),
        "method": "sft",
        "optim": "paged_adamw_8bit",
        "precision": "auto",  # precision left at its default, as in estimate() below
        "gpus": 1,
        "strategy": "single",
        "card": "NVIDIA H100 80GB HBM3",
        "card_memory_bytes": 85_520_809_984,  # what NVML says of an H100 80GB: 0.4% under 80 GiB
        "micro_batch": 2,
        "gradient_accumulation_steps": 4,
        "max_seq_length": 4096,
        "steps": 20,
        "planned_tokens_per_second": 6_226.4,
        **fields,
    }
    hp = Hyperparameters(
        per_device_train_batch_size=int(str(values["micro_batch"])),
        gradient_accumulation_steps=int(str(values["gradient_accumulation_steps"])),
        max_seq_length=int(str(values["max_seq_length"])),
    )
    values.setdefault("planned_bytes", plan_memory(shape, hp, CARD).total_bytes)
    with session_scope() as session:
        row = PlannerMeasurement.model_validate(values)
        session.add(row)
        session.flush()
        assert row.id is not None
        return row.id


def estimate(client: httpx.Client, model: Path, dataset: Path, **hyperparameters: object) -> dict:
    spec = job_spec(model, dataset, **{"max_seq_length": 4096, "gradient_accumulation_steps": 4, **hyperparameters})
    response = client.post("/jobs/estimate", json={**spec, "gpu_memory_bytes": CARD})
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_estimate_without_a_measurement_has_the_planners_time_and_nothing_learned(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    eight_b = config_only_model(tiny_model.parent / "llama-8b-config", LLAMA_3_1_8B)
    body = estimate(client, eight_b, chat_dataset, per_device_train_batch_size=2, max_steps=10)
    assert body["learned"] is None
    # 4e14 FLOP/s at 8 FLOPs per parameter and token; 10 steps of 2 x 4 sequences of 4096 tokens.
    assert body["time"]["tokens_per_second"] == round(4e14 / (8 * 8_030_261_248), 1)
    assert body["time"]["seconds"] == pytest.approx(10 * 2 * 4 * 4096 * 8 * 8_030_261_248 / 4e14)


def test_estimate_corrects_memory_and_time_with_the_closest_measurements(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    eight_b = config_only_model(tiny_model.parent / "llama-8b-config", LLAMA_3_1_8B)
    # Two points of the 8B shape (the NVML peaks of docs/planner.md's planner points) ...
    two = measurement(eight_b, micro_batch=2, peak_bytes=int(52.4 * GIB), tokens_per_second=8_000.0)
    eight = measurement(eight_b, micro_batch=8, peak_bytes=int(58.5 * GIB), tokens_per_second=8_633.0)
    # ... and rows that must not count: another method, another optimizer, another card, too far.
    measurement(eight_b, method="dpo", micro_batch=4, peak_bytes=int(70 * GIB), tokens_per_second=100.0)
    measurement(eight_b, optim="adamw_torch", micro_batch=4, peak_bytes=int(75 * GIB), tokens_per_second=100.0)
    measurement(eight_b, card_memory_bytes=150 * GIB, micro_batch=4, peak_bytes=GIB, tokens_per_second=100.0)
    measurement(eight_b, micro_batch=1, max_seq_length=128, peak_bytes=GIB, tokens_per_second=1e6)

    at_point = estimate(client, eight_b, chat_dataset, per_device_train_batch_size=2)
    learned = at_point["learned"]
    assert [m["id"] for m in learned["measurements"]] == [two, eight]
    assert learned["measurements"][0]["distance"] == 0
    # At a measured point, the measured peak and tokens/s themselves.
    assert learned["total_bytes"] == int(52.4 * GIB)
    assert learned["tokens_per_second"] == 8_000.0
    assert learned["verdict"] == "fits"

    between = estimate(client, eight_b, chat_dataset, per_device_train_batch_size=4, max_steps=10)
    learned = between["learned"]
    assert {m["id"] for m in learned["measurements"]} == {two, eight}
    # The plan's error is a line through the two points: a third of the way from micro-batch 2 to 8.
    plan = between["memory"]["total_bytes"]
    assert learned["total_bytes"] < plan  # the plan errs high on this shape (docs/planner.md)
    assert int(52.4 * GIB) < learned["total_bytes"] < int(58.5 * GIB)
    # tokens/s halfway in ln(tokens) between 2 and 8 x 4096 tokens per micro-batch.
    assert learned["tokens_per_second"] == pytest.approx((8_000 + 8_633) / 2, abs=0.1)
    assert learned["seconds"] == pytest.approx(10 * 4 * 4 * 4096 / learned["tokens_per_second"], rel=1e-3)

    # A longer sequence: attention's share of the FLOPs grows, so fewer tokens/s than measured.
    longer = estimate(client, eight_b, chat_dataset, per_device_train_batch_size=1, max_seq_length=8192)["learned"]
    assert longer["measurements"][0]["id"] == two
    assert longer["tokens_per_second"] < 8_000.0


@pytest.mark.slow
def test_a_finished_job_is_measured_and_the_next_estimate_of_its_shape_cites_it(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    spec = job_spec(tiny_model, chat_dataset)
    record = run_to_end(client, spec)
    assert record["status"] == "succeeded", record["error"]
    events = client.get(f"/jobs/{record['id']}/events").json()["items"]
    measured = [e["message"] for e in events if e["kind"] == "measured"]
    assert len(measured) == 1, measured
    # A CPU measures tokens/s only (no device memory; GPU_TRAIN_FLOPS's plan is a GPU's).
    assert measured[0].endswith(
        " tokens/s; at micro-batch 2 x 2, sequence 64, on cpu: POST /jobs/estimate now uses it for jobs of this "
        "shape (measurement 1)"
    )
    assert events[-1]["kind"] == "succeeded"  # the measurement comes before the final status

    body = client.post("/jobs/estimate", json=spec).json()
    learned = body["learned"]
    assert learned is not None, body
    (used,) = learned["measurements"]
    assert used["job_id"] == record["id"] and used["card"] == "cpu" and used["distance"] == 0
    assert used["steps"] == 6 and used["micro_batch"] == 2 and used["max_seq_length"] == 64
    assert used["tokens_per_second"] == pytest.approx(record["metrics"]["tokens_per_second_mean"])
    # The same shape: its tokens/s as measured, and the time of 6 steps of 2 x 2 sequences at that rate.
    assert learned["tokens_per_second"] == pytest.approx(used["tokens_per_second"], abs=0.1)
    assert learned["seconds"] == pytest.approx(6 * 2 * 2 * 64 / learned["tokens_per_second"], abs=0.051)  # to 0.1 s
    # A CPU has no device memory to measure: the memory is the plan's alone.
    assert used["peak_bytes"] is None and learned["total_bytes"] is None

    # Another method of the same model is not the same measurement.
    other = client.post("/jobs/estimate", json={**spec, "hyperparameters": {**spec["hyperparameters"], "optim": "sgd"}})
    assert other.json()["learned"] is None
