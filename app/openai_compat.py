"""The OpenAI-compatible view (/v1, app/routes/openai_v1.py): OpenAI's fine-tuning requests mapped
onto the native job spec, and native records shown as the objects the `openai` SDK reads. One
mechanism, two views: the jobs, files, checkpoints, queue and store are the native ones; this
module only translates (README, "OpenAI-compatible API")."""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema
from sqlalchemy import String, and_, cast, or_
from sqlmodel import Session, col, select

from app.errors import BadRequest, NotFound, OpenAICode
from core.contract import CheckpointStatus, ErrorCode, EventKind, understood
from core.graders import Grader
from core.methods import METHODS
from core.models import Checkpoint, Job, JobEvent, OpenAIJob, StepLog, UploadedFile
from core.spec import MAX_DB_INT, Hyperparameters, JobSpec, Strategy, echo

JOB_PREFIX, FILE_PREFIX, EVENT_PREFIX, CHECKPOINT_PREFIX = "ftjob-", "file-", "ftevent-", "ftckpt-"
STEP_EVENT_PREFIX = EVENT_PREFIX + "step-"
# A finished job's result file (its step logs as OpenAI's CSV), made from the step logs when read.
RESULT_FILE_PREFIX = FILE_PREFIX + "results-" + JOB_PREFIX
RESULT_FILE_RE = re.compile(r"^file-results-ftjob-(\d{1,19})$")
RESULT_COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")
ORGANIZATION = "local"
FILE_PURPOSE: Literal["fine-tune"] = "fine-tune"
RESULTS_PURPOSE: Literal["fine-tune-results"] = "fine-tune-results"
FINISHED_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
# The metadata[key]=value filters of GET /v1/fine_tuning/jobs.
METADATA_PARAM_RE = re.compile(r"^metadata\[(.{1,64})\]$")
DEFAULTS = Hyperparameters()
# The native micro-batch; an OpenAI batch_size is this many rows per step times gradient accumulation.
MICRO_BATCH = DEFAULTS.micro_batch
# gradient_accumulation_steps is at most 65536 natively.
MAX_BATCH_SIZE = 65536
MAX_LR_MULTIPLIER = 1 / DEFAULTS.learning_rate  # the native learning_rate is at most 1
# Model names of OpenAI's own models (no Hugging Face Hub id looks like these without an org/).
OPENAI_MODEL_RE = re.compile(r"^(gpt-|chatgpt-|o\d+(-|$)|davinci|babbage|curie|ada(-|$)|text-|ft:)", re.IGNORECASE)
NATIVE_ID_RE = re.compile(r"^\d{1,19}$")


# ---- ids ----------------------------------------------------------------------------------------


def native_id(value: str, prefix: str, what: str) -> int:
    """`ftjob-7` (or plain `7`) -> 7; anything else is a 404 naming the form an id takes."""
    digits = value.removeprefix(prefix)
    if NATIVE_ID_RE.match(digits) and 1 <= int(digits) <= MAX_DB_INT:
        return int(digits)
    raise NotFound(f"no {what} {echo(value)}: its ids look like {prefix}<number>, e.g. {prefix}1")


def file_param(value: str, param: str) -> int:
    """A training_file / validation_file of a request: a 400 naming the field when it is not an id."""
    digits = value.removeprefix(FILE_PREFIX)
    if NATIVE_ID_RE.match(digits) and 1 <= int(digits) <= MAX_DB_INT:
        return int(digits)
    raise BadRequest(
        f"{param} {echo(value)} is not a file id: upload the JSONL file with POST /v1/files (purpose=fine-tune) "
        f"and pass the id it returns, e.g. {FILE_PREFIX}1",
        param=param,
        code=OpenAICode.invalid_file_id,
    )


def timestamp(value: datetime | str | None) -> int | None:
    if value is None:
        return None
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return int(moment.timestamp())


# ---- requests -----------------------------------------------------------------------------------


def _auto(value: object) -> object:
    return None if value == "auto" else value


def _auto_or(number: dict[str, Any]) -> Any:
    """A number, "auto" or null: read as the number or None (the native default), documented as all three."""
    return WithJsonSchema({"anyOf": [{"const": "auto"}, number, {"type": "null"}]})


AutoEpochs = Annotated[
    Annotated[int, Field(ge=1, le=1000)] | None,
    BeforeValidator(_auto),
    _auto_or({"type": "integer", "minimum": 1, "maximum": 1000}),
]
AutoBatch = Annotated[
    Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE)] | None,
    BeforeValidator(_auto),
    _auto_or({"type": "integer", "minimum": 1, "maximum": MAX_BATCH_SIZE}),
]
AutoMultiplier = Annotated[
    Annotated[float, Field(gt=0, le=MAX_LR_MULTIPLIER)] | None,
    BeforeValidator(_auto),
    _auto_or({"type": "number", "exclusiveMinimum": 0, "maximum": MAX_LR_MULTIPLIER}),
]


class OpenAIHyperparameters(BaseModel):
    """OpenAI's three hyperparameters; "auto" (or leaving one out) keeps the native default."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: AutoEpochs = Field(default=None, description="-> num_train_epochs (native default 2)")
    batch_size: AutoBatch = Field(
        default=None,
        description=f"-> the effective batch: per_device_train_batch_size {MICRO_BATCH} (1 for an odd "
        "batch_size) x gradient_accumulation_steps (native default 2 x 64 = 128)",
    )
    learning_rate_multiplier: AutoMultiplier = Field(
        default=None, description=f"-> learning_rate = multiplier x {DEFAULTS.learning_rate} (the native default)"
    )


AutoBeta = Annotated[
    Annotated[float, Field(ge=0, le=100)] | None,
    BeforeValidator(_auto),
    _auto_or({"type": "number", "minimum": 0, "maximum": 100}),
]


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: OpenAIHyperparameters | None = None


class DpoHyperparameters(OpenAIHyperparameters):
    beta: AutoBeta = Field(default=None, description="-> hyperparameters.beta (DPO's default 0.1)")


class DpoMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: DpoHyperparameters | None = None


class ReinforcementHyperparameters(OpenAIHyperparameters):
    """OpenAI's reinforcement hyperparameters: batch_size counts prompts (each gets num_generations
    completions); those that steer OpenAI's own sampling and evaluation loop are "auto" only."""

    compute_multiplier: Any = Field(default=None, description='"auto" only: num_generations sets the samples')
    eval_interval: Any = Field(default=None, description='"auto" only: native eval_steps')
    eval_samples: Any = Field(default=None, description='"auto" only')
    reasoning_effort: Any = Field(default=None, description='"default" only')


class ReinforcementMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grader: Grader = Field(
        description="how each completion is scored: string_check, text_similarity, multi (and "
        "this server's regex, json_schema, reward_module); python and model graders are refused"
    )
    hyperparameters: ReinforcementHyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = Field(default=None, description="-> native method dpo")
    reinforcement: ReinforcementMethod | None = Field(default=None, description="-> native method grpo, its grader")


class WandbRequestOptions(BaseModel):
    """OpenAI's Weights & Biases integration: the run the job reports to."""

    model_config = ConfigDict(extra="forbid")

    project: str = Field(min_length=1, max_length=128)
    name: str | None = Field(default=None, min_length=1, max_length=128)
    entity: str | None = Field(default=None, min_length=1, max_length=128)
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(default=None, max_length=20)


class WandbRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["wandb"]
    wandb: WandbRequestOptions


class CreateFineTuningJob(BaseModel):
    """POST /v1/fine_tuning/jobs, as the openai SDK sends it; `native_hyperparameters`, `gpus` and
    `strategy` are this server's own additions (the SDK sends them with `extra_body`)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        min_length=1,
        max_length=1000,
        description="a Hugging Face Hub id (e.g. meta-llama/Llama-3.1-8B) or a local model folder under the "
        "server's ALLOWED_LOCAL_ROOTS; not an OpenAI model name such as gpt-4o-mini",
    )
    training_file: str = Field(max_length=100, description="a file id from POST /v1/files, e.g. file-1")
    validation_file: str | None = Field(default=None, max_length=100, description="a file id, evaluated as it trains")
    hyperparameters: OpenAIHyperparameters | None = Field(default=None, description="or method.supervised's")
    method: Method | None = Field(
        default=None,
        description="supervised (native sft), dpo (native dpo: beta), or reinforcement (native grpo: its grader)",
    )
    suffix: str | None = Field(default=None, max_length=64, description="kept and shown on the job object")
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1, description="-> hyperparameters.seed (default 42)")
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        default=None, max_length=16, description="up to 16 pairs, kept and shown on the job object"
    )
    integrations: list[WandbRequest] | None = Field(
        default=None,
        max_length=1,
        description="-> the native integrations' wandb (online: the worker's WANDB_API_KEY); the native spec "
        "also has tensorboard, mlflow and W&B's offline mode",
    )
    native_hyperparameters: Hyperparameters | None = Field(
        default=None,
        description="this server's own hyperparameters (those of POST /jobs), set over what the fields above give: "
        "e.g. max_steps, max_seq_length, logging_steps, save_steps",
    )
    gpus: int | None = Field(
        default=None, ge=1, le=64, description="this server's own: GPUs of one host the job trains on (default 1)"
    )
    strategy: Strategy | None = Field(
        default=None, description="this server's own: how several GPUs share the job (auto, ddp or fsdp)"
    )
    priority: int | None = Field(
        default=None, ge=-100, le=100, description="this server's own: the job's place in the GPU line (default 0)"
    )


# What each OpenAI hyperparameter sets natively: giving both is a conflict.
NATIVE_FIELDS = {
    "n_epochs": ("num_train_epochs",),
    "batch_size": ("per_device_train_batch_size", "gradient_accumulation_steps"),
    "learning_rate_multiplier": ("learning_rate",),
    "seed": ("seed",),
    "beta": ("beta",),
}
GRPO_DEFAULT_GENERATIONS = int(METHODS["grpo"].defaults["num_generations"])


# OpenAI's method types, and the native method each runs.
NATIVE_METHODS = {"supervised": "sft", "dpo": "dpo", "reinforcement": "grpo"}
# Reinforcement hyperparameters with no native counterpart: "auto" (or "default") only.
AUTO_ONLY = {
    "compute_multiplier": "native_hyperparameters.num_generations sets the completions sampled per prompt",
    "eval_interval": "native_hyperparameters.eval_steps sets how often the validation_file is evaluated",
    "eval_samples": "the whole validation_file is evaluated",
    "reasoning_effort": "this server trains the model you name, whatever its reasoning",
}


def _hyperparameters(request: CreateFineTuningJob) -> tuple[str, OpenAIHyperparameters]:
    """The native method the request asks for, and OpenAI's hyperparameters given for it."""
    method = request.method
    kind = method.type if method is not None else "supervised"
    section = getattr(method, kind, None) if method is not None else None
    for other in ("supervised", "dpo", "reinforcement"):
        if other != kind and method is not None and getattr(method, other) is not None:
            raise BadRequest(
                f"method.type is {kind!r} but method.{other} is given: give the section of the type you name",
                param=f"method.{other}",
                code=OpenAICode.conflicting_parameters,
            )
    if kind == "reinforcement" and section is None:
        raise BadRequest(
            "method.reinforcement.grader is required: it scores each completion (string_check, text_similarity, "
            "multi, ...)",
            param="method.reinforcement.grader",
            code=OpenAICode.missing_required_parameter,
        )
    given = getattr(section, "hyperparameters", None)
    if given is not None and request.hyperparameters is not None:
        raise BadRequest(
            f"give hyperparameters or method.{kind}.hyperparameters, not both",
            param="hyperparameters",
            code=OpenAICode.conflicting_parameters,
        )
    if isinstance(given, ReinforcementHyperparameters):
        for name, instead in AUTO_ONLY.items():
            value = getattr(given, name)
            if value not in (None, "auto", "default"):
                raise BadRequest(
                    f'method.reinforcement.hyperparameters.{name} is not available here ({instead}); leave it "auto"',
                    param=f"method.reinforcement.hyperparameters.{name}",
                    code=OpenAICode.unsupported_parameter,
                )
    return NATIVE_METHODS[kind], given or request.hyperparameters or OpenAIHyperparameters()


def job_spec(request: CreateFineTuningJob) -> JobSpec:
    """The native spec an OpenAI request asks for (README's mapping table). Refusals name the
    request's own fields."""
    if "/" not in request.model and OPENAI_MODEL_RE.match(request.model):
        raise BadRequest(
            f"model {echo(request.model)} is an OpenAI model, which this server cannot fine-tune: pass a Hugging Face "
            "Hub id such as 'meta-llama/Llama-3.1-8B', or the path of a model folder under the server's "
            "ALLOWED_LOCAL_ROOTS",
            param="model",
            code=OpenAICode.model_not_supported,
        )
    method, openai = _hyperparameters(request)
    native: dict[str, Any] = {}
    if openai.n_epochs is not None:
        native["num_train_epochs"] = openai.n_epochs
    if openai.batch_size is not None:
        # Reinforcement's batch counts prompts; the native batch counts the completions trained on.
        generations = (
            (request.native_hyperparameters.num_generations if request.native_hyperparameters else None)
            or GRPO_DEFAULT_GENERATIONS
            if method == "grpo"
            else 1
        )
        sequences = openai.batch_size * generations
        micro = MICRO_BATCH if sequences % MICRO_BATCH == 0 else 1
        native["per_device_train_batch_size"] = micro
        native["gradient_accumulation_steps"] = sequences // micro
    if isinstance(openai, DpoHyperparameters) and openai.beta is not None:
        native["beta"] = openai.beta
    if openai.learning_rate_multiplier is not None:
        native["learning_rate"] = openai.learning_rate_multiplier * DEFAULTS.learning_rate
    if request.seed is not None:
        native["seed"] = request.seed
    given = {"seed": request.seed, "beta": None, **openai.model_dump(include=set(NATIVE_FIELDS))}
    if request.native_hyperparameters is not None:
        overrides = request.native_hyperparameters.model_dump(include=request.native_hyperparameters.model_fields_set)
        for name, fields in NATIVE_FIELDS.items():
            clash = sorted(set(fields) & set(overrides))
            if given[name] is not None and clash:
                raise BadRequest(
                    f"{name} and native_hyperparameters.{clash[0]} set the same thing: give one of them",
                    param=f"native_hyperparameters.{clash[0]}",
                    code=OpenAICode.conflicting_parameters,
                )
        native.update(overrides)
    spec: dict[str, Any] = {
        "model": request.model,
        "method": method,
        "dataset": {"file_id": file_param(request.training_file, "training_file")},
        "hyperparameters": native,
    }
    if method == "grpo":
        assert request.method is not None and request.method.reinforcement is not None
        spec["grader"] = request.method.reinforcement.grader
    if request.validation_file is not None:
        spec["validation"] = {"file_id": file_param(request.validation_file, "validation_file")}
    if request.integrations:
        spec["integrations"] = [
            {"type": "wandb", "wandb": {**i.wandb.model_dump(exclude_none=True), "mode": "online"}}
            for i in request.integrations
        ]
    spec.update(
        {name: value for name in ("gpus", "strategy", "priority") if (value := getattr(request, name)) is not None}
    )
    try:
        return JobSpec.model_validate(spec)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = request_param([str(part) for part in first["loc"]])
        raise BadRequest(f"{where}: {first['msg'].removeprefix('Value error, ')}", param=where) from None


def request_param(native_field: Sequence[str]) -> str:
    """A native spec's field as the /v1 request names it."""
    head = native_field[0] if native_field else ""
    if head == "dataset":
        return "training_file"
    if head == "validation":
        return "validation_file"
    if head == "hyperparameters":
        return ".".join(["native_hyperparameters", *native_field[1:]])
    if head == "integrations":
        return ".".join(["integrations", *native_field[1:]])
    if head == "grader":
        return ".".join(["method.reinforcement.grader", *native_field[1:]])
    return head or "body"


def check_files(session: Session, spec: JobSpec, project_id: int | None) -> None:
    """A 400 naming training_file or validation_file when the file does not exist (or belongs to
    another project than `project_id`, when given: it reads as none)."""
    for param, part in (("training_file", spec.dataset), ("validation_file", spec.validation)):
        file_id = getattr(part, "file_id", None)
        uploaded = session.get(UploadedFile, file_id) if file_id is not None else None
        if file_id is not None and (uploaded is None or (project_id is not None and uploaded.project_id != project_id)):
            raise BadRequest(
                f"{param} {FILE_PREFIX}{file_id} does not exist (upload one with POST /v1/files)",
                param=param,
                code=OpenAICode.file_not_found,
            )


def check_purpose(fields: dict[str, str], complete: bool) -> None:
    """POST /v1/files's `purpose` form field: fine-tune only (checked before the file is stored)."""
    purpose = fields.get("purpose")
    if purpose is None and not complete:
        return  # it may follow the file
    if purpose != FILE_PURPOSE:
        said = "no purpose" if purpose is None else f"purpose {purpose!r}"
        raise BadRequest(
            f"{said}: this server stores files for fine-tuning only; send purpose=fine-tune",
            param="purpose",
            code=OpenAICode.unsupported_purpose if purpose is not None else OpenAICode.missing_required_parameter,
        )


# ---- responses ----------------------------------------------------------------------------------


class FileObject(BaseModel):
    """OpenAI's file object, plus what the native record knows of the file's rows."""

    id: str = Field(description="file-<native id>")
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["fine-tune", "fine-tune-results"] = Field(
        default=FILE_PURPOSE, description="fine-tune (an upload) or fine-tune-results (a finished job's step logs)"
    )
    status: Literal["processed"] = "processed"
    status_details: str | None = Field(description="the malformed rows, when there are some")
    expires_at: int | None = None
    rows: int = Field(description="(this server's) every row, good or bad")
    bad_rows: int = Field(description="(this server's) rows a job skips")
    row_format: str | None = Field(
        description="(this server's) messages, prompt_completion, text, preference, openai_preference, "
        "implicit_preference, unpaired_preference, prompt_only or null"
    )
    sha256: str = Field(description="(this server's)")
    native_url: str = Field(description="(this server's) the native record: GET /files/<id>")


class IdPage(BaseModel):
    """A list page as OpenAI's cursor lists are (files, checkpoints): `first_id` and `last_id`
    are its items' ids, for `after=`."""

    object: Literal["list"] = "list"
    has_more: bool
    first_id: str | None
    last_id: str | None

    @classmethod
    def of(cls, data: Sequence[Any], *, has_more: bool) -> Self:
        first, last = (data[0].id, data[-1].id) if data else (None, None)
        return cls.model_validate({"data": list(data), "has_more": has_more, "first_id": first, "last_id": last})


class FileList(IdPage):
    data: list[FileObject]


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class JobErrorObject(BaseModel):
    code: str
    message: str
    param: str | None


class HyperparametersObject(BaseModel):
    n_epochs: float | int
    batch_size: int
    learning_rate_multiplier: float


class SupervisedObject(BaseModel):
    hyperparameters: HyperparametersObject


class DpoHyperparametersObject(HyperparametersObject):
    beta: float


class DpoObject(BaseModel):
    hyperparameters: DpoHyperparametersObject


class ReinforcementObject(BaseModel):
    grader: dict[str, Any] = Field(description="the grader as the spec holds it")
    hyperparameters: HyperparametersObject = Field(description="batch_size counts prompts")


class NativeMethodObject(BaseModel):
    """(this server's) a method OpenAI has no type for: orpo or kto, submitted at POST /jobs."""

    hyperparameters: dict[str, Any]


class MethodObject(BaseModel):
    type: Literal["supervised", "dpo", "reinforcement", "orpo", "kto"] = Field(
        description="supervised (native sft), dpo, reinforcement (native grpo); orpo and kto (this server's, jobs "
        "submitted at POST /jobs)"
    )
    supervised: SupervisedObject | None = Field(default=None, exclude_if=lambda value: value is None)
    dpo: DpoObject | None = Field(default=None, exclude_if=lambda value: value is None)
    reinforcement: ReinforcementObject | None = Field(default=None, exclude_if=lambda value: value is None)
    orpo: NativeMethodObject | None = Field(default=None, exclude_if=lambda value: value is None)
    kto: NativeMethodObject | None = Field(default=None, exclude_if=lambda value: value is None)


class ProgressObject(BaseModel):
    step: int
    total_steps: int | None
    epoch: float | None
    percent: float | None
    eta_seconds: float | None


class FineTuningJob(BaseModel):
    """OpenAI's fine_tuning.job, from the native job record, plus fields of this server's own."""

    id: str = Field(description="ftjob-<native id>")
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    error: JobErrorObject | None = Field(description="a failed job's native error code and message")
    fine_tuned_model: str | None = Field(
        description="a succeeded job's final checkpoint: jobs/<id>/checkpoints/final (its folder under the "
        "server's DATA_DIR, and its native record at GET /jobs/<id>/checkpoints/final)"
    )
    model: str
    organization_id: str
    result_files: list[str] = Field(
        description="a finished job's step logs as a CSV file (step, train_loss, train_accuracy, valid_loss, "
        "valid_mean_token_accuracy): GET /v1/files/<id>/content"
    )
    seed: int
    status: Literal["queued", "running", "paused", "succeeded", "failed", "cancelled", "unknown"] = Field(
        description="the native status (paused is this server's own; unknown: one another version of the server "
        "wrote, in status_raw)"
    )
    status_raw: str | None = Field(
        default=None,
        exclude_if=lambda raw: raw is None,
        description="(this server's) the stored status when status is unknown; absent otherwise",
    )
    trained_tokens: int | None = Field(
        description="set when the job ends: the tokens its trainers trained on, every attempt's (the native "
        "metrics.trained_tokens)"
    )
    training_file: str = Field(description="file-<id>, or the native dataset.source of a job submitted at POST /jobs")
    validation_file: str | None
    hyperparameters: HyperparametersObject
    method: MethodObject
    estimated_finish: int | None = Field(
        description="a running job's expected end (Unix seconds): now plus the native progress.eta_seconds"
    )
    integrations: list[dict[str, Any]] = Field(
        description="the native spec's integrations: wandb as OpenAI shows it ({type, wandb: {project, name, "
        "entity, tags}}, with this server's `mode`), and tensorboard or mlflow from POST /jobs"
    )
    metadata: dict[str, str] | None
    suffix: str | None = Field(description="(this server's) the request's suffix")
    progress: ProgressObject = Field(description="(this server's) step, total_steps, percent, eta_seconds")
    job_url: str = Field(description="(this server's) the native record, GET /jobs/<id>")
    checkpoints_url: str = Field(description="(this server's) the native checkpoints with their files and sha256")
    download_url: str | None = Field(
        description="(this server's) a succeeded job's final model as one tar: GET /jobs/<id>/checkpoints/final/archive"
    )


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningJobEvent(BaseModel):
    id: str = Field(description="ftevent-<native event id>, or ftevent-step-<id> for a step log")
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] = Field(description="message: the native event's kind; metrics: the step log's figures")


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool


class CheckpointMetrics(BaseModel):
    step: float | None = Field(default=None, description="the step log the figures come from")
    train_loss: float | None = None
    valid_loss: float | None = None
    full_valid_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_mean_token_accuracy: float | None = None
    method_metrics: dict[str, float | None] | None = Field(
        default=None, description="(this server's) the method's figures at that step, under TRL's names"
    )


class FineTuningJobCheckpoint(BaseModel):
    id: str = Field(description="ftckpt-<native checkpoint id>")
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str = Field(description="jobs/<id>/checkpoints/<name>, as fine_tuned_model")
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int
    name: str = Field(description="(this server's) checkpoint-<step> or final")
    status: CheckpointStatus = Field(
        description="(this server's) hashing (sha256 still being computed), ready, corrupt (a file no longer "
        "matches its sha256) or unknown (a status another version of the server wrote)"
    )
    size: int = Field(description="(this server's) bytes")
    files_url: str = Field(description="(this server's) the native record: files, sizes, sha256")
    download_url: str = Field(description="(this server's) the folder as one tar")


class CheckpointPage(IdPage):
    data: list[FineTuningJobCheckpoint]


# ---- native records -> OpenAI objects ------------------------------------------------------------


def file_object(row: UploadedFile) -> FileObject:
    assert row.id is not None
    details = None
    if row.bad_rows:
        shown = "; ".join((row.bad_row_examples or [])[:3])
        details = f"{row.bad_rows} of {row.rows} rows are malformed and skipped by jobs: {shown}"
    return FileObject(
        id=f"{FILE_PREFIX}{row.id}",
        bytes=row.size_bytes,
        created_at=timestamp(row.created_at) or 0,
        filename=row.filename,
        status_details=details,
        rows=row.rows,
        bad_rows=row.bad_rows,
        row_format=row.row_format,
        sha256=row.sha256,
        native_url=f"/files/{row.id}",
    )


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def hyperparameters_object(native: dict[str, Any], per_example: int = 1) -> HyperparametersObject:
    values = DEFAULTS.model_copy(update={k: v for k, v in native.items() if k in Hyperparameters.model_fields})
    return HyperparametersObject(
        n_epochs=_number(values.num_train_epochs),
        batch_size=values.sequences_per_step // per_example,
        learning_rate_multiplier=float(f"{values.learning_rate / DEFAULTS.learning_rate:.12g}"),
    )


def method_object(spec: dict[str, Any]) -> MethodObject:
    """The job's method as OpenAI names it, from the stored spec."""
    native = spec.get("hyperparameters") or {}
    method = spec.get("method") or "sft"
    if method == "dpo":
        shown = hyperparameters_object(native).model_dump()
        beta = native.get("beta")
        return MethodObject(
            type="dpo",
            dpo=DpoObject(hyperparameters=DpoHyperparametersObject(**shown, beta=0.1 if beta is None else beta)),
        )
    if method == "grpo":
        generations = int(native.get("num_generations") or GRPO_DEFAULT_GENERATIONS)
        return MethodObject(
            type="reinforcement",
            reinforcement=ReinforcementObject(
                grader=spec.get("grader") or {}, hyperparameters=hyperparameters_object(native, generations)
            ),
        )
    if method == "orpo":
        return MethodObject(type="orpo", orpo=NativeMethodObject(hyperparameters=native))
    if method == "kto":
        return MethodObject(type="kto", kto=NativeMethodObject(hyperparameters=native))
    return MethodObject(type="supervised", supervised=SupervisedObject(hyperparameters=hyperparameters_object(native)))


def _file_or_source(part: dict[str, Any] | None) -> str | None:
    if not part:
        return None
    if part.get("file_id") is not None:
        return f"{FILE_PREFIX}{part['file_id']}"
    return part.get("source") or None


# The request field a failed job's native error code is about.
ERROR_PARAMS = {
    ErrorCode.dataset_invalid: "training_file",
    ErrorCode.model_not_found: "model",
    ErrorCode.chat_template_missing: "model",
    ErrorCode.chat_template_unsuitable: "model",
}


def job_object(record: dict[str, Any], extra: OpenAIJob | None, now: float) -> FineTuningJob:
    """A native job record (GET /jobs/{id}'s body, as the record cache keeps it) as OpenAI's job."""
    job_id, spec, status = record["id"], record["spec"], record["status"]
    method = method_object(spec)
    hyperparameters = (
        method.reinforcement.hyperparameters
        if method.reinforcement is not None
        else hyperparameters_object(spec.get("hyperparameters") or {})
    )
    base = f"/jobs/{job_id}"
    error = record.get("error")
    progress = record["progress"]
    eta = progress.get("eta_seconds")
    return FineTuningJob(
        id=f"{JOB_PREFIX}{job_id}",
        created_at=timestamp(record["created_at"]) or 0,
        finished_at=timestamp(record.get("finished_at")),
        error=JobErrorObject(code=error["code"], message=error["message"], param=ERROR_PARAMS.get(error["code"]))
        if status == "failed" and error
        else None,
        fine_tuned_model=f"jobs/{job_id}/checkpoints/final" if status == "succeeded" else None,
        model=spec.get("model", ""),
        organization_id=ORGANIZATION,
        result_files=[f"{RESULT_FILE_PREFIX}{job_id}"]
        if status in FINISHED_STATUSES and record.get("started_at")
        else [],
        seed=(spec.get("hyperparameters") or {}).get("seed", DEFAULTS.seed),
        status=status,
        status_raw=record.get("status_raw"),
        trained_tokens=(record.get("metrics") or {}).get("trained_tokens") if status in FINISHED_STATUSES else None,
        training_file=_file_or_source(spec.get("dataset")) or "",
        validation_file=_file_or_source(spec.get("validation")),
        hyperparameters=hyperparameters,
        method=method,
        estimated_finish=int(now + eta) if status == "running" and eta is not None else None,
        integrations=list(spec.get("integrations") or []),
        metadata=extra.job_metadata if extra else None,
        suffix=extra.suffix if extra else None,
        progress=ProgressObject(**progress),
        job_url=base,
        checkpoints_url=f"{base}/checkpoints",
        download_url=f"{base}/checkpoints/final/archive" if status == "succeeded" else None,
    )


def result_csv(session: Session, job_id: int) -> bytes:
    """A job's result file: one row per step log, as OpenAI's fine-tuning result files have them
    (train_accuracy and valid_mean_token_accuracy: TRL's mean_token_accuracy, where the method logs it)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(RESULT_COLUMNS)
    rows = session.exec(select(StepLog).where(StepLog.job_id == job_id).order_by(col(StepLog.step), col(StepLog.id)))
    for row in rows:
        own = row.method_metrics or {}
        writer.writerow(
            [
                row.step,
                _cell(row.loss),
                _cell(own.get("mean_token_accuracy")),
                _cell(row.eval_loss),
                _cell(own.get("eval_mean_token_accuracy")),
            ]
        )
    return out.getvalue().encode()


def _cell(value: object) -> str:
    return "" if value is None else repr(float(value)) if isinstance(value, (int, float)) else ""


def result_file_object(job_id: int, created_at: int, content: bytes) -> FileObject:
    return FileObject(
        id=f"{RESULT_FILE_PREFIX}{job_id}",
        bytes=len(content),
        created_at=created_at,
        filename=f"ftjob-{job_id}-results.csv",
        purpose=RESULTS_PURPOSE,
        status_details=None,
        rows=max(content.count(b"\n") - 1, 0),
        bad_rows=0,
        row_format=None,
        sha256=hashlib.sha256(content).hexdigest(),
        native_url=f"/jobs/{job_id}/logs",
    )


def metadata_filters(params: Iterable[tuple[str, str]]) -> dict[str, str] | None:
    """The metadata[key]=value pairs of a job list's query ({} for metadata=null: jobs without
    metadata); None when there are none."""
    found: dict[str, str] | None = None
    for name, value in params:
        if name == "metadata":
            if value != "null":
                raise BadRequest(
                    f"metadata={echo(value)}: filter with metadata[key]=value, or metadata=null for jobs without "
                    "metadata",
                    param="metadata",
                )
            found = found or {}
            continue
        match = METADATA_PARAM_RE.match(name)
        if match:
            found = {**(found or {}), match.group(1): value}
    return found


def jobs_with_metadata(
    session: Session, wanted: dict[str, str], project_id: int | None, after: int | None, limit: int
) -> tuple[list[int], bool]:
    """Ids of jobs, newest first, whose /v1 metadata holds every wanted pair (none: jobs with no
    metadata), and whether more follow."""
    query = select(Job.id).where(col(Job.deleted_at).is_(None))
    if wanted:
        query = query.join(OpenAIJob, col(OpenAIJob.job_id) == col(Job.id))
        for key, value in wanted.items():
            query = query.where(col(OpenAIJob.job_metadata)[key].as_string() == value)
    else:
        query = query.outerjoin(OpenAIJob, col(OpenAIJob.job_id) == col(Job.id)).where(
            or_(
                col(OpenAIJob.job_id).is_(None),
                col(OpenAIJob.job_metadata).is_(None),
                cast(col(OpenAIJob.job_metadata), String).in_(["null", "{}"]),  # JSON's null, or no pairs
            )
        )
    if project_id is not None:
        query = query.where(col(Job.project_id) == project_id)
    if after is not None:
        query = query.where(col(Job.id) < after)
    ids = [i for i in session.exec(query.order_by(col(Job.id).desc()).limit(limit + 1)).all() if i is not None]
    return ids[:limit], len(ids) > limit


def read_extras(session: Session, job_ids: Sequence[int]) -> dict[int, OpenAIJob]:
    if not job_ids:
        return {}
    rows = session.exec(select(OpenAIJob).where(col(OpenAIJob.job_id).in_(list(job_ids)))).all()
    return {row.job_id: row for row in rows}


# ---- events: the native events and step logs, newest first --------------------------------------

WARNINGS = {
    EventKind.enqueue_delayed,
    EventKind.waiting,
    EventKind.checkpoint_discarded,
    EventKind.gpu_shared,
    EventKind.optimizer_replaced,
    EventKind.slowdown,
    EventKind.stopping,
    EventKind.batch_halved,
    EventKind.waiting_for_disk,
    EventKind.retried,
    EventKind.requeued,
    EventKind.checkpoint_corrupt,
    EventKind.tracker_failed,
}
# Figures of a method's step log named in a metrics event's message (the rest are in its data).
HEADLINE_METRICS = ("rewards/margins", "rewards/accuracies", "reward", "kl")
RESERVED_DATA_KEYS = frozenset(
    {"step", "total_steps", "epoch", "train_loss", "valid_loss", "learning_rate", "grad_norm", "tokens_per_second"}
)
# Step logs sort before events written at the same instant.
STEP_RANK, EVENT_RANK = 0, 1


def _event_object(row: JobEvent) -> FineTuningJobEvent:
    kind, kind_raw = understood(EventKind, row.kind)
    level: Literal["info", "warn", "error"] = (
        "error" if kind == EventKind.failed else "warn" if kind in WARNINGS else "info"
    )
    return FineTuningJobEvent(
        id=f"{EVENT_PREFIX}{row.id}",
        created_at=timestamp(row.created_at) or 0,
        level=level,
        message=row.message,
        type="message",
        data={"kind": kind, "kind_raw": kind_raw} if kind_raw else {"kind": kind},
    )


def _step_object(row: StepLog, total_steps: int | None) -> FineTuningJobEvent:
    of = f"/{total_steps}" if total_steps else ""
    figures = [f"training loss={row.loss:.4f}"] if row.loss is not None else []
    if row.eval_loss is not None:
        figures.append(f"validation loss={row.eval_loss:.4f}")
    own = row.method_metrics or {}
    figures += [f"{name}={own[name]:.4f}" for name in HEADLINE_METRICS if isinstance(own.get(name), (int, float))]
    data = {
        "step": row.step,
        "total_steps": total_steps,
        "epoch": row.epoch,
        "train_loss": row.loss,
        "valid_loss": row.eval_loss,
        "learning_rate": row.learning_rate,
        "grad_norm": row.grad_norm,
        "tokens_per_second": row.tokens_per_second,
        "num_tokens": row.num_tokens,
        # The method's own figures, under TRL's names (rewards/margins, reward, kl, ...).
        **{name: value for name, value in own.items() if name not in RESERVED_DATA_KEYS},
    }
    return FineTuningJobEvent(
        id=f"{STEP_EVENT_PREFIX}{row.id}",
        created_at=timestamp(row.created_at) or 0,
        level="info",
        message=f"Step {row.step}{of}: {', '.join(figures) or 'logged'}",
        type="metrics",
        data=data,
    )


def _older_than(table: Any, rank: int, cursor: tuple[datetime, int, int]) -> Any:
    """Rows of `table` (of this rank) that sort before the cursor's (created_at, rank, id)."""
    created_at, cursor_rank, cursor_id = cursor
    column = col(table.created_at)
    if rank < cursor_rank:
        return column <= created_at
    if rank > cursor_rank:
        return column < created_at
    return or_(column < created_at, and_(column == created_at, col(table.id) < cursor_id))


def list_events(
    session: Session, *, job_id: int, total_steps: int | None, after: str | None, limit: int
) -> tuple[list[FineTuningJobEvent], bool]:
    """A page of the job's events and step logs together, newest first; `after` an event id of the
    previous page."""
    cursor: tuple[datetime, int, int] | None = None
    if after is not None:
        is_step = after.startswith(STEP_EVENT_PREFIX)
        digits = after.removeprefix(STEP_EVENT_PREFIX if is_step else EVENT_PREFIX)
        row: JobEvent | StepLog | None = None
        if NATIVE_ID_RE.match(digits) and int(digits) <= MAX_DB_INT:
            row = session.get(StepLog, int(digits)) if is_step else session.get(JobEvent, int(digits))
        if row is None or row.job_id != job_id:
            raise BadRequest(f"after {after!r} is not an event of {JOB_PREFIX}{job_id}", param="after")
        assert row.id is not None
        cursor = (row.created_at, STEP_RANK if is_step else EVENT_RANK, row.id)
    found: list[tuple[datetime, int, int, FineTuningJobEvent]] = []
    events = select(JobEvent).where(JobEvent.job_id == job_id)
    steps = select(StepLog).where(StepLog.job_id == job_id)
    if cursor is not None:
        events = events.where(_older_than(JobEvent, EVENT_RANK, cursor))
        steps = steps.where(_older_than(StepLog, STEP_RANK, cursor))
    newest = (col(JobEvent.created_at).desc(), col(JobEvent.id).desc())
    for event in session.exec(events.order_by(*newest).limit(limit + 1)).all():
        found.append((event.created_at, EVENT_RANK, event.id or 0, _event_object(event)))
    newest = (col(StepLog.created_at).desc(), col(StepLog.id).desc())
    for step in session.exec(steps.order_by(*newest).limit(limit + 1)).all():
        found.append((step.created_at, STEP_RANK, step.id or 0, _step_object(step, total_steps)))
    found.sort(key=lambda entry: entry[:3], reverse=True)
    return [entry[3] for entry in found[:limit]], len(found) > limit


# ---- checkpoints --------------------------------------------------------------------------------


def checkpoint_metrics(session: Session, checkpoint: Checkpoint) -> CheckpointMetrics:
    """The step log at the checkpoint's step, or else the latest before it (`step` says which)."""
    row = session.exec(
        select(StepLog)
        .where(StepLog.job_id == checkpoint.job_id, col(StepLog.step) <= checkpoint.step)
        .order_by(col(StepLog.step).desc(), col(StepLog.id).desc())
        .limit(1)
    ).first()
    if row is None:
        return CheckpointMetrics()
    own = row.method_metrics or {}
    return CheckpointMetrics(
        step=row.step,
        train_loss=row.loss,
        valid_loss=row.eval_loss,
        full_valid_loss=row.eval_loss,
        train_mean_token_accuracy=own.get("mean_token_accuracy"),
        method_metrics=own or None,
    )


def checkpoint_object(session: Session, row: Checkpoint) -> FineTuningJobCheckpoint:
    base = f"/jobs/{row.job_id}/checkpoints/{row.name}"
    return FineTuningJobCheckpoint(
        id=f"{CHECKPOINT_PREFIX}{row.id}",
        created_at=timestamp(row.created_at) or 0,
        fine_tuned_model_checkpoint=base.lstrip("/"),
        fine_tuning_job_id=f"{JOB_PREFIX}{row.job_id}",
        metrics=checkpoint_metrics(session, row),
        step_number=row.step,
        name=row.name,
        status=understood(CheckpointStatus, row.status)[0] or CheckpointStatus.unknown,
        size=row.size_bytes,
        files_url=base,
        download_url=f"{base}/archive",
    )
