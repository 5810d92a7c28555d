"""precision fp8 and auto (the default): the spec option, its refusals (at submit when no worker can
train fp8, in the trainer on a CPU), what auto chooses where, and which Linear layers the
conversion puts in float8."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import httpx
import pytest

from core.gpu_leases import Gpu
from tests.conftest import Env, job_spec, run_to_end

GIB = 1024**3


def test_fp8_is_a_spec_option_with_its_recipe(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    spec = job_spec(tiny_model, chat_dataset)
    default = client.post("/jobs", json=spec).json()
    assert "precision" not in default["spec"]  # auto, the default, left out of the stored spec
    bf16 = client.post("/jobs", json={**spec, "precision": "bf16"}).json()
    assert bf16["spec"]["precision"] == "bf16"
    fp8 = client.post("/jobs", json={**spec, "precision": "fp8"}).json()
    assert (fp8["spec"]["precision"], fp8["spec"]["fp8_recipe"]) == ("fp8", "tensorwise")
    rowwise = client.post("/jobs", json={**spec, "precision": "fp8", "fp8_recipe": "rowwise"}).json()
    assert rowwise["spec"]["fp8_recipe"] == "rowwise"

    auto = client.post("/jobs", json={**spec, "fp8_recipe": "rowwise"}).json()  # for when auto chooses fp8
    assert ("precision" in auto["spec"], auto["spec"]["fp8_recipe"]) == (False, "rowwise")
    wrong = client.post("/jobs", json={**spec, "precision": "bf16", "fp8_recipe": "rowwise"})
    assert wrong.status_code == 422
    assert "fp8_recipe applies to precision 'fp8' or 'auto', not to 'bf16'" in wrong.text
    unknown = client.post("/jobs", json={**spec, "precision": "fp4"})
    assert unknown.status_code == 422 and "precision" in unknown.text
    recipe = client.post("/jobs", json={**spec, "precision": "fp8", "fp8_recipe": "delayed"})
    assert recipe.status_code == 422 and "fp8_recipe" in recipe.text
    several = client.post("/jobs", json={**spec, "precision": "fp8", "gpus": 2})
    assert several.status_code == 422
    assert "precision fp8 is for a job on one GPU (this one asks for 2)" in several.json()["detail"]


def test_fp8_is_refused_at_submit_when_no_live_worker_can_train_it(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    from core.queue import get_redis, register_fp8_support

    spec = {**job_spec(tiny_model, chat_dataset), "precision": "fp8"}
    register_fp8_support(
        get_redis(), "worker-a100", "GPU 0 (NVIDIA A100-SXM4-80GB, GPU-1) has compute capability 8.0, below 8.9", 60
    )
    register_fp8_support(get_redis(), "worker-cpu", "no NVIDIA GPU", 60)
    refused = client.post("/jobs", json=spec)
    assert refused.status_code == 422
    assert refused.json()["error"] == "DoesNotFit"
    assert refused.json()["detail"] == (
        "precision fp8 needs a GPU with FP8 matmuls (compute capability 8.9 or newer: L4, L40S, H100, H200, B200) "
        "and torchao on its worker, and no live worker has both (worker-a100: GPU 0 (NVIDIA A100-SXM4-80GB, GPU-1) "
        "has compute capability 8.0, below 8.9; worker-cpu: no NVIDIA GPU); submit the job with precision bf16"
    )
    assert client.post("/jobs", json=job_spec(tiny_model, chat_dataset)).status_code == 201  # auto is fine
    assert client.post("/jobs", json={**spec, "precision": "bf16"}).status_code == 201
    register_fp8_support(get_redis(), "worker-h100", "", 60)  # one worker that can: queued for it
    assert client.post("/jobs", json=spec).status_code == 201


def test_a_worker_says_why_it_cannot_train_fp8(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.gpus import fp8_problem

    h100 = Gpu(0, "NVIDIA H100 80GB HBM3", "GPU-a", 80 * GIB, "9.0")
    a100 = Gpu(1, "NVIDIA A100-SXM4-80GB", "GPU-b", 80 * GIB, "8.0")
    assert fp8_problem([]) == "no NVIDIA GPU"
    assert fp8_problem([Gpu(0, "cpu", "CPU-host-0")]) == "no NVIDIA GPU"
    assert fp8_problem([h100, a100]) == "GPU 1 (NVIDIA A100-SXM4-80GB, GPU-b) has compute capability 8.0, below 8.9"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real_find_spec(name, *a)
    )
    assert fp8_problem([h100]) == "torchao is not installed"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert fp8_problem([h100, Gpu(1, "NVIDIA L40S", "GPU-c", 48 * GIB, "8.9")]) == ""


class FakeCuda:
    """torch.cuda as resolve_precision reads it, for the cards this machine does not have."""

    def __init__(self, name: str, capability: tuple[int, int]) -> None:
        self.name, self.capability = name, capability

    def is_available(self) -> bool:
        return True

    def get_device_capability(self) -> tuple[int, int]:
        return self.capability

    def get_device_name(self) -> str:
        return self.name


def test_auto_chooses_fp8_for_one_gpu_sft_unsloth_job_on_an_fp8_card_and_bf16_elsewhere(
    monkeypatch: pytest.MonkeyPatch, tiny_model: Path, chat_dataset: Path
) -> None:
    import torch

    from core.spec import JobSpec
    from trainer.precision import resolve_precision

    spec = JobSpec.model_validate(job_spec(tiny_model, chat_dataset))
    assert spec.precision == "auto"
    on_cpu = resolve_precision(spec, "transformers", 1)
    assert (on_cpu.precision, on_cpu.recipe) == ("fp32", None)
    assert on_cpu.describe() == "precision auto: fp32 (no CUDA GPU: a CPU trains in float32)"

    monkeypatch.setattr(torch, "cuda", FakeCuda("NVIDIA H100 80GB HBM3", (9, 0)))
    monkeypatch.setitem(__import__("sys").modules, "torchao", None)  # not importable
    without_torchao = resolve_precision(spec, "unsloth", 1)
    assert without_torchao.precision == "bf16"
    assert without_torchao.reason.startswith("torchao's float8 training does not import: ")
    monkeypatch.undo()
    if importlib.util.find_spec("torchao") is not None:
        monkeypatch.setattr(torch, "cuda", FakeCuda("NVIDIA H100 80GB HBM3", (9, 0)))
        chosen = resolve_precision(spec, "unsloth", 1)
        assert (chosen.precision, chosen.recipe) == ("fp8", "tensorwise")
        assert chosen.describe().startswith("precision auto: fp8 (NVIDIA H100 80GB HBM3, compute capability 9.0, ")
        rowwise = JobSpec.model_validate({**job_spec(tiny_model, chat_dataset), "fp8_recipe": "rowwise"})
        assert resolve_precision(rowwise, "unsloth", 1).recipe == "rowwise"
    monkeypatch.setattr(torch, "cuda", FakeCuda("NVIDIA A100-SXM4-80GB", (8, 0)))
    a100 = resolve_precision(spec, "unsloth", 1)
    assert a100.describe() == (
        "precision auto: bf16 (NVIDIA A100-SXM4-80GB has compute capability 8.0; FP8 matmuls need 8.9 or newer)"
    )
    monkeypatch.setattr(torch, "cuda", FakeCuda("NVIDIA H100 80GB HBM3", (9, 0)))
    assert resolve_precision(spec, "unsloth", 2).reason == "fp8 is chosen for a job on one GPU; this one has 2"
    assert resolve_precision(spec, "transformers", 1).reason == (
        "fp8 is chosen with the Unsloth backend only; this job has transformers"
    )
    assert resolve_precision(spec, "unsloth", 1, compiled=False).reason == (
        "FP8_COMPILE is off on this worker, and eager float8 layers were not measured to pay"
    )
    dpo = JobSpec.model_validate(
        {**job_spec(tiny_model, chat_dataset), "method": "dpo", "hyperparameters": {"max_steps": 2}}
    )
    assert resolve_precision(dpo, "unsloth", 1).reason == (
        "fp8 is chosen for method sft only, where it was measured; not dpo"
    )
    explicit = JobSpec.model_validate({**job_spec(tiny_model, chat_dataset), "precision": "bf16"})
    assert (
        resolve_precision(explicit, "unsloth", 1).precision,
        resolve_precision(explicit, "unsloth", 1).describe(),
    ) == (
        "bf16",
        "",
    )


@pytest.mark.slow
def test_fp8_job_on_a_cpu_fails_with_words_before_loading_the_model(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    record = run_to_end(client, {**job_spec(tiny_model, chat_dataset), "precision": "fp8"})
    assert record["status"] == "failed"
    assert record["error"]["code"] == "gpu_unavailable"
    assert record["error"]["message"].startswith(
        "precision fp8 needs a CUDA GPU with FP8 matmuls (compute capability 8.9 or newer) and this worker has none"
    )
    assert "Resubmit the job with precision bf16" in record["error"]["message"]
    events = [e["kind"] for e in client.get(f"/jobs/{record['id']}/events").json()["items"]]
    assert "dataset_loaded" not in events  # refused before the data and the model were loaded


@pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None,
    reason="torchao is not installed (the gpu extra; pip install torchao==0.16.0)",
)
def test_fp8_conversion_takes_the_decoders_linear_layers_and_keeps_the_head_and_odd_shapes() -> None:
    import torch.nn as nn
    from torchao.float8.float8_linear import Float8Linear
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.precision import convert_to_fp8

    # intermediate_size 72 is not a multiple of 16: the MLP stays bf16.
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=72,
        vocab_size=128,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    conversion = convert_to_fp8(model, "rowwise", compile_layers=False)
    modules = dict(model.named_modules())
    attention = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"]
    mlp = [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")]
    assert sorted(conversion.layers) == sorted(attention)
    assert sorted(conversion.kept) == sorted([*mlp, "lm_head"])
    assert all(isinstance(modules[name], Float8Linear) for name in attention)
    assert all(type(modules[name]) is nn.Linear for name in [*mlp, "lm_head"])
    assert conversion.describe().startswith("precision fp8 (torchao ")
    assert "rowwise scaling): 8 Linear layers in float8, 7 kept in bf16 (" in conversion.describe()


def test_the_decoder_layers_are_found_as_compile_regions() -> None:
    """FP8_COMPILE_REGION=decoder_layer compiles each of the model's decoder layers: the ModuleList
    as long as config.num_hidden_layers; a model without one gets each float8 Linear compiled."""
    import torch.nn as nn
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.precision import decoder_layers

    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128
    )
    model = LlamaForCausalLM(config)
    assert decoder_layers(model) is model.model.layers
    assert decoder_layers(nn.Sequential(nn.Linear(16, 16))) is None  # no config: no decoder layers named
