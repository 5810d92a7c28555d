"""The public contract: job specs coming in, records going out. Names follow TRL's SFTConfig."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from app.rows import COLUMN_NAMES
from core.contract import CheckpointStatus, ErrorCode, EventKind, JobStatus, Phase

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")
LOCAL_PATH_PREFIXES = ("/", "./", "../", "~")
SPLIT_PATTERN = r"^[A-Za-z0-9_.\[\]:%+-]{1,64}$"
# The largest id, step or cursor the database holds (a signed 64-bit integer): anything larger is
# a 422, not an overflow inside the database driver.
MAX_DB_INT = 2**63 - 1


def _written_in_digits(value: object) -> object:
    # Pydantic reads " 3", "\v3", "+3" and "3_000" as numbers too; in a URL that is a typo or a
    # probe, and the document says integer.
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError("must be a whole number written in digits (0-9)")
    return value


# An integer in a URL's path or query string.
UrlInt = Annotated[int, BeforeValidator(_written_in_digits)]

Backend = Literal["auto", "unsloth", "transformers"]
Optimizer = Literal[
    "paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw_torch", "adamw_torch_fused", "adafactor", "sgd"
]
Scheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay",
]
# Optimizers that bitsandbytes implements on CUDA only; a CPU run swaps them for adamw_torch.
GPU_ONLY_OPTIMIZERS = frozenset({"paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit"})


def source_shape(value: str, what: str) -> str:
    """A Hub id, or a local path (starting with /, ./, ../ or ~): the shape only. Whether a local
    path may be used on this server is checked once, at submit (app/sources.py)."""
    value = value.strip()
    if not value:
        raise ValueError(f"{what} must not be empty")
    if value.startswith(LOCAL_PATH_PREFIXES):
        return value
    if ".." in value or not HUB_ID_RE.match(value):
        raise ValueError(
            f"{what} {value!r} is neither a Hugging Face Hub id (like 'org/name') "
            "nor a local path (starting with '/')"
        )
    return value


class DatasetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Left out when file_id names the data; the stored spec then has both (the trainer reads source).
    source: str = Field(default="", description="Hub dataset id, or a local JSON Lines / JSON / Parquet file "
                        "or a folder saved by `datasets`")
    file_id: int | None = Field(default=None, ge=1, le=MAX_DB_INT, description="a file uploaded with POST /files, "
                                "instead of source; the stored spec then holds both")
    split: str = Field(default="train", pattern=SPLIT_PATTERN)
    columns: dict[str, str] = Field(
        default_factory=dict, description="our column name -> the dataset's, for datasets whose fields have "
        "other names, e.g. {\"prompt\": \"question\", \"completion\": \"answer\"}; applies to the validation set too")

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        return source_shape(value, "dataset source") if value else value

    @field_validator("columns")
    @classmethod
    def _columns(cls, value: dict[str, str]) -> dict[str, str]:
        for ours, theirs in value.items():
            if ours not in COLUMN_NAMES:
                raise ValueError(f"columns: {ours!r} is not one of our column names {sorted(COLUMN_NAMES)}; "
                                 "map each of ours to the dataset's, e.g. {\"prompt\": \"question\"}")
            if not theirs.strip():
                raise ValueError(f"columns.{ours} must name a column of the dataset")
        if len(set(value.values())) != len(value):
            raise ValueError("columns maps two of our names onto the same dataset column")
        return value

    @model_validator(mode="after")
    def _one_of_source_and_file(self) -> DatasetSpec:
        if not self.source and self.file_id is None:
            raise ValueError("give dataset.source (a Hub id or a local path) or dataset.file_id (an uploaded file)")
        return self


class ValidationSpec(BaseModel):
    """Where the validation set comes from: a fraction of the training rows held out with the
    job's seed, another split of the dataset's source, or another file or source."""

    model_config = ConfigDict(extra="forbid")

    fraction: float | None = Field(default=None, gt=0, le=0.5, description="hold out this share of the training "
                                   "rows (after the checks), chosen with hyperparameters.seed")
    source: str = Field(default="", description="a Hub dataset id or local file, like dataset.source")
    file_id: int | None = Field(default=None, ge=1, le=MAX_DB_INT, description="an uploaded file")
    split: str | None = Field(default=None, pattern=SPLIT_PATTERN, description="alone: this split of "
                              "dataset.source; with source: that source's split (default 'train')")

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        return source_shape(value, "validation source") if value else value

    @model_validator(mode="after")
    def _one_kind(self) -> ValidationSpec:
        named = bool(self.source) or self.file_id is not None
        if self.fraction is not None and (named or self.split):
            raise ValueError("validation takes a fraction of the training rows, or a split, source or file_id; "
                             "not both")
        if self.fraction is None and not named and not self.split:
            raise ValueError("give validation.fraction, validation.split, validation.source or validation.file_id")
        return self


class Hyperparameters(BaseModel):
    """The SFTConfig fields a job may set; the defaults are the standard Unsloth full fine-tune."""

    model_config = ConfigDict(extra="forbid")

    per_device_train_batch_size: int = Field(default=2, ge=1, le=1024)
    gradient_accumulation_steps: int = Field(default=64, ge=1, le=65536)
    max_seq_length: int = Field(default=4096, ge=16, le=1_048_576)
    learning_rate: float = Field(default=5e-6, gt=0, le=1)
    num_train_epochs: float = Field(default=2, gt=0, le=1000)
    max_steps: int | None = Field(default=None, ge=1, description="overrides num_train_epochs when set")
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    lr_scheduler_type: Scheduler = "linear"
    optim: Optimizer = "paged_adamw_8bit"
    weight_decay: float = Field(default=0.0, ge=0, le=10)
    max_grad_norm: float = Field(default=1.0, gt=0)
    seed: int = Field(default=42, ge=0, le=2**32 - 1)
    logging_steps: int = Field(default=25, ge=1)
    save_steps: int = Field(default=10000, ge=1)
    save_total_limit: int | None = Field(default=None, ge=1)
    # What the loss is computed on (TRL's names and defaults).
    completion_only_loss: bool | None = Field(
        default=None, description="prompt/completion rows: train on the completion only (null: yes, as TRL does)")
    assistant_only_loss: bool = Field(
        default=False, description="chat rows: train on the assistant turns only (the chat template needs "
        "{% generation %} markers; TRL adds them for the templates it knows)")
    packing: bool = Field(default=False, description="pack several rows into each max_seq_length sequence "
                          "(TRL's best-fit decreasing packing)")
    eval_steps: int | None = Field(default=None, ge=1, description="evaluate the validation set every this many "
                                   "steps (null: every logging_steps)")
    per_device_eval_batch_size: int | None = Field(default=None, ge=1, le=1024,
                                                   description="null: per_device_train_batch_size")


# The standard recipe, shown in POST /jobs's description.
JOB_SPEC_EXAMPLE: dict[str, Any] = {
    "model": "meta-llama/Llama-3.1-8B",
    "dataset": {"source": "allenai/tulu-3-sft-mixture", "split": "train"},
    "chat_template_from": "allenai/Llama-3.1-Tulu-3-8B",
    "backend": "auto",
    "hyperparameters": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 64},
}


class JobSpec(BaseModel):
    """What a client sends to POST /jobs."""

    model_config = ConfigDict(
        extra="forbid",
    )

    model: str = Field(min_length=1, description="Hub model id or a local Hugging Face model folder")
    dataset: DatasetSpec
    chat_template_from: str | None = Field(
        default=None, description="take the chat template from this tokenizer instead of the model's"
    )
    validation: ValidationSpec | None = Field(default=None, description="a validation set, evaluated every "
                                              "eval_steps; its loss is eval_loss in the step logs")
    backend: Backend = "auto"
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)

    @model_validator(mode="after")
    def _loss_options(self) -> JobSpec:
        hp = self.hyperparameters
        if hp.assistant_only_loss and hp.completion_only_loss:
            raise ValueError("hyperparameters: assistant_only_loss is for chat rows and completion_only_loss for "
                             "prompt/completion rows; set one of them")
        if self.validation is None and (hp.eval_steps or hp.per_device_eval_batch_size):
            raise ValueError("hyperparameters.eval_steps and per_device_eval_batch_size need a validation set "
                             "(validation: {\"fraction\": 0.02}, a split, a source or a file_id)")
        return self

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        return source_shape(value, "model")

    @field_validator("chat_template_from")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        return None if value is None else source_shape(value, "chat_template_from")


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


class Metrics(BaseModel):
    loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    eval_loss: float | None = Field(default=None, description="the validation set's loss at its latest evaluation")
    eval_step: int | None = Field(default=None, description="the step of that evaluation")


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


class JobError(BaseModel):
    code: ErrorCode
    message: str


class JobPublic(BaseModel):
    """The job record, as GET /jobs/{id} returns it."""

    id: int
    status: JobStatus
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    spec: dict[str, Any]
    backend: str | None
    versions: dict[str, Any] | None
    attempts: int
    phase: Phase | None = Field(description="what a running job is doing (null once it has ended)")
    cancel_requested: bool
    progress: Progress
    metrics: Metrics
    vram: Vram
    data_report: dict[str, Any] | None = Field(
        description="rows, bad_rows with examples, tokens per row (min, median, p95, max), rows_truncated, "
                    "tokens_cut_by_truncation, tokens_per_epoch, loss_tokens_per_epoch, optimizer_steps, "
                    "tokens_to_train, validation; rows are checked before queuing for local files, token figures "
                    "come from the job's first phase, before the model is loaded (docs/datasets.md)")
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
    vram: Vram


class StepLogPage(BaseModel):
    items: list[StepLogPublic]
    next_after_step: int | None


class EventPublic(BaseModel):
    id: int
    created_at: datetime
    kind: EventKind
    message: str


class EventPage(BaseModel):
    items: list[EventPublic]
    next_after_id: int | None


class CheckpointFile(BaseModel):
    path: str
    size: int
    sha256: str | None = Field(description="null while the file is still being hashed")
    url: str


class CheckpointPublic(BaseModel):
    name: str
    step: int
    created_at: datetime
    status: CheckpointStatus
    size: int
    files: list[CheckpointFile]
    archive_url: str


class FilePublic(BaseModel):
    """An uploaded dataset file, as POST /files and GET /files/{id} return it."""

    id: int
    created_at: datetime
    filename: str = Field(description="the name the client uploaded it under")
    size: int
    sha256: str
    row_format: Literal["messages", "prompt_completion", "text"] | None = Field(
        description="null when no format fits the columns as uploaded; a job's dataset.columns can map them")
    columns: list[str]
    rows: int = Field(description="every row, good or bad")
    bad_rows: int = Field(description="rows that are not valid JSON objects or not of the row format; a job "
                          "skips them, or is refused when they are more than MAX_BAD_ROW_FRACTION of the rows")
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
    parts: dict[str, int] = Field(description="weights, gradients, optimizer_states, activations, "
                                  "cuda_context, allocator_overhead (bytes)")
    optimizer_paged: bool
    parameters: int
    gpu_memory_bytes: int | None = Field(description="the GPU planned for; null when unknown")
    verdict: Literal["fits", "fits_with_paging", "does_not_fit"] | None
    max_micro_batch: int | None = Field(description="largest micro-batch that fits at this max_seq_length")
    max_seq_length: int | None = Field(description="longest max_seq_length that fits at this micro-batch")


class DiskEstimate(BaseModel):
    checkpoint_bytes: int = Field(description="one intermediate checkpoint: weights and optimizer states")
    final_bytes: int
    checkpoints_kept: int | None = Field(description="null when neither save_total_limit nor max_steps bounds it")
    required_bytes: int | None
    free_bytes: int
    fits: bool | None


class Estimate(BaseModel):
    memory: MemoryEstimate
    disk: DiskEstimate
