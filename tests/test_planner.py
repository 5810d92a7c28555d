"""The memory and disk planner: its arithmetic on known shapes, its calibration against the
NVML peaks measured on the GPU machine, and the refusals POST /jobs makes with it."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from core.planner import GIB, fsdp_layout, gpus_needed, plan_memory, shape_from_config
from core.spec import Hyperparameters
from tests.builders import LLAMA_3_1_8B, PHI_4_14B, SMALL_LLAMA
from tests.conftest import Env, clear_caches, job_spec

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
LLAMA_70B = {
    "hidden_size": 8192,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "intermediate_size": 28672,
    "vocab_size": 128256,
}


def config_only_model(folder: Path, shape: dict[str, int]) -> Path:
    """A model folder holding only config.json: the planner needs no weights."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps({"model_type": "llama", "max_position_embeddings": 131072, "tie_word_embeddings": False, **shape})
    )
    return folder


@pytest.mark.parametrize(
    ("shape", "parameters"),
    [
        # The counts Unsloth printed as "Trainable parameters" for these shapes on the GPU machine.
        (LLAMA_3_1_8B, 8_030_261_248),
        (PHI_4_14B, 14_659_507_200),
        (SMALL_LLAMA, 317_228_032),
    ],
)
def test_parameter_count_from_config_matches_the_trained_model(shape: dict[str, int], parameters: int) -> None:
    assert shape_from_config(dict(shape)).parameters == parameters


def measured(result_file: str) -> tuple[dict, int]:
    """Settings and NVML peak of the service's job in a recorded benchmark result."""
    data = json.loads((RESULTS / result_file).read_text())
    return data["settings"], data["variants"]["service"]["nvml_device_used_peak_bytes"]


@pytest.mark.parametrize(
    ("shape", "micro_batch", "seq_len", "peak_bytes", "where"),
    [
        (LLAMA_3_1_8B, 2, 4096, measured("2026-11-27-nvidia-h100-80gb-hbm3-llama-3.1-8b.json")[1], "H100, bench"),
        (PHI_4_14B, 2, 4096, measured("2026-11-27-nvidia-h200-phi-4-14b.json")[1], "H200, bench"),
        (SMALL_LLAMA, 2, 1024, int(3.3 * GIB), "H100, bench --shape small"),
        (SMALL_LLAMA, 4, 1024, int(3.694 * GIB), "H200, scripts/gpu-e2e"),
    ],
)
def test_estimate_is_within_15_percent_of_the_measured_nvml_peak(
    shape: dict[str, int], micro_batch: int, seq_len: int, peak_bytes: int, where: str
) -> None:
    hp = Hyperparameters(per_device_train_batch_size=micro_batch, gradient_accumulation_steps=4, max_seq_length=seq_len)
    plan = plan_memory(shape_from_config(dict(shape)), hp, gpu_memory_bytes=None)
    assert abs(plan.total_bytes - peak_bytes) / peak_bytes < 0.15, (where, plan.total_bytes / GIB, peak_bytes / GIB)


POINTS = json.loads((RESULTS / "2026-11-28-nvidia-h100-80gb-hbm3-planner-points.json").read_text())["points"]
SHAPES = {"llama-3.1-8b": LLAMA_3_1_8B, "small": SMALL_LLAMA}


def point_id(point: dict) -> str:
    return "{shape}-mb{micro_batch}-seq{seq_len}-ga{grad_accum}".format(**point["settings"])


@pytest.mark.parametrize("point", POINTS, ids=point_id)
def test_estimate_is_within_15_percent_at_the_points_measured_for_the_planner(point: dict) -> None:
    """bench/planner_points, 2026-11-28, H100: larger micro-batches and longer sequences than the
    fit used; none of these points were fitted."""
    s = point["settings"]
    hp = Hyperparameters(
        per_device_train_batch_size=s["micro_batch"],
        gradient_accumulation_steps=s["grad_accum"],
        max_seq_length=s["seq_len"],
    )
    plan = plan_memory(shape_from_config(dict(SHAPES[s["shape"]])), hp, gpu_memory_bytes=None)
    peak = point["nvml_device_used_peak_bytes"]
    assert abs(plan.total_bytes - peak) / peak < 0.15, (s, plan.total_bytes / GIB, peak / GIB)


def test_parts_of_an_8b_plan() -> None:
    plan = plan_memory(shape_from_config(dict(LLAMA_3_1_8B)), Hyperparameters(), gpu_memory_bytes=80 * 10**9)
    p = 8_030_261_248
    assert plan.parts["weights"] == plan.parts["gradients"] == plan.parts["optimizer_states"] == 2 * p
    assert plan.parts["activations"] == 20 * 2 * 4096 * (4096 + 14336)
    assert plan.total_bytes == sum(plan.parts.values())
    assert plan.optimizer_paged is True
    assert plan.verdict == "fits"
    assert plan.max_micro_batch is not None and plan.max_micro_batch >= 2


def test_fsdp_divides_the_model_among_the_gpus_and_ddp_adds_its_buckets() -> None:
    shape = shape_from_config(dict(PHI_4_14B))
    hp = Hyperparameters()
    p = shape.parameters
    one = plan_memory(shape, hp, gpu_memory_bytes=80 * GIB)
    ddp = plan_memory(shape, hp, gpu_memory_bytes=80 * GIB, gpus=2, strategy="ddp")
    fsdp = plan_memory(shape, hp, gpu_memory_bytes=80 * GIB, gpus=4, strategy="fsdp")
    plain_fsdp = plan_memory(shape, hp, gpu_memory_bytes=80 * GIB, gpus=4, strategy="fsdp", backend="transformers")
    assert ddp.parts["weights"] == one.parts["weights"] and ddp.parts["ddp_buckets"] == 2 * p
    assert ddp.total_bytes > one.total_bytes
    # FSDP shards weights, gradients and optimizer states four ways: Unsloth's keeps the job's
    # paged 8-bit states, the transformers backend's FSDP has 32-bit unpaged ones instead.
    assert fsdp.parts["weights"] == plain_fsdp.parts["weights"] == -(-2 * p // 4)
    assert fsdp.parts["optimizer_states"] == -(-2 * p // 4) and fsdp.optimizer_paged
    assert plain_fsdp.parts["optimizer_states"] == -(-8 * p // 4) and not plain_fsdp.optimizer_paged
    assert fsdp.parts["activations"] == one.parts["activations"]
    assert (fsdp.gpus, fsdp.strategy) == (4, "fsdp")


def test_the_fewest_gpus_that_hold_a_job_without_paging() -> None:
    hp = Hyperparameters()
    eight_b, phi_4 = shape_from_config(dict(LLAMA_3_1_8B)), shape_from_config(dict(PHI_4_14B))
    assert gpus_needed(eight_b, hp, 80 * GIB) == 1
    # 14B on 80 GB cards: one card holds it only by paging the optimizer into host memory.
    assert plan_memory(phi_4, hp, 80 * GIB).verdict == "fits_with_paging"
    needed = gpus_needed(phi_4, hp, 80 * GIB)
    assert needed is not None and needed >= 2
    assert plan_memory(phi_4, hp, 80 * GIB, gpus=needed, strategy="fsdp").verdict == "fits"
    assert (
        plan_memory(phi_4, hp, 80 * GIB, gpus=needed - 1, strategy="fsdp" if needed > 2 else "single").verdict != "fits"
    )
    assert gpus_needed(phi_4, hp, 2 * GIB) is None  # not even 64 cards of 2 GiB
    # Two 80 GB cards hold it with Unsloth's FSDP2 (8-bit states); the transformers backend's
    # 32-bit states need a third.
    assert needed == 2
    assert gpus_needed(phi_4, hp, 80 * GIB, backend="transformers") == 3


def test_estimate_endpoint_gives_figures_and_verdicts(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    eight_b = config_only_model(tiny_model.parent / "llama-8b-config", LLAMA_3_1_8B)
    spec = job_spec(eight_b, chat_dataset, per_device_train_batch_size=2, max_seq_length=4096)
    for card_gib, verdict in [(80, "fits"), (50, "fits_with_paging"), (24, "does_not_fit")]:
        body = client.post("/jobs/estimate", json={**spec, "gpu_memory_bytes": card_gib * GIB}).json()
        assert body["memory"]["verdict"] == verdict, (card_gib, body)
        assert body["memory"]["parameters"] == 8_030_261_248
        assert body["memory"]["gpu_memory_bytes"] == card_gib * GIB
    assert body["memory"]["max_micro_batch"] == 0  # weights, gradients and states alone exceed 24 GiB
    unknown = client.post("/jobs/estimate", json=spec).json()["memory"]
    assert unknown["verdict"] is None and unknown["gpu_memory_bytes"] is None  # no worker reported a GPU
    assert client.get("/jobs").json()["items"] == []  # estimating stores nothing


def test_job_that_cannot_fit_the_gpu_is_refused_with_the_figures(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    from core.queue import get_redis, register_gpu_memory, smallest_worker_gpu

    # Two workers announce their cards; jobs are planned for the smaller one.
    register_gpu_memory(get_redis(), "worker-a", 80 * GIB, ttl_s=60)
    register_gpu_memory(get_redis(), "worker-b", 24 * GIB, ttl_s=60)
    assert smallest_worker_gpu() == 24 * GIB
    eight_b = config_only_model(tiny_model.parent / "llama-8b-config", LLAMA_3_1_8B)
    response = client.post("/jobs", json=job_spec(eight_b, chat_dataset, max_seq_length=4096))
    assert response.status_code == 422
    assert response.json()["error"] == "DoesNotFit"
    assert response.json()["detail"].startswith(
        "this job needs about 52.2 GiB of GPU memory (weights 15.0 GiB, gradients 15.0 GiB, optimizer_states 15.0 GiB, "
    )
    assert response.json()["detail"].endswith(
        "and the GPU has 24.0 GiB; the model alone does not fit this card: train a smaller model or use a larger "
        "GPU; or spread it over 3 GPUs of this size (gpus: 3, strategy fsdp)"
    )
    assert client.get("/jobs").json()["items"] == []

    fits = client.post("/jobs", json=job_spec(tiny_model, chat_dataset))
    assert fits.status_code == 201
    queued = client.get(f"/jobs/{fits.json()['id']}/events").json()["items"][0]["message"]
    assert queued.startswith(
        "job accepted and queued; dataset checked: 64 rows in 'messages' format; planned peak GPU memory "
    )
    assert queued.endswith(" of 24.0 GiB (fits)")


def test_job_whose_checkpoints_cannot_fit_the_disk_is_refused(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.config import get_settings

    monkeypatch.setenv("GPU_MEMORY_BYTES", str(100_000 * GIB))  # planning the disk alone
    get_settings.cache_clear()
    seventy_b = config_only_model(tiny_model.parent / "llama-70b-config", LLAMA_70B)
    response = client.post("/jobs", json=job_spec(seventy_b, chat_dataset, max_steps=1000, save_steps=100))
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail.startswith("the checkpoints would need ")
    assert "(10 checkpoint(s) of " in detail and "set save_total_limit, raise save_steps or free space" in detail
    disk = client.post("/jobs/estimate", json=job_spec(seventy_b, chat_dataset, max_steps=1000, save_steps=100)).json()[
        "disk"
    ]
    assert disk["checkpoints_kept"] == 10 and disk["fits"] is False
    assert disk["required_bytes"] == 10 * disk["checkpoint_bytes"] + disk["final_bytes"]


def test_rows_counted_before_queuing_bound_the_checkpoints(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No max_steps and no save_total_limit: the 64 rows the API read give the step count (64
    rows / micro-batch 2 / accumulation 2 = 16 steps an epoch, 2 epochs), so 32 // 4 = 8 saves."""
    from core.config import get_settings

    monkeypatch.setenv("GPU_MEMORY_BYTES", str(100_000 * GIB))  # planning the disk alone
    get_settings.cache_clear()
    seventy_b = config_only_model(tiny_model.parent / "llama-70b-config", LLAMA_70B)
    spec = job_spec(seventy_b, chat_dataset, max_steps=None, num_train_epochs=2, save_steps=4)
    response = client.post("/jobs", json=spec)
    assert response.status_code == 422
    assert "(8 checkpoint(s) of " in response.json()["detail"]
    # With a tenth held out for validation, 57 rows are left: 15 steps an epoch, 30 steps, 7 saves.
    spec["validation"] = {"fraction": 0.1}
    assert "(7 checkpoint(s) of " in client.post("/jobs", json=spec).json()["detail"]


def test_hub_model_without_reachable_config_cannot_be_estimated(
    client: httpx.Client, env: Env, chat_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = job_spec(Path("x"), chat_dataset)
    spec["model"] = "no-such-org/no-such-model"
    response = client.post("/jobs/estimate", json=spec)
    assert response.status_code == 422
    assert response.json()["error"] == "CannotPlan"
    assert response.json()["detail"].startswith("config.json of 'no-such-org/no-such-model' could not be fetched")
    # Submitting does not wait on the Hub: the job is queued unplanned, and the event says so (with
    # the check of the Hub and its cache off: tests/test_hub.py has it on).
    monkeypatch.setenv("HUB_CHECK_AT_SUBMIT", "false")
    clear_caches()
    job = client.post("/jobs", json=spec).json()
    event = client.get(f"/jobs/{job['id']}/events").json()["items"][0]["message"]
    assert event.startswith(
        "job accepted and queued; dataset checked: 64 rows in 'messages' format; not planned "
        "before queuing: config.json of "
    )


def test_refusal_names_the_largest_micro_batch_and_sequence_that_fit(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.config import get_settings

    monkeypatch.setenv("GPU_MEMORY_BYTES", str(80 * GIB))
    get_settings.cache_clear()
    eight_b = config_only_model(tiny_model.parent / "llama-8b-config", LLAMA_3_1_8B)
    # 64 sequences of 4096 tokens at once: the activations alone would be ~90 GiB.
    response = client.post(
        "/jobs", json=job_spec(eight_b, chat_dataset, per_device_train_batch_size=64, max_seq_length=4096)
    )
    assert response.status_code == 422
    estimate = client.post(
        "/jobs/estimate", json=job_spec(eight_b, chat_dataset, per_device_train_batch_size=64, max_seq_length=4096)
    ).json()["memory"]
    assert estimate["verdict"] == "does_not_fit"
    assert 2 <= estimate["max_micro_batch"] < 64
    assert response.json()["detail"].endswith(
        f"at max_seq_length 4096 the largest micro-batch that fits is {estimate['max_micro_batch']}, and at "
        f"micro-batch 64 the longest max_seq_length is {estimate['max_seq_length']}"
    )


def test_fsdp_keeps_the_weights_gathered_only_where_a_card_holds_them() -> None:
    hp = Hyperparameters(max_seq_length=4096)
    eight_b, phi_4 = shape_from_config(dict(LLAMA_3_1_8B)), shape_from_config(dict(PHI_4_14B))
    # The 8B job fits one card: Unsloth's fast "fit" layout, planned as one GPU's job plus what
    # keeping the weights and gradients gathered was measured to add.
    fit = plan_memory(eight_b, hp, 80 * GIB, gpus=2, strategy="fsdp")
    assert fit.fsdp_layout == fsdp_layout(eight_b, hp, 80 * GIB, 2) == "fit"
    one = plan_memory(eight_b, hp, 80 * GIB)
    assert fit.parts["gathered_weights_and_gradients"] == 3 * eight_b.parameters
    assert fit.total_bytes - fit.parts["gathered_weights_and_gradients"] == one.total_bytes
    # phi-4 does not fit one 80 GB card: everything is divided between the two.
    sharded = plan_memory(phi_4, hp, 80 * GIB, gpus=2, strategy="fsdp")
    assert sharded.fsdp_layout == fsdp_layout(phi_4, hp, 80 * GIB, 2) == "sharded"
    assert sharded.parts["weights"] == -(-2 * phi_4.parameters // 2) and "gathered_layers" in sharded.parts
    assert sharded.verdict == "fits"
    # The transformers backend's FSDP is always planned sharded; DDP and one GPU have no layout.
    assert plan_memory(eight_b, hp, 80 * GIB, gpus=2, strategy="fsdp", backend="transformers").fsdp_layout == "sharded"
    assert plan_memory(eight_b, hp, 80 * GIB, gpus=2, strategy="ddp").fsdp_layout is None
