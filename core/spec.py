"""The job spec: what a client sends to POST /jobs, as the API stores it and the trainer reads it.
Names follow TRL's configs (SFTConfig, DPOConfig, ...). Shapes only: whether a local path may be
used on a host, or a reward module named, is checked once, at submit (app/sources.py)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from core.graders import Grader
from core.methods import GRPO_SCALE_REWARDS, METHOD_OPTIONS, SFT_OPTIONS, Method, facts, methods_of_option
from core.rows import COLUMN_NAMES

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


# How much of a value an error message quotes: an answer never grows with what was sent.
ECHO_MAX_CHARS = 200


def echo(value: object) -> str:
    """repr(value) for an error message, cut to ECHO_MAX_CHARS (with the length of what was cut)."""
    shown = repr(value)
    if len(shown) <= ECHO_MAX_CHARS:
        return shown
    length = f", {len(value):,} characters" if isinstance(value, str) else ""
    return f"{shown[:ECHO_MAX_CHARS]}... (cut{length})"


# An integer in a URL's path or query string.
UrlInt = Annotated[int, BeforeValidator(_written_in_digits)]

Backend = Literal["auto", "unsloth", "transformers"]
Strategy = Literal["auto", "ddp", "fsdp"]
# The precision of the model's matmuls: bf16 (the recipe's), fp8 through torchao's float8 training
# (docs/benchmarks.md, "Faster than the recipe"), or auto: the trainer chooses fp8 where it was measured
# to pay and hold the loss (trainer/precision.resolve_precision), else bf16. Fp8Recipe is torchao's
# scaling recipe.
Precision = Literal["auto", "bf16", "fp8"]
Fp8Recipe = Literal["tensorwise", "rowwise"]
# The most GPUs one job may ask for: the GPUs of one host (hosts of 8 are the common large kind).
MAX_GPUS_PER_JOB = 64
# A job's priority in the GPU line: -100 to 100; members up to MEMBER_MAX_PRIORITY (app/quotas.py).
MAX_PRIORITY = 100
Optimizer = Literal[
    "paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw_torch", "adamw_torch_fused", "adafactor", "sgd"
]
Scheduler = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
]
# per_device_train_batch_size "auto" keeps the effective batch of the recipe's micro-batch of 2 with the
# job's gradient_accumulation_steps (core/planner.auto_micro_batches).
AUTO_BASE_MICRO_BATCH = 2
MAX_MICRO_BATCH = 1024


def _micro_batch(value: Any) -> int | str:
    """A micro-batch: a whole number from 1 to MAX_MICRO_BATCH (as pydantic reads an integer: 2,
    2.0, "2"), or "auto"; one error naming both when it is neither."""
    if value == "auto":
        return "auto"
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    if number is None or not 1 <= number <= MAX_MICRO_BATCH:
        raise PydanticCustomError(
            "micro_batch", f'Input should be a valid integer from 1 to {MAX_MICRO_BATCH}, or "auto"'
        )
    return number


MicroBatch = Annotated[
    int | Literal["auto"],
    PlainValidator(_micro_batch),
    WithJsonSchema(
        {"anyOf": [{"type": "integer", "minimum": 1, "maximum": MAX_MICRO_BATCH}, {"type": "string", "enum": ["auto"]}]}
    ),
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
            f"{what} {echo(value)} is neither a Hugging Face Hub id (like 'org/name') "
            "nor a local path (starting with '/')"
        )
    return value


class DatasetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Left out when file_id names the data; the stored spec then has both (the trainer reads source).
    source: str = Field(
        default="",
        description="Hub dataset id, or a local JSON Lines / JSON / Parquet file or a folder saved by `datasets`",
    )
    file_id: int | None = Field(
        default=None,
        ge=1,
        le=MAX_DB_INT,
        description="a file uploaded with POST /files, instead of source; the stored spec then holds both",
    )
    split: str = Field(default="train", pattern=SPLIT_PATTERN)
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="our column name -> the dataset's, for datasets whose fields have "
        'other names, e.g. {"prompt": "question", "completion": "answer"}; applies to the validation set too',
    )

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        return source_shape(value, "dataset source") if value else value

    @field_validator("columns")
    @classmethod
    def _columns(cls, value: dict[str, str]) -> dict[str, str]:
        for ours, theirs in value.items():
            if ours not in COLUMN_NAMES:
                raise ValueError(
                    f"columns: {echo(ours)} is not one of our column names {sorted(COLUMN_NAMES)}; "
                    'map each of ours to the dataset\'s, e.g. {"prompt": "question"}'
                )
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

    fraction: float | None = Field(
        default=None,
        gt=0,
        le=0.5,
        description="hold out this share of the training rows (after the checks), chosen with hyperparameters.seed",
    )
    source: str = Field(default="", description="a Hub dataset id or local file, like dataset.source")
    file_id: int | None = Field(default=None, ge=1, le=MAX_DB_INT, description="an uploaded file")
    split: str | None = Field(
        default=None,
        pattern=SPLIT_PATTERN,
        description="alone: this split of dataset.source; with source: that source's split (default 'train')",
    )

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        return source_shape(value, "validation source") if value else value

    @model_validator(mode="after")
    def _one_kind(self) -> ValidationSpec:
        named = bool(self.source) or self.file_id is not None
        if self.fraction is not None and (named or self.split):
            raise ValueError(
                "validation takes a fraction of the training rows, or a split, source or file_id; not both"
            )
        if self.fraction is None and not named and not self.split:
            raise ValueError("give validation.fraction, validation.split, validation.source or validation.file_id")
        return self


class Hyperparameters(BaseModel):
    """The SFTConfig fields a job may set; the defaults are the standard Unsloth full fine-tune."""

    model_config = ConfigDict(extra="forbid")

    per_device_train_batch_size: MicroBatch = Field(
        default=2,
        description='sequences per GPU per forward pass; "auto" (method sft, one GPU): the largest micro-batch the '
        "planner says fits, then a few timed steps of the candidates pick the fastest; the effective batch stays "
        "the recipe's micro-batch 2 x gradient_accumulation_steps (docs/benchmarks.md)",
    )
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
        default=None, description="prompt/completion rows: train on the completion only (null: yes, as TRL does)"
    )
    assistant_only_loss: bool = Field(
        default=False,
        description="chat rows: train on the assistant turns only (the chat template needs "
        "{% generation %} markers; TRL adds them for the templates it knows)",
    )
    packing: bool = Field(
        default=False,
        description="pack several rows into each max_seq_length sequence (TRL's best-fit decreasing packing)",
    )
    padding_free: bool | None = Field(
        default=None,
        description="a micro-batch's rows as one row without padding (TRL's padding_free); null: padded rows, "
        "unless packing is on (measured faster on an H100: docs/benchmarks.md)",
    )
    eval_steps: int | None = Field(
        default=None, ge=1, description="evaluate the validation set every this many steps (null: every logging_steps)"
    )
    per_device_eval_batch_size: int | None = Field(
        default=None, ge=1, le=1024, description="null: per_device_train_batch_size"
    )
    # Preference and reward methods' own (TRL's names; null: the method's TRL default, which the
    # stored spec of a job of that method shows). Each applies to the methods named; any other
    # method refuses it (docs/methods.md).
    beta: float | None = Field(
        default=None,
        ge=0,
        le=100,
        description="dpo, orpo, kto, grpo: how far the policy may move from the reference (dpo, kto: 0.1; orpo: "
        "the odds-ratio loss's weight, 0.1; grpo: the KL term's, 0.0: no reference model, no kl)",
    )
    loss_type: str | None = Field(
        default=None, max_length=32, description="dpo (sigmoid), kto (kto) and grpo (dapo): TRL's loss variants"
    )
    label_smoothing: float | None = Field(
        default=None, ge=0, lt=0.5, description="dpo: the chance a preference is flipped (robust, exo_pair)"
    )
    precompute_ref_log_probs: bool | None = Field(
        default=None,
        description="dpo, kto: compute the reference model's log-probabilities once before training, so no "
        "reference model is held on the GPU while it trains (false)",
    )
    desirable_weight: float | None = Field(default=None, gt=0, le=100, description="kto: weight of desirable rows (1)")
    undesirable_weight: float | None = Field(
        default=None, gt=0, le=100, description="kto: weight of undesirable rows (1)"
    )
    num_generations: int | None = Field(
        default=None,
        ge=2,
        le=1024,
        description="grpo: completions per prompt (8); the effective batch must be a multiple of it",
    )
    max_completion_length: int | None = Field(
        default=None, ge=1, le=1_048_576, description="grpo: the longest completion generated, in tokens (512)"
    )
    steps_per_generation: int | None = Field(
        default=None,
        ge=1,
        le=65536,
        description="grpo: micro-batches generated at once (null: gradient_accumulation_steps); lower it when "
        "the generations do not fit the GPU",
    )
    temperature: float | None = Field(default=None, gt=0, le=10, description="grpo: sampling temperature (1.0)")
    top_p: float | None = Field(default=None, gt=0, le=1, description="grpo: nucleus sampling (1.0)")
    top_k: int | None = Field(default=None, ge=0, le=1_000_000, description="grpo: top-k sampling, 0 for off (0)")
    epsilon: float | None = Field(default=None, gt=0, lt=1, description="grpo: the clipping range (0.2)")
    num_iterations: int | None = Field(
        default=None, ge=1, le=64, description="grpo: optimizer passes over each batch of generations (1)"
    )
    scale_rewards: str | None = Field(
        default=None, description=f"grpo: how rewards are normalized: {', '.join(GRPO_SCALE_REWARDS)} (group)"
    )
    mask_truncated_completions: bool | None = Field(
        default=None, description="grpo: leave completions cut at max_completion_length out of the loss (false)"
    )

    @property
    def micro_batch(self) -> int:
        """per_device_train_batch_size as a number: for "auto", the recipe's until the trainer chooses."""
        value = self.per_device_train_batch_size
        return AUTO_BASE_MICRO_BATCH if value == "auto" else value

    @property
    def sequences_per_step(self) -> int:
        """Sequences per optimizer step on each GPU: micro-batch x accumulation ("auto" keeps it)."""
        return self.micro_batch * self.gradient_accumulation_steps


# The standard recipe, shown in POST /jobs's description.
JOB_SPEC_EXAMPLE: dict[str, Any] = {
    "model": "meta-llama/Llama-3.1-8B",
    "dataset": {"source": "allenai/tulu-3-sft-mixture", "split": "train"},
    "chat_template_from": "allenai/Llama-3.1-Tulu-3-8B",
    "backend": "auto",
    "hyperparameters": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 64},
}


WebhookEvent = Literal[
    "status",
    "progress",
    "checkpoint",
    "eval",
    "fine_tuning.job.succeeded",
    "fine_tuning.job.failed",
    "fine_tuning.job.cancelled",
]


class WebhookSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        min_length=8,
        max_length=2000,
        pattern=r"^https?://",
        description="where to POST; its host must be in the operator's WEBHOOK_ALLOWED_HOSTS",
    )
    events: list[WebhookEvent] = Field(
        default_factory=lambda: list[WebhookEvent](["status"]),
        min_length=1,
        description="status (every change of status), progress (every `every_steps` steps), checkpoint, eval; "
        "fine_tuning.job.succeeded, fine_tuning.job.failed, fine_tuning.job.cancelled (OpenAI's event objects, for "
        "receivers written for OpenAI's fine-tuning webhooks)",
    )
    every_steps: int = Field(default=100, ge=1, le=MAX_DB_INT, description="for progress: every this many steps")


class TensorBoardIntegration(BaseModel):
    """TensorBoard event files kept with the job (jobs/<id>/tensorboard), downloadable as one tar."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["tensorboard"]


class MlflowOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tracking_uri: str = Field(
        min_length=8,
        max_length=2000,
        pattern=r"^https?://",
        description="the MLflow tracking server (http or https); its host must be in the operator's "
        "TRACKER_ALLOWED_HOSTS",
    )
    experiment_name: str | None = Field(default=None, min_length=1, max_length=500, description="default: MLflow's")
    run_name: str | None = Field(default=None, min_length=1, max_length=250, description="default: job-<id>")
    tags: dict[Annotated[str, Field(max_length=250)], Annotated[str, Field(max_length=500)]] | None = Field(
        default=None, max_length=20, description="set on the run"
    )


class MlflowIntegration(BaseModel):
    """A run in an MLflow tracking server: hyperparameters, every step log, the data report and the
    final model's location."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["mlflow"]
    mlflow: MlflowOptions


class WandbOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    project: str = Field(min_length=1, max_length=128)
    name: str | None = Field(
        default=None, min_length=1, max_length=128, description="the run's name; default: job-<id>"
    )
    entity: str | None = Field(
        default=None, min_length=1, max_length=128, description="a team or user; default: the key's"
    )
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(default=None, max_length=20)
    mode: Literal["online", "offline"] = Field(
        default="online",
        description="online: sent as it trains (the worker's WANDB_API_KEY, passed on with TRAINER_ENV_PASSTHROUGH); "
        "offline: the run folder is written under the job's folder (jobs/<id>/wandb), for `wandb sync` later",
    )


class WandbIntegration(BaseModel):
    """A Weights & Biases run: hyperparameters, every step log, the data report and the final model's location."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["wandb"]
    wandb: WandbOptions


Integration = Annotated[TensorBoardIntegration | MlflowIntegration | WandbIntegration, Field(discriminator="type")]


class JobSpec(BaseModel):
    """What a client sends to POST /jobs."""

    model_config = ConfigDict(
        extra="forbid",
    )

    model: str = Field(min_length=1, description="Hub model id or a local Hugging Face model folder")
    method: Method = Field(
        default="sft",
        description="sft (supervised fine-tuning), dpo, orpo, kto (preference tuning) or grpo (reward tuning with "
        "`grader`): the TRL trainer that runs, all parameters trained (docs/methods.md)",
    )
    dataset: DatasetSpec
    chat_template_from: str | None = Field(
        default=None, description="take the chat template from this tokenizer instead of the model's"
    )
    validation: ValidationSpec | None = Field(
        default=None, description="a validation set, evaluated every eval_steps; its loss is eval_loss in the step logs"
    )
    backend: Backend = "auto"
    gpus: int = Field(
        default=1,
        ge=1,
        le=MAX_GPUS_PER_JOB,
        description="GPUs of one host the job trains on at once, each with per_device_train_batch_size: the "
        "effective batch is per_device_train_batch_size x gradient_accumulation_steps x gpus",
    )
    strategy: Strategy = Field(
        default="auto",
        description="how several GPUs share the work: ddp (a whole copy of the model on each), fsdp (weights, "
        "gradients and optimizer states sharded across them), or auto (ddp when the planner says one GPU holds "
        "the job, fsdp when it does not); ignored with gpus 1",
    )
    priority: int = Field(
        default=0,
        ge=-MAX_PRIORITY,
        le=MAX_PRIORITY,
        description="its place in the GPU line: a higher priority starts first; among equals, the project "
        "holding fewer GPUs, then the job waiting longest. Members may ask up to MEMBER_MAX_PRIORITY (10 by "
        "default), admins up to 100",
    )
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    grader: Grader | None = Field(
        default=None,
        description="grpo: how each completion is scored, as OpenAI's graders are declared (string_check, "
        "text_similarity, multi) or this server's regex, json_schema and reward_module",
    )
    webhooks: list[WebhookSpec] = Field(
        default_factory=list,
        max_length=5,
        description="URLs that get the job's events, signed as Standard Webhooks do (README, Webhooks)",
    )
    integrations: list[Integration] = Field(
        default_factory=list,
        max_length=3,
        description="experiment trackers the job reports to as it trains: tensorboard, mlflow, wandb (one of each); "
        "a tracker that fails is dropped with an event, and the job goes on",
    )
    drop_optimizer_state_on_success: bool = Field(
        default=False,
        description="once the job succeeds, delete optimizer.pt from its intermediate checkpoints (for an 8B "
        "model about 16 of their 32 GB each): their weights stay downloadable, they can no longer be resumed from",
    )
    precision: Precision = Field(
        default="auto",
        description="the matmuls' precision: bf16 (the recipe), fp8 (the decoder's Linear layers compute in "
        "float8 with torchao's float8 training; weights, gradients and optimizer states stay as with bf16; lm_head "
        "and embeddings stay bf16; one GPU; needs a GPU of compute capability 8.9 or newer: L4, L40S, H100, H200, "
        "B200, and torchao on the worker), or auto: fp8 for an SFT job on one such GPU with the Unsloth backend, "
        "bf16 otherwise (the startup event and the record's trainer.precision say which ran)",
    )
    fp8_recipe: Fp8Recipe | None = Field(
        default=None,
        description="precision fp8 (or auto, where it chooses fp8): torchao's scaling recipe: tensorwise (one "
        "scale per tensor: the fastest) or rowwise (a scale per row: closer to bf16's numerics, a little slower); "
        "null: tensorwise",
    )

    @model_validator(mode="after")
    def _precision(self) -> JobSpec:
        if self.precision == "fp8" and self.gpus > 1:
            raise ValueError(
                f"precision fp8 is for a job on one GPU (this one asks for {self.gpus}): with DDP or FSDP it has not "
                "been tried yet"
            )
        if self.precision == "fp8":
            self.fp8_recipe = self.fp8_recipe or "tensorwise"
        elif self.precision == "bf16" and self.fp8_recipe is not None:
            raise ValueError("fp8_recipe applies to precision 'fp8' or 'auto', not to 'bf16'")
        return self

    @model_validator(mode="after")
    def _one_tracker_of_each_type(self) -> JobSpec:
        types = [integration.type for integration in self.integrations]
        twice = sorted({t for t in types if types.count(t) > 1})
        if twice:
            raise ValueError(f"integrations: one of each type; {', '.join(twice)} is given more than once")
        return self

    @model_validator(mode="after")
    def _loss_options(self) -> JobSpec:
        hp = self.hyperparameters
        if hp.assistant_only_loss and hp.completion_only_loss:
            raise ValueError(
                "hyperparameters: assistant_only_loss is for chat rows and completion_only_loss for "
                "prompt/completion rows; set one of them"
            )
        if self.validation is None and (hp.eval_steps or hp.per_device_eval_batch_size):
            raise ValueError(
                "hyperparameters.eval_steps and per_device_eval_batch_size need a validation set "
                '(validation: {"fraction": 0.02}, a split, a source or a file_id)'
            )
        return self

    @model_validator(mode="after")
    def _method_options(self) -> JobSpec:
        """Options the method does not have are refused, by name; its own are filled with TRL's
        defaults; and what TRL would refuse only once the job runs is refused now."""
        problems: list[tuple[tuple[str, ...], str]] = []
        hp, method = self.hyperparameters, facts(self.method)
        for option, methods in METHOD_OPTIONS.items():
            value = getattr(hp, option)
            set_here = value is not None and (
                option not in SFT_OPTIONS or value != Hyperparameters.model_fields[option].default
            )
            if set_here and self.method not in methods:
                problems.append(
                    (
                        ("hyperparameters", option),
                        f"{option} applies to method {methods_of_option(option)}, not to {self.method!r}",
                    )
                )
        for option, default in method.defaults.items():
            if getattr(hp, option) is None:
                setattr(hp, option, default)
        if method.loss_types and hp.loss_type not in method.loss_types:
            problems.append(
                (
                    ("hyperparameters", "loss_type"),
                    f"{self.method} takes loss_type {', '.join(method.loss_types)}; not {echo(hp.loss_type)}",
                )
            )
        if hp.packing and hp.padding_free is False:
            problems.append(
                (
                    ("hyperparameters", "padding_free"),
                    "packing needs padding_free (TRL keeps the packed rows apart by their position ids, in one row "
                    "without padding); leave padding_free null or true, or turn packing off",
                )
            )
        if self.method == "dpo" and hp.loss_type == "exo_pair" and not hp.label_smoothing:
            problems.append(
                (("hyperparameters", "label_smoothing"), "loss_type exo_pair needs label_smoothing above 0 (e.g. 1e-3)")
            )
        if self.method == "grpo" and hp.scale_rewards not in GRPO_SCALE_REWARDS:
            problems.append(
                (
                    ("hyperparameters", "scale_rewards"),
                    f"scale_rewards is one of {', '.join(GRPO_SCALE_REWARDS)}; not {echo(hp.scale_rewards)}",
                )
            )
        if hp.per_device_train_batch_size == "auto" and (self.method != "sft" or self.gpus != 1):
            problems.append(
                (
                    ("hyperparameters", "per_device_train_batch_size"),
                    f'"auto" is for method sft on one GPU (this job: method {self.method}, gpus {self.gpus}); give a '
                    "number",
                )
            )
        if self.method == "kto" and hp.loss_type == "kto" and hp.micro_batch < method.min_micro_batch:
            problems.append(
                (
                    ("hyperparameters", "per_device_train_batch_size"),
                    "kto needs a micro-batch of 2 or more: its KL term compares each completion with another of the "
                    "same micro-batch",
                )
            )
        problems += self._grpo_problems()
        if problems:
            raise ValidationError.from_exception_data(
                "JobSpec",
                [
                    InitErrorDetails(type=PydanticCustomError("method_option", message), loc=loc, input=None)
                    for loc, message in problems
                ],
            )
        return self

    def _grpo_problems(self) -> list[tuple[tuple[str, ...], str]]:
        if self.method != "grpo":
            return (
                [(("grader",), f"a grader scores generations: it is for method 'grpo', not {self.method!r}")]
                if (self.grader is not None)
                else []
            )
        problems: list[tuple[tuple[str, ...], str]] = []
        hp = self.hyperparameters
        if self.grader is None:
            problems.append(
                (
                    ("grader",),
                    "method grpo needs a grader to score its completions, e.g. "
                    '{"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", '
                    '"reference": "{{item.answer}}", "operation": "eq"}',
                )
            )
        assert hp.num_generations is not None and hp.max_completion_length is not None
        generated = hp.micro_batch * (hp.steps_per_generation or hp.gradient_accumulation_steps)
        if (generated * self.gpus) % hp.num_generations:
            what = "steps_per_generation" if hp.steps_per_generation else "gradient_accumulation_steps"
            problems.append(
                (
                    ("hyperparameters", "num_generations"),
                    f"the completions generated at once (per_device_train_batch_size x {what} x gpus = "
                    f"{generated * self.gpus}) must be a multiple of num_generations ({hp.num_generations}), so "
                    "that every prompt gets all its completions",
                )
            )
        if self.validation is not None:
            evaluated = (hp.per_device_eval_batch_size or hp.micro_batch) * self.gpus
            if evaluated % hp.num_generations:
                problems.append(
                    (
                        ("hyperparameters", "per_device_eval_batch_size"),
                        f"an evaluation batch ({evaluated}) must be a multiple of num_generations "
                        f"({hp.num_generations}); set per_device_eval_batch_size to {hp.num_generations}",
                    )
                )
        if hp.max_completion_length >= hp.max_seq_length:
            problems.append(
                (
                    ("hyperparameters", "max_completion_length"),
                    f"max_completion_length ({hp.max_completion_length}) must be below max_seq_length "
                    f"({hp.max_seq_length}), the prompt and its completion together",
                )
            )
        return problems

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        return source_shape(value, "model")

    @field_validator("chat_template_from")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        return None if value is None else source_shape(value, "chat_template_from")
