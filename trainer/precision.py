"""precision fp8, and auto, which chooses it where it pays: torchao's float8 training
(`torchao.float8.convert_to_float8_training`) for the decoder's Linear layers. Weights, gradients
and optimizer states stay as they are with bf16 (the weights are cast to float8 for each matmul,
with the recipe's scales); lm_head and the embeddings stay bf16, as do layers whose dimensions are
not multiples of 16 (float8 matmuls need them). docs/benchmarks.md, "Faster than the recipe"."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from core.contract import ErrorCode
from trainer.failures import JobFailure

logger = logging.getLogger(__name__)

# torch._scaled_mm's float8 kernels: Ada (8.9), Hopper (9.0) and newer.
FP8_MIN_CAPABILITY = (8, 9)
FP8_ALIGNMENT = 16
# Layers that stay bf16 whatever their shape: the output head (its logits decide the loss, and it
# is one layer of many) and the embeddings (lookups, not matmuls; named for models that tie them).
KEPT_IN_BF16 = ("lm_head", "embed_tokens", "embed_out", "wte")


@dataclass(frozen=True)
class Fp8Conversion:
    recipe: str
    layers: list[str]  # the Linear layers that compute in float8, by name
    kept: list[str]  # the Linear layers left in bf16, by name
    torchao: str
    compiled_unit: str | None  # what each compiled region is, "decoder layer" or "Linear layer"; None: eager

    @property
    def compiled(self) -> bool:
        return self.compiled_unit is not None

    def describe(self) -> str:
        kept = f", {len(self.kept)} kept in bf16 ({', '.join(self.kept[:4])}{', ...' if len(self.kept) > 4 else ''})"
        compiled = f", each {self.compiled_unit} compiled as one region" if self.compiled else ""
        return (
            f"precision fp8 (torchao {self.torchao}, {self.recipe} scaling): {len(self.layers)} Linear layers in "
            f"float8{compiled}{kept if self.kept else ''}"
        )


def fp8_layer(module: Any, name: str) -> bool:
    """Whether a module computes in float8: a Linear layer, not the head or an embedding, whose
    dimensions are multiples of FP8_ALIGNMENT."""
    import torch.nn as nn

    if not isinstance(module, nn.Linear):
        return False
    if any(part in KEPT_IN_BF16 for part in name.split(".")):
        return False
    return module.in_features % FP8_ALIGNMENT == 0 and module.out_features % FP8_ALIGNMENT == 0


@dataclass(frozen=True)
class ChosenPrecision:
    """What a job's matmuls train in: the spec's precision, or auto's choice and why."""

    precision: str  # "bf16" or "fp8"; auto says "fp32" on a CPU (which trains in float32 whatever the spec says)
    recipe: str | None  # fp8's scaling recipe
    reason: str  # auto's reason, in words; "" when the spec named the precision

    def describe(self) -> str:
        return f"precision auto: {self.precision} ({self.reason})" if self.reason else ""


@dataclass(frozen=True)
class Fp8Hardware:
    """What this process has for float8 training: the card and its compute capability (None: no
    CUDA GPU), and torchao's version, or why its float8 training does not import (looked at only
    on a card that has FP8 matmuls)."""

    card: str | None = None
    capability: tuple[int, int] | None = None
    torchao: str | None = None
    torchao_error: str = ""

    @property
    def capable(self) -> bool:
        return self.capability is not None and self.capability >= FP8_MIN_CAPABILITY

    @property
    def compute_capability(self) -> str:
        return ".".join(map(str, self.capability or ()))


def fp8_hardware() -> Fp8Hardware:
    import torch

    if not torch.cuda.is_available():
        return Fp8Hardware()
    card, capability = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
    if capability < FP8_MIN_CAPABILITY:
        return Fp8Hardware(card, capability)
    try:
        import torchao
        from torchao.float8 import convert_to_float8_training  # noqa: F401
    except Exception as exc:
        return Fp8Hardware(card, capability, torchao_error=f"{type(exc).__name__}: {exc}")
    return Fp8Hardware(card, capability, str(getattr(torchao, "__version__", "unknown")))


def resolve_precision(spec: Any, backend: str, world_size: int, *, compiled: bool = True) -> ChosenPrecision:
    """The spec's precision, with "auto" made fp8 where it was measured to pay and to hold the loss
    (docs/benchmarks.md: 1.2x-1.4x the recipe's tokens/s on an H100, the loss within 1% of bf16's
    over 200 steps): an SFT job on one GPU of compute capability 8.9 or newer, with the Unsloth
    backend, torchao importable and the float8 layers compiled (`compiled`: FP8_COMPILE; eager,
    their casts and scales run as kernels of their own, which was not measured to pay). Anywhere
    else bf16, with the reason; never a failure (an explicit `precision: fp8` fails where it
    cannot run: check_fp8_support)."""
    recipe = spec.fp8_recipe or "tensorwise"
    if spec.precision != "auto":
        return ChosenPrecision(spec.precision, recipe if spec.precision == "fp8" else None, "")
    hardware = fp8_hardware()
    if hardware.card is None:
        return ChosenPrecision("fp32", None, "no CUDA GPU: a CPU trains in float32")
    if world_size > 1:
        return ChosenPrecision("bf16", None, f"fp8 is chosen for a job on one GPU; this one has {world_size}")
    if spec.method != "sft":
        return ChosenPrecision(
            "bf16", None, f"fp8 is chosen for method sft only, where it was measured; not {spec.method}"
        )
    if backend != "unsloth":
        return ChosenPrecision("bf16", None, f"fp8 is chosen with the Unsloth backend only; this job has {backend}")
    if not compiled:
        reason = "FP8_COMPILE is off on this worker, and eager float8 layers were not measured to pay"
        return ChosenPrecision("bf16", None, reason)
    if not hardware.capable:
        reason = f"{hardware.card} has compute capability {hardware.compute_capability}; FP8 matmuls need 8.9 or newer"
        return ChosenPrecision("bf16", None, reason)
    if hardware.torchao is None:
        return ChosenPrecision("bf16", None, f"torchao's float8 training does not import: {hardware.torchao_error}")
    return ChosenPrecision(
        "fp8",
        recipe,
        f"{hardware.card}, compute capability {hardware.compute_capability}, torchao {hardware.torchao}; "
        "precision bf16 opts out",
    )


def check_fp8_support() -> str:
    """torchao's version, once the GPU and torchao are known to do float8; JobFailure otherwise
    (before the model is loaded: an 8B model takes a minute to load for nothing)."""
    hardware = fp8_hardware()
    instead = "Resubmit the job with precision bf16, or on a worker with an L4, L40S, H100, H200 or B200."
    if hardware.card is None:
        raise JobFailure(
            ErrorCode.gpu_unavailable,
            "precision fp8 needs a CUDA GPU with FP8 matmuls (compute capability 8.9 or newer) and this worker has "
            "none: on a CPU the model trains in float32.",
            action=instead,
        )
    if not hardware.capable:
        raise JobFailure(
            ErrorCode.gpu_unavailable,
            f"precision fp8 needs a GPU of compute capability 8.9 or newer and this one ({hardware.card}) has "
            f"{hardware.compute_capability}.",
            action=instead,
        )
    if hardware.torchao is None:
        raise JobFailure(
            ErrorCode.backend_unavailable,
            "precision fp8 needs torchao's float8 training, which this worker cannot import: "
            f"{hardware.torchao_error}.",
            action="Install torchao on the worker (the gpu extra: pip install '.[gpu]'), or resubmit the job with "
            "precision bf16.",
        )
    return hardware.torchao


def decoder_layers(model: Any) -> Any:
    """The model's decoder layers (the ModuleList as long as config.num_hidden_layers), or None."""
    import torch.nn as nn

    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not count:
        return None
    return next((m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == count), None)


def convert_to_fp8(model: Any, recipe: str, *, compile_layers: bool, region: str = "linear") -> Fp8Conversion:
    """Swap the model's eligible Linear layers for torchao's Float8Linear, in place. With
    `compile_layers` each float8 Linear (region "linear") or each decoder layer (region
    "decoder_layer": torchao's scaling and casts fused with the norms and activations around the
    matmuls too) is compiled as one region; without a compile the casts and scales run as separate
    kernels and eat much of the gain. A model whose decoder layers are not found has each float8
    Linear compiled. In a bare training loop on an H100 (8B shape, seq 4096, 2 x 4,
    scripts/gpu_fp8_probe.py, docs/benchmarks.md): 1.29x bf16's tokens/s by decoder layer, 1.17x by
    Linear layer."""
    import torch.nn as nn
    import torchao
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    linear = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    layers = [name for name, m in linear if fp8_layer(m, name)]
    kept = [name for name, m in linear if not fp8_layer(m, name)]
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe), module_filter_fn=fp8_layer)
    unit: str | None = None
    if compile_layers:
        regions = decoder_layers(model) if region == "decoder_layer" else None
        if regions is not None:
            unit = "decoder layer"
        else:
            converted = dict(model.named_modules())
            regions, unit = [converted[name] for name in layers], "Linear layer"
        for module in regions:
            module.compile()
    logger.info("fp8: %d Linear layers in float8 (%s), %d kept in bf16", len(layers), recipe, len(kept))
    return Fp8Conversion(
        recipe=recipe,
        layers=layers,
        kept=kept,
        torchao=str(getattr(torchao, "__version__", "unknown")),
        compiled_unit=unit,
    )
