"""Memory and disk planning for a job spec, from the model's config.json alone (no weights,
no torch), so a job that cannot fit is refused in seconds instead of failing after an hour in
the queue.

The model of device memory, per full fine-tune with Unsloth (bf16 weights, bf16 gradients,
offloaded gradient checkpointing):

    weights 2 B/param + gradients 2 B/param + optimizer states (8-bit: 2 B/param, 32-bit: 8)
    + activations ACTIVATION_BYTES * tokens in a micro-batch * (hidden + intermediate)
    + CUDA context and workspaces (CUDA_FIXED_BYTES)
    + allocator and paging overhead (OVERHEAD_SHARE of the parameter-proportional part)

The constants were fitted to NVML peaks measured through the service on 2026-11-27
(docs/planner.md holds the comparison): Llama-3.1-8B shape 52.6 GiB and a 317M Llama 3.3 GiB
on an H100 80GB, phi-4 (14B) shape 92.0 GiB and the 317M Llama at micro-batch 4 3.69 GiB on an
H200.

Preference and reward methods add their own terms (core/methods.py says which a method has):
chosen and rejected in one forward pass (twice the activations), the logits their log-probabilities
are taken from (no fused loss: LOGIT_BYTES per token per vocabulary entry, and one sequence's in
float32), a reference model (bf16 weights) unless its log-probabilities are precomputed, and for
GRPO the KV cache of the completions generated at once, counted instead of training's activations
and logits when it is the larger (generation and training do not overlap). docs/methods.md."""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from core.methods import facts, generation_batch, training_sequences, uses_reference
from core.spec import GPU_ONLY_OPTIMIZERS, Hyperparameters, JobSpec

logger = logging.getLogger(__name__)

GIB = 1024**3
ACTIVATION_BYTES = 20  # per token per (hidden + intermediate) unit, with Unsloth's offloading
CUDA_FIXED_BYTES = 1 * GIB
OVERHEAD_SHARE = 0.078
# Headroom left on the card: a paged optimizer that asks for more than is free can hang the GPU.
SAFETY_SHARE = 0.05
OPTIMIZER_BYTES_PER_PARAM = {
    "paged_adamw_8bit": 2,
    "adamw_8bit": 2,
    "paged_adamw_32bit": 8,
    "adamw_torch": 8,
    "adamw_torch_fused": 8,
    "adafactor": 4,
    "sgd": 0,
}
PAGED_OPTIMIZERS = frozenset({"paged_adamw_8bit", "paged_adamw_32bit"})
# A DDP job's extra memory per GPU over one GPU's: measured with Unsloth on 2 x H200 for the
# Llama-3.1-8B shape (torch peak 48.3 against 32.8 GiB; docs/scheduling.md), about one more
# bf16 copy of the gradients.
DDP_BYTES_PER_PARAM = 2
# Unsloth's FSDP2 "fit" layout, for a job one card holds: each GPU keeps the trainable weights
# gathered from forward to backward and across accumulation micro-batches, which is fast (no
# re-gathering) but holds one GPU's memory plus about this much per parameter: measured for the
# Llama-3.1-8B shape on 2 x H200 (torch peak 55.1 against 32.8 GiB on one card; docs/scheduling.md),
# as DDP_BYTES_PER_PARAM was.
FSDP_FIT_BYTES_PER_PARAM = 3
# The most GPUs gpus_needed looks at.
MAX_GPUS_PLANNED = 64
# Logits a method holds for its log-probabilities, per token per vocabulary entry: bf16 values and
# their gradient; plus one sequence's in float32 while its log-softmax is taken.
LOGIT_BYTES = 4
LOGIT_ROW_BYTES = 4
# A reference model's weights, bf16.
REFERENCE_BYTES_PER_PARAM = 2
KV_BYTES = 2  # bf16 keys and values

Verdict = Literal["fits", "fits_with_paging", "does_not_fit"]


class PlanError(Exception):
    """The plan cannot be made (no config.json, an architecture we cannot count)."""


@dataclass(frozen=True)
class ModelShape:
    parameters: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    vocab_size: int
    max_position_embeddings: int | None
    num_key_value_heads: int = 0  # 0: unknown (the KV cache is then counted at hidden_size)
    head_dim: int = 0

    def kv_bytes_per_token(self) -> int:
        width = self.num_key_value_heads * self.head_dim or self.hidden_size
        return 2 * KV_BYTES * self.num_hidden_layers * width


HUB_TIMEOUT_S = 5


def read_config(model: str, *, allow_network: bool = True) -> dict[str, Any]:
    """config.json of a local model folder, or of a Hub model (downloaded alone, cached).
    Without `allow_network` only the local Hugging Face cache is read: submitting a job must
    not wait on a Hub that may be unreachable from the API's host."""
    path = Path(model)
    if path.is_absolute():
        config = path / "config.json"
        if not config.is_file():
            raise PlanError(f"{model} has no config.json, so its size cannot be planned")
        return dict(json.loads(config.read_text()))
    try:
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(model, "config.json", local_files_only=not allow_network, etag_timeout=HUB_TIMEOUT_S)
        return dict(json.loads(Path(local).read_text()))
    except Exception as exc:  # offline, gated, no such repo
        raise PlanError(f"config.json of {model!r} could not be fetched: {type(exc).__name__}") from exc


def shape_from_config(config: dict[str, Any]) -> ModelShape:
    config = config.get("text_config", config)  # multimodal configs nest the language model
    try:
        d, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
        ffn, vocab = int(config["intermediate_size"]), int(config["vocab_size"])
        heads = int(config["num_attention_heads"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanError(f"config.json lacks {exc} needed to count the parameters") from exc
    if config.get("num_local_experts") or config.get("n_routed_experts") or config.get("num_experts"):
        raise PlanError("mixture-of-experts models are not planned yet")
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or d // heads)
    attention = d * heads * head_dim + 2 * d * kv_heads * head_dim + heads * head_dim * d
    per_layer = attention + 3 * d * ffn + 2 * d  # gated MLP, two norms
    embeddings = vocab * d * (1 if config.get("tie_word_embeddings") else 2)
    return ModelShape(
        embeddings + layers * per_layer + d,
        d,
        ffn,
        layers,
        vocab,
        config.get("max_position_embeddings"),
        kv_heads,
        head_dim,
    )


@dataclass(frozen=True)
class MemoryPlan:
    total_bytes: int
    parts: dict[str, int]
    optimizer_paged: bool
    gpu_memory_bytes: int | None
    verdict: Verdict | None
    max_micro_batch: int | None
    max_seq_length: int | None
    parameters: int
    gpus: int = 1  # the plan is for one of this many GPUs
    strategy: str = "single"
    gpus_needed: int | None = None  # the fewest GPUs of this size that hold the job without paging
    fsdp_layout: str | None = None  # fsdp: "fit" (weights kept gathered: fast) or "sharded" (lean)
    # per_device_train_batch_size "auto": the candidates the trainer times, largest first (the plan is
    # for the first of them)
    auto_micro_batches: tuple[int, ...] | None = None


def activation_bytes(shape: ModelShape, tokens: int) -> int:
    return ACTIVATION_BYTES * tokens * (shape.hidden_size + shape.intermediate_size)


def fsdp_optimizer(optim: str, backend: str) -> str:
    """The optimizer an FSDP job trains with: the job's own under Unsloth's FSDP2, which steps
    bitsandbytes on each GPU's shards; adamw_torch_fused in place of bitsandbytes' under the
    transformers backend, whose FSDP cannot (trainer/run.py)."""
    return "adamw_torch_fused" if backend == "transformers" and optim in GPU_ONLY_OPTIMIZERS else optim


def plan_memory(
    shape: ModelShape,
    hp: Hyperparameters,
    gpu_memory_bytes: int | None,
    *,
    gpus: int = 1,
    strategy: str = "single",
    backend: str = "auto",
    method: str = "sft",
) -> MemoryPlan:
    """Peak memory of one GPU of the job. With `ddp` each GPU holds the whole model and DDP's
    gradient buckets. With `fsdp` under Unsloth (backend auto on a GPU host) the layout is the
    one fsdp_layout picks: "fit" keeps the weights gathered, "sharded" divides the weights,
    gradients and optimizer states among the `gpus` GPUs, plus one decoder layer gathered whole
    at a time (and the next, prefetched)."""
    if strategy == "fsdp" and gpus > 1 and backend != "transformers" and gpu_memory_bytes:
        fit = _plan(shape, hp, gpu_memory_bytes, gpus=gpus, strategy=strategy, layout="fit", method=method)
        if fit.verdict == "fits":
            return fit
    return _plan(
        shape, hp, gpu_memory_bytes, gpus=gpus, strategy=strategy, layout="sharded", backend=backend, method=method
    )


def fsdp_layout(
    shape: ModelShape, hp: Hyperparameters, gpu_memory_bytes: int | None, gpus: int, method: str = "sft"
) -> str:
    """Unsloth's FSDP2 layout for a job: "fit" when a card holds it with the weights kept gathered
    (fast), else "sharded" (every state divided, gradients reduced at each micro-batch)."""
    plan = plan_memory(shape, hp, gpu_memory_bytes, gpus=gpus, strategy="fsdp", method=method)
    return plan.fsdp_layout or "sharded"


def method_parts(shape: ModelShape, hp: Hyperparameters, method: str, share: int = 1) -> dict[str, int]:
    """The memory a method needs beyond SFT's parts, by name (none for SFT): its activations and
    logits replace SFT's activations; `generation` (GRPO) is the KV cache of the completions
    generated at once."""
    about = facts(method)
    if method == "sft":
        return {}
    micro = hp.micro_batch
    tokens = micro * hp.max_seq_length * about.sequences_per_row
    parts = {"activations": activation_bytes(shape, tokens)}
    if about.logits_held:
        # GRPO takes log-probabilities of the completion only.
        scored = micro * (hp.max_completion_length or hp.max_seq_length) if about.generates else tokens
        row = hp.max_completion_length if about.generates and hp.max_completion_length else hp.max_seq_length
        parts["logits"] = (LOGIT_BYTES * scored + LOGIT_ROW_BYTES * row) * shape.vocab_size
    if uses_reference(method, hp):
        parts["reference_model"] = -(-REFERENCE_BYTES_PER_PARAM * shape.parameters // share)
    if about.generates:
        parts["generation"] = shape.kv_bytes_per_token() * hp.max_seq_length * generation_batch(hp)
    return parts


def _plan(
    shape: ModelShape,
    hp: Hyperparameters,
    gpu_memory_bytes: int | None,
    *,
    gpus: int,
    strategy: str,
    layout: str,
    backend: str = "auto",
    method: str = "sft",
) -> MemoryPlan:
    p = shape.parameters
    optim = fsdp_optimizer(hp.optim, backend) if strategy == "fsdp" else hp.optim
    # The fit layout is planned as one GPU's job plus what was measured on top of it.
    share = gpus if strategy == "fsdp" and layout == "sharded" else 1
    parts = {
        "weights": -(-2 * p // share),
        "gradients": -(-2 * p // share),
        "optimizer_states": -(-OPTIMIZER_BYTES_PER_PARAM[optim] * p // share),
        "activations": activation_bytes(shape, hp.micro_batch * hp.max_seq_length),
        "cuda_context": CUDA_FIXED_BYTES,
    }
    parts.update(method_parts(shape, hp, method, share))
    if strategy == "ddp" and gpus > 1:
        parts["ddp_buckets"] = DDP_BYTES_PER_PARAM * p
    if strategy == "fsdp" and gpus > 1 and layout == "fit":
        parts["gathered_weights_and_gradients"] = FSDP_FIT_BYTES_PER_PARAM * p
    elif strategy == "fsdp" and gpus > 1:
        parts["gathered_layers"] = 2 * 2 * (p // max(shape.num_hidden_layers, 1))
    fixed = parts["weights"] + parts["gradients"] + parts["optimizer_states"]
    parts["allocator_overhead"] = int(OVERHEAD_SHARE * fixed)
    # What grows with the micro-batch and the sequence; generation comes before training's forward
    # and backward passes and is gone by then: the larger of the two counts.
    varying = parts["activations"] + parts.get("logits", 0)
    total = sum(parts.values()) - min(varying, parts.get("generation", 0))
    paged = optim in PAGED_OPTIMIZERS
    verdict: Verdict | None = None
    max_mb: int | None = None
    max_seq: int | None = None
    if gpu_memory_bytes:
        budget = int(gpu_memory_bytes * (1 - SAFETY_SHARE))
        if total <= budget:
            verdict = "fits"
        elif paged and total - parts["optimizer_states"] <= budget:
            verdict = "fits_with_paging"  # the states would live partly in host memory: slow
        else:
            verdict = "does_not_fit"
        room = budget - (sum(parts.values()) - varying - parts.get("generation", 0))
        if method == "sft":
            per_token = activation_bytes(shape, 1)
            max_tokens = room // per_token if room > 0 else 0
            max_mb = int(max_tokens // hp.max_seq_length)
            max_seq = int(max_tokens // hp.micro_batch)
        else:  # the method's activations and logits grow about in proportion to both
            scale = room / varying if room > 0 and varying else 0.0
            max_mb = int(scale * hp.micro_batch)
            max_seq = int(scale * hp.max_seq_length)
        if shape.max_position_embeddings:
            max_seq = min(max_seq, int(shape.max_position_embeddings))
    return MemoryPlan(
        total,
        parts,
        paged,
        gpu_memory_bytes,
        verdict,
        max_mb,
        max_seq,
        p,
        gpus,
        strategy,
        fsdp_layout=layout if strategy == "fsdp" and gpus > 1 else None,
    )


# per_device_train_batch_size "auto": the most candidates the trainer times, and the largest tried.
AUTO_CANDIDATES = 3
AUTO_MAX_MICRO_BATCH = 64


def auto_micro_batches(
    shape: ModelShape | None, hp: Hyperparameters, gpu_memory_bytes: int | None, method: str = "sft"
) -> list[int]:
    """The micro-batches "auto" chooses among, largest first: powers of two that divide the
    effective batch (the recipe's micro-batch 2 x gradient_accumulation_steps) and that the plan
    says fit the card without paging (every one up to AUTO_MAX_MICRO_BATCH when the card is not
    known); the AUTO_CANDIDATES largest. [1] when not even that fits (the plan then says so)."""
    effective = hp.sequences_per_step
    sizes = [2**k for k in range(int(math.log2(AUTO_MAX_MICRO_BATCH)) + 1) if effective % 2**k == 0]
    if gpu_memory_bytes and shape is not None:
        sizes = [
            m
            for m in sizes
            if plan_memory(shape, with_micro_batch(hp, m), gpu_memory_bytes, method=method).verdict == "fits"
        ]
    return sorted(sizes, reverse=True)[:AUTO_CANDIDATES] or [1]


def with_micro_batch(hp: Hyperparameters, micro_batch: int) -> Hyperparameters:
    """The hyperparameters at this micro-batch, the accumulation making up the same effective batch."""
    accumulation = max(hp.sequences_per_step // micro_batch, 1)
    return hp.model_copy(
        update={"per_device_train_batch_size": micro_batch, "gradient_accumulation_steps": accumulation}
    )


def gpus_needed(
    shape: ModelShape, hp: Hyperparameters, gpu_memory_bytes: int, backend: str = "auto", method: str = "sft"
) -> int | None:
    """The fewest GPUs of this size the job fits without paging: 1 when one card holds it, else
    the fewest FSDP shards it; None when not even MAX_GPUS_PLANNED do."""
    if plan_memory(shape, hp, gpu_memory_bytes, method=method).verdict == "fits":
        return 1
    for gpus in range(2, MAX_GPUS_PLANNED + 1):
        plan = plan_memory(shape, hp, gpu_memory_bytes, gpus=gpus, strategy="fsdp", backend=backend, method=method)
        if plan.verdict == "fits":
            return gpus
    return None


def resolved_strategy(spec: JobSpec, shape: ModelShape | None, gpu_memory_bytes: int | None) -> str:
    """`single` for one GPU; the spec's ddp or fsdp; for auto, ddp when one card holds the whole
    job (or that cannot be told), fsdp when it does not."""
    if spec.gpus == 1:
        return "single"
    if spec.strategy != "auto":
        return spec.strategy
    if shape is None or gpu_memory_bytes is None:
        return "ddp"
    plan = plan_memory(shape, spec.hyperparameters, gpu_memory_bytes, method=spec.method)
    return "ddp" if plan.verdict == "fits" else "fsdp"


@dataclass(frozen=True)
class DiskPlan:
    checkpoint_bytes: int
    final_bytes: int
    checkpoints_kept: int | None
    required_bytes: int | None
    free_bytes: int
    fits: bool | None


def steps_per_epoch(hp: Hyperparameters, sequences: int) -> int:
    return max(math.ceil(math.ceil(sequences / hp.micro_batch) / hp.gradient_accumulation_steps), 1)


def optimizer_steps(hp: Hyperparameters, sequences: int) -> int:
    """The steps a run over `sequences` training sequences (rows, unless packed) takes."""
    return hp.max_steps or math.ceil(steps_per_epoch(hp, sequences) * hp.num_train_epochs)


# Training FLOPs per token and parameter: 6 for the forward and backward passes, 2 more for the
# forward that gradient checkpointing recomputes.
TRAIN_FLOPS_PER_TOKEN_PER_PARAMETER = 8


def estimate_seconds(
    shape: ModelShape, hp: Hyperparameters, *, gpus: int, rows: int | None, gpu_train_flops: float
) -> float | None:
    """How long a job should train, at most: every sequence taken as max_seq_length tokens long, at
    GPU_TRAIN_FLOPS per card. None when the tokens are not known (no max_steps, and the rows
    uncounted or packed). The GPU line backfills by it (core/gpu_leases.py): an estimate that errs
    long only backfills less."""
    tokens = tokens_to_train(hp, gpus=gpus, rows=rows)
    if tokens is None:
        return None
    flops = tokens * TRAIN_FLOPS_PER_TOKEN_PER_PARAMETER * shape.parameters
    return float(flops / (gpu_train_flops * gpus))


def tokens_to_train(hp: Hyperparameters, *, gpus: int, rows: int | None) -> int | None:
    """The tokens a job trains, at most: every sequence taken as max_seq_length tokens long. None
    when they are not known (no max_steps, and the rows uncounted or packed)."""
    if hp.max_steps:
        sequences = hp.max_steps * hp.micro_batch * hp.gradient_accumulation_steps * gpus
    elif rows is not None and not hp.packing:
        sequences = math.ceil(rows * hp.num_train_epochs)
    else:
        return None
    return int(sequences * hp.max_seq_length)


def plan_disk(
    shape: ModelShape,
    hp: Hyperparameters,
    data_dir: Path,
    rows: int | None = None,
    *,
    method: str = "sft",
    row_format: str | None = None,
) -> DiskPlan:
    """An intermediate checkpoint holds the bf16 weights and the optimizer states; the final
    model the weights alone. How many are kept at once: save_total_limit, or every save when
    the steps are known (max_steps, or `rows` counted before queuing, without packing); else the
    count is unknown until the data is read."""
    weights = 2 * shape.parameters
    checkpoint = weights + OPTIMIZER_BYTES_PER_PARAM[hp.optim] * shape.parameters
    sequences = training_sequences(method, rows, hp, row_format) if rows else None
    steps = hp.max_steps or (optimizer_steps(hp, sequences) if sequences and not hp.packing else None)
    saves = steps // hp.save_steps if steps else None
    kept = (
        min(x for x in (hp.save_total_limit, saves) if x is not None)
        if (hp.save_total_limit is not None or saves is not None)
        else None
    )
    data_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(data_dir).free
    required = None if kept is None else kept * checkpoint + weights
    return DiskPlan(checkpoint, weights, kept, required, free, None if required is None else required <= free)


def gib(value: int | None) -> str:
    return "unknown" if value is None else f"{value / GIB:.1f} GiB"


def per_gpu(memory: MemoryPlan) -> str:
    return f" on each of its {memory.gpus} GPUs ({memory.strategy})" if memory.gpus > 1 else ""


def refusal(spec: JobSpec, memory: MemoryPlan | None, disk: DiskPlan | None) -> str | None:
    """The 422 message for a job that cannot run here, or None."""
    if memory is not None and memory.verdict == "does_not_fit":
        parts = ", ".join(f"{name} {gib(size)}" for name, size in memory.parts.items())
        head = (
            f"this job needs about {gib(memory.total_bytes)} of GPU memory{per_gpu(memory)} ({parts}) and the GPU has "
            f"{gib(memory.gpu_memory_bytes)}"
        )
        hp = spec.hyperparameters
        spread = (
            f"; or spread it over {memory.gpus_needed} GPUs of this size (gpus: {memory.gpus_needed}, strategy fsdp)"
            if memory.gpus_needed and memory.gpus_needed > spec.gpus
            else ""
        )
        if "generation" in memory.parts and memory.parts["generation"] > memory.parts["activations"]:
            return (
                f"{head}; most of it is the KV cache of the {generation_batch(hp)} completions generated at once "
                "(per_device_train_batch_size x steps_per_generation): lower steps_per_generation, num_generations "
                f"or max_seq_length{spread}"
            )
        if "reference_model" in memory.parts and not memory.max_micro_batch:
            instead = (
                "set beta to 0 (no KL term, so no reference model)"
                if spec.method == "grpo"
                else "set precompute_ref_log_probs: true to compute the reference model's log-probabilities once "
                "before training instead of holding it on the GPU"
            )
            return f"{head}; {instead}, or train a smaller model{spread}"
        if not memory.max_micro_batch and not memory.max_seq_length:
            return f"{head}; the model alone does not fit this card: train a smaller model or use a larger GPU{spread}"
        return (
            f"{head}; at max_seq_length {hp.max_seq_length} the largest micro-batch that fits is "
            f"{memory.max_micro_batch}, and at micro-batch {hp.micro_batch} the longest "
            f"max_seq_length is {memory.max_seq_length}{spread}"
        )
    if disk is not None and disk.fits is False:
        return (
            f"the checkpoints would need {gib(disk.required_bytes)} under DATA_DIR ({disk.checkpoints_kept} "
            f"checkpoint(s) of {gib(disk.checkpoint_bytes)} plus the final model of {gib(disk.final_bytes)}) "
            f"and {gib(disk.free_bytes)} is free; set save_total_limit, raise save_steps or free space"
        )
    return None
