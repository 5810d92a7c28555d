"""The API's requests and responses (the job spec itself is core/spec.py's)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
)

from core.contract import CheckpointStatus, ErrorCode, EventKind, JobStatus, Phase
from core.data_report import DataReport
from core.spec import JobSpec


class EstimateRequest(JobSpec):
    """A job spec, plus optionally the GPU to plan for (default: the workers' smallest GPU)."""

    gpu_memory_bytes: int | None = Field(default=None, gt=0, description="plan for a card of this size")


# ---- responses ------------------------------------------------------------------------------


class Progress(BaseModel):
    step: int
    total_steps: int | None
    epoch: float | None
    percent: float | None
    eta_seconds: float | None
    stalled_since: datetime | None = Field(
        default=None,
        description="set while a running job has taken no training step for STALL_AFTER_S: when it last did",
    )


class Metrics(BaseModel):
    loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = Field(
        default=None, description="the latest logging window's tokens/s (evaluations and checkpoint saves left out)"
    )
    tokens_per_second_mean: float | None = Field(
        default=None,
        description="the whole job's tokens/s: all its tokens over all its training time, each attempt's first "
        "(compiling) step, evaluations and checkpoint saves left out",
    )
    trained_tokens: int | None = Field(
        default=None,
        description="the tokens the job's trainers trained on, added as each attempt ends (the steps a resumed job "
        "trains again count again); null until one has",
    )
    eval_loss: float | None = Field(default=None, description="the validation set's loss at its latest evaluation")
    eval_step: int | None = Field(default=None, description="the step of that evaluation")
    method_metrics: dict[str, float | None] | None = Field(
        default=None,
        description="the latest step log's figures of the job's method under TRL's names (dpo: rewards/margins, "
        "rewards/accuracies, ...; grpo: reward, reward_std, kl, completions/mean_length, ...)",
    )


class TrainerPath(BaseModel):
    """Which trainer ran the job."""

    method: str = Field(description="sft, dpo, orpo, kto or grpo")
    trainer_class: str = Field(description="the class that trained, e.g. UnslothDPOTrainer or DPOTrainer")
    path: Literal["unsloth", "trl"] = Field(
        description="unsloth: Unsloth's patched TRL trainer (with backend unsloth, where Unsloth has one); trl: "
        "TRL's own trainer"
    )
    reference: str | None = Field(
        default=None,
        description="how the reference log-probabilities were had: 'model' (a reference model held beside the "
        "policy), 'precomputed' (once, before training), or null (the method has no reference)",
    )
    precision: Literal["bf16", "fp8", "fp32"] | None = Field(
        default=None,
        description="the matmuls' precision: the spec's precision on a GPU, fp32 on a CPU (null: recorded before "
        "precisions were)",
    )
    fp8_recipe: Literal["tensorwise", "rowwise"] | None = Field(
        default=None, exclude_if=lambda value: value is None, description="fp8: torchao's recipe (absent otherwise)"
    )
    fp8_layers: int | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="fp8: the Linear layers that computed in float8 (absent otherwise)",
    )
    fp8_compiled: bool | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="fp8: whether each of them was compiled, FP8_COMPILE (absent otherwise)",
    )
    padding_free: bool | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="sft: whether a micro-batch's rows ran as one row without padding (TRL's padding_free, as "
        "its config ended up; absent for other methods and for jobs recorded before it was)",
    )


class GpuVram(BaseModel):
    allocated: int | None = None
    reserved: int | None = None
    peak_allocated: int | None = None
    device_used: int | None = None
    device_total: int | None = None
    device_used_peak: int | None = None


class Vram(BaseModel):
    allocated: int | None = None
    reserved: int | None = None
    peak_allocated: int | None = None
    device_used: int | None = None
    device_total: int | None = None
    device_used_peak: int | None = Field(default=None, description="highest device_used seen so far (job record)")
    allocated_gib: float | None = None
    reserved_gib: float | None = None
    peak_allocated_gib: float | None = None
    device_used_gib: float | None = None
    device_total_gib: float | None = None
    device_used_peak_gib: float | None = None


class JobVram(Vram):
    """The job record's VRAM: with several GPUs, the largest of each figure, and each GPU's."""

    per_gpu: list[GpuVram] | None = Field(
        default=None,
        description="a job on several GPUs: each rank's figures (in rank order); the fields above are then "
        "the largest of them",
    )


class PlacedGpu(BaseModel):
    index: int = Field(description="the card's index as nvidia-smi numbers it")
    name: str
    uuid: str
    memory_bytes: int | None = None


class RankPlacement(BaseModel):
    """Where Ray placed one rank of the job (RAY_ADDRESS)."""

    rank: int
    host: str
    node_ip: str
    node_id: str = Field(description="the Ray node's id")
    gpus: str | None = Field(description="the node's GPUs Ray gave the job's ranks there (CUDA_VISIBLE_DEVICES)")


class Placement(BaseModel):
    """Where the job runs (set when a worker starts it; the latest attempt's)."""

    host: str
    gpus: list[PlacedGpu] = Field(description="the GPUs leased to the job (empty on a host without GPUs)")
    world_size: int = Field(description="training processes (ranks), one per GPU")
    strategy: Literal["single", "ddp", "fsdp"]
    effective_batch: int = Field(
        description="sequences per optimizer step: per_device_train_batch_size x gradient_accumulation_steps x gpus"
    )
    fsdp_layout: Literal["fit", "sharded"] | None = Field(
        default=None, description="fsdp: the planner's layout for these GPUs (POST /jobs/estimate's memory.fsdp_layout)"
    )
    ranks: list[RankPlacement] | None = Field(
        default=None,
        exclude_if=lambda ranks: ranks is None,
        description="with Ray (RAY_ADDRESS): the host and GPUs of each rank, as Ray placed them; absent otherwise",
    )


class JobError(BaseModel):
    code: ErrorCode
    code_raw: str | None = Field(
        default=None,
        exclude_if=lambda raw: raw is None,
        description="the word stored when code is `unknown`: one this version of the service does not know, "
        "written by another version (a rolling upgrade); absent otherwise",
    )
    message: str


class JobPublic(BaseModel):
    """The job record, as GET /jobs/{id} returns it."""

    id: int
    project: str = Field(description="the project the job belongs to: only its tokens (and admins) see it")
    submitted_by: str | None = Field(
        description="the principal whose token submitted it (null: no tokens, or one of API_TOKENS)"
    )
    status: JobStatus
    status_raw: str | None = Field(
        default=None,
        exclude_if=lambda raw: raw is None,
        description="the word stored when status is `unknown`: one this version of the service does not know, "
        "written by another version (a rolling upgrade); absent otherwise",
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    spec: dict[str, Any]
    backend: str | None
    versions: dict[str, Any] | None
    trainer: TrainerPath | None = Field(default=None, description="which trainer ran it (once it has started)")
    attempts: int
    phase: Phase | None = Field(description="what a running job is doing (null once it has ended)")
    phase_raw: str | None = Field(
        default=None,
        exclude_if=lambda raw: raw is None,
        description="the word stored when phase is `unknown`: one this version of the service does not know, "
        "written by another version (a rolling upgrade); absent otherwise",
    )
    cancel_requested: bool
    progress: Progress
    metrics: Metrics
    vram: JobVram
    placement: Placement | None = Field(description="host, GPUs and strategy of the job's latest start")
    data_report: DataReport | None = Field(
        description="rows are checked before queuing for local files; token figures come from the job's "
        "first phase, before the model is loaded; a figure not measured yet is absent (docs/datasets.md)"
    )
    error: JobError | None
    links: dict[str, str]


class JobPage(BaseModel):
    items: list[JobPublic]
    next_cursor: int | None = Field(description="pass as ?cursor= for the next (older) page; null at the end")


class StepLogPublic(BaseModel):
    step: int
    epoch: float | None
    created_at: datetime
    loss: float | None
    learning_rate: float | None
    grad_norm: float | None
    tokens_per_second: float | None
    num_tokens: int | None
    eval_loss: float | None = Field(description="set on steps where the validation set was evaluated")
    method_metrics: dict[str, float | None] | None = Field(
        default=None,
        description="the method's own figures under TRL's names: dpo rewards/chosen, rewards/rejected, "
        "rewards/margins, rewards/accuracies; grpo reward, reward_std, kl, completions/mean_length; "
        "eval_-prefixed ones at evaluated steps",
    )
    vram: Vram


class StepLogPage(BaseModel):
    items: list[StepLogPublic]
    next_after_step: int | None


class EventPublic(BaseModel):
    id: int
    created_at: datetime
    kind: EventKind
    kind_raw: str | None = Field(
        default=None,
        exclude_if=lambda raw: raw is None,
        description="the word stored when kind is `unknown`: one this version of the service does not know, "
        "written by another version (a rolling upgrade); absent otherwise",
    )
    message: str


class EventPage(BaseModel):
    items: list[EventPublic]
    next_after_id: int | None


class CheckpointFile(BaseModel):
    path: str
    size: int
    sha256: str | None = Field(
        description="the file's sha256 as it was saved (null while still being hashed); a download of a file "
        "that changed since is sent without X-Checksum-SHA256, and the file is verified"
    )
    url: str
    corrupt: bool = Field(
        default=False,
        description="a verification found the file no longer matching its sha256: it is not served (409)",
    )


class WebhookDeliveryPublic(BaseModel):
    id: int
    url: str
    event: str
    status: str = Field(
        description="pending, sending (claimed by a sender; taken back after WEBHOOK_CLAIM_LEASE_S if that "
        "sender died), delivered or failed"
    )
    attempts: int
    created_at: datetime
    next_attempt_at: datetime
    last_status_code: int | None
    last_error: str | None
    claimed_at: datetime | None = Field(default=None, description="when a sender last claimed it to send it")
    claimed_by: str | None = Field(default=None, description="that sender: host:pid of an API process")


class WebhookDeliveryList(BaseModel):
    items: list[WebhookDeliveryPublic] = Field(description="the job's deliveries, oldest first (no paging)")


class DeletedPublic(BaseModel):
    freed_bytes: int = Field(description="bytes removed from the disk under DATA_DIR")
    files: int = Field(description="files removed")


class OrphanPublic(BaseModel):
    path: str = Field(description="relative to DATA_DIR")
    bytes: int
    reason: str


class StoragePublic(BaseModel):
    free_bytes: int
    total_bytes: int
    jobs_bytes: int = Field(description="job folders: checkpoints, trainer logs")
    files_bytes: int = Field(description="uploaded datasets")
    cache_bytes: int = Field(description="compile caches of Unsloth, torch.compile and Triton")
    orphans: list[OrphanPublic] = Field(description="files on disk that no record names")


class CheckpointPublic(BaseModel):
    name: str
    step: int
    created_at: datetime
    status: CheckpointStatus
    status_raw: str | None = Field(
        default=None,
        exclude_if=lambda raw: raw is None,
        description="the word stored when status is `unknown`: one this version of the service does not know, "
        "written by another version (a rolling upgrade); absent otherwise",
    )
    size: int
    files: list[CheckpointFile]
    archive_url: str
    verified_at: datetime | None = Field(
        default=None,
        description="when its files were last hashed whole and held against the sha256 they were saved with "
        "(at hashing, then every CHECKPOINT_VERIFY_INTERVAL_S, or on request)",
    )
    verify_requested_at: datetime | None = Field(
        default=None, description="a verification asked for (POST .../verify) and not yet done"
    )


class CheckpointList(BaseModel):
    items: list[CheckpointPublic] = Field(description="every kept checkpoint, oldest step first (no paging)")


class FilePublic(BaseModel):
    """An uploaded dataset file, as POST /files and GET /files/{id} return it."""

    id: int
    project: str = Field(description="the project the file belongs to: only its jobs may train on it")
    created_at: datetime
    filename: str = Field(description="the name the client uploaded it under")
    size: int
    sha256: str
    row_format: (
        Literal[
            "messages",
            "prompt_completion",
            "text",
            "preference",
            "openai_preference",
            "implicit_preference",
            "unpaired_preference",
            "prompt_only",
        ]
        | None
    ) = Field(
        description="the first format the columns fit: messages, prompt_completion, text (sft), preference, "
        "openai_preference, implicit_preference (dpo, orpo, kto), unpaired_preference (kto), prompt_only (grpo); "
        "null when none fits the columns as uploaded (a job's dataset.columns can map them). A job checks the "
        "rows again against its method's formats"
    )
    columns: list[str]
    rows: int = Field(description="every row, good or bad")
    bad_rows: int = Field(
        description="rows that are not valid JSON objects or not of the row format; a job "
        "skips them, or is refused when they are more than MAX_BAD_ROW_FRACTION of the rows"
    )
    bad_row_examples: list[str] = Field(description="the first few, with line (JSON Lines) or row numbers")


class FileList(BaseModel):
    items: list[FilePublic]


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    database: str
    redis: str
    disk: str = Field(description="ok, or low: the free space under DATA_DIR is below MIN_FREE_DISK_BYTES")
    disk_free_bytes: int
    disk_total_bytes: int


class MemoryEstimate(BaseModel):
    total_bytes: int = Field(description="expected peak device memory, as nvidia-smi would show it")
    total_gib: float
    parts: dict[str, int] = Field(
        description="weights, gradients, optimizer_states, activations, cuda_context, allocator_overhead, and with "
        "several GPUs ddp_buckets (ddp), gathered_weights_and_gradients (fsdp, fit layout) or gathered_layers "
        "(fsdp, sharded layout): bytes on one GPU"
    )
    optimizer_paged: bool
    parameters: int
    gpu_memory_bytes: int | None = Field(description="the GPU planned for; null when unknown")
    verdict: Literal["fits", "fits_with_paging", "does_not_fit"] | None
    max_micro_batch: int | None = Field(description="largest micro-batch that fits at this max_seq_length")
    max_seq_length: int | None = Field(description="longest max_seq_length that fits at this micro-batch")
    gpus: int = Field(description="the plan is for each of this many GPUs (the spec's gpus)")
    strategy: Literal["single", "ddp", "fsdp"] = Field(description="the strategy planned (auto resolved)")
    gpus_needed: int | None = Field(
        description="the fewest GPUs of this size that hold the job without paging (FSDP beyond one); null "
        "when the GPU is unknown or not even 64 do"
    )
    fsdp_layout: Literal["fit", "sharded"] | None = Field(
        default=None,
        description="fsdp: 'fit' when one GPU holds the job with its weights kept gathered through each step "
        "(fastest), else 'sharded' (weights, gradients and optimizer states divided among the GPUs); null otherwise",
    )


class AutoMicroBatch(BaseModel):
    """per_device_train_batch_size "auto": what the trainer will choose among."""

    candidates: list[int] = Field(
        description="the micro-batches the trainer times, largest first; the memory is planned for the first"
    )
    sequences_per_step: int = Field(description="the effective batch each keeps (micro-batch x accumulation)")


class DiskEstimate(BaseModel):
    checkpoint_bytes: int = Field(description="one intermediate checkpoint: weights and optimizer states")
    final_bytes: int
    checkpoints_kept: int | None = Field(description="null when neither save_total_limit nor max_steps bounds it")
    required_bytes: int | None
    free_bytes: int
    fits: bool | None


class TimeEstimate(BaseModel):
    tokens_per_second: float = Field(
        description="the planner's tokens/s for the job: GPU_TRAIN_FLOPS per GPU at 8 FLOPs per parameter and token"
    )
    seconds: float | None = Field(
        description="training time at that rate with every sequence max_seq_length long; null when the tokens "
        "are not known (no max_steps)"
    )


class MeasurementUsed(BaseModel):
    """A finished job's measurement that the learned estimate used."""

    id: int
    job_id: int
    created_at: datetime
    model: str
    card: str
    card_memory_bytes: int | None
    micro_batch: int
    gradient_accumulation_steps: int
    max_seq_length: int
    steps: int
    planned_bytes: int | None
    peak_bytes: int | None = Field(description="the job's NVML device-used peak (null on a host without GPUs)")
    planned_tokens_per_second: float | None
    tokens_per_second: float | None = Field(description="the whole job's tokens/s, its first step left out")
    distance: float = Field(description="how far its shape is from the spec's (docs/planner.md)")


class LearnedEstimate(BaseModel):
    """The estimate corrected by the closest measured jobs of the same shape (docs/planner.md)."""

    total_bytes: int | None = Field(description="expected NVML peak; null when none of them measured one")
    total_gib: float | None
    verdict: Literal["fits", "fits_with_paging", "does_not_fit"] | None
    tokens_per_second: float | None
    seconds: float | None = Field(description="null when the tokens are not known (no max_steps)")
    measurements: list[MeasurementUsed] = Field(description="closest first")


class Estimate(BaseModel):
    memory: MemoryEstimate
    disk: DiskEstimate
    auto_micro_batch: AutoMicroBatch | None = Field(
        default=None, description='per_device_train_batch_size "auto": the candidates (null otherwise)'
    )
    time: TimeEstimate
    learned: LearnedEstimate | None = Field(
        description="null until a finished job of the same model shape, method, optimizer, precision, GPUs and "
        "card size measured something close to this spec"
    )
