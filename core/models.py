"""Database tables. The database is the source of truth for jobs; Redis only carries work."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, Enum, Index, TypeDecorator, UniqueConstraint
from sqlalchemy.engine import Dialect
from sqlmodel import Field, SQLModel

from core.contract import CheckpointStatus as CheckpointStatus
from core.contract import JobStatus as JobStatus

# The project every job and file belongs to unless a token says otherwise: the one-person setup's
# (no tokens, or API_TOKENS), and what migration 0012 gave the jobs and files that existed before.
DEFAULT_PROJECT_ID = 1
DEFAULT_PROJECT_NAME = "default"


class Role(StrEnum):
    """What a principal may do: `admin` everything, in every project (the admin API, /audit,
    /storage, /metrics); `member` submit and change its own project's jobs and files; `viewer`
    read them."""

    admin = "admin"
    member = "member"
    viewer = "viewer"


class PrincipalKind(StrEnum):
    user = "user"  # a person
    project = "project"  # the project itself: a CI pipeline, a scheduler, a shared notebook


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite forgets the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class WordEnum(TypeDecorator[Any]):
    """A StrEnum column (the same type as SQLModel makes: SQLAlchemy's Enum) that reads a word it
    does not know, such as a status a newer version of the service wrote, as the plain string
    instead of failing the whole query: one such row must not break every list. Presenters show
    it as `unknown` with the word beside it (core.contract.understood). `unknown` is never written."""

    impl = Enum
    cache_ok = True

    def __init__(self, words: type[StrEnum]) -> None:
        super().__init__(words)
        self.words = words

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value == "unknown":
            raise ValueError(f"'unknown' is how an unknown {self.words.__name__} reads; it is never written")
        return value

    def result_processor(self, dialect: Dialect, coltype: object) -> Any:
        # Instead of Enum's own, which raises LookupError for a word it does not know.
        members = {member.name: member for member in self.words}

        def process(value: str | None) -> Any:
            return None if value is None else members.get(value, value)

        return process


def _ts(*, nullable: bool = True, index: bool = False) -> Any:
    return Field(default=None, sa_column=Column(UTCDateTime(), nullable=nullable, index=index))


class Project(SQLModel, table=True):
    """Who owns jobs and files, and the quotas its jobs share (None: no limit)."""

    __tablename__ = "project"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True)
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))
    # The most GPUs the project's jobs hold at once; the most of its jobs queued at once; the most
    # bytes its jobs' checkpoints may take under DATA_DIR.
    max_gpus: int | None = None
    max_queued_jobs: int | None = None
    max_checkpoint_bytes: int | None = Field(default=None, sa_column=Column(BigInteger(), nullable=True))


class Principal(SQLModel, table=True):
    """Who a token speaks for: a user or a project's own identity, in one project, with a role."""

    __tablename__ = "principal"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True)
    kind: str  # a PrincipalKind
    role: str  # a Role
    project_id: int = Field(foreign_key="project.id", index=True)
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))


class ApiToken(SQLModel, table=True):
    """A bearer token of a principal, kept as the SHA-256 of the token (app/auth.py says why not a
    slow password hash); `prefix` is the token's public part, shown in lists and the audit."""

    __tablename__ = "api_token"

    id: int | None = Field(default=None, primary_key=True)
    principal_id: int = Field(foreign_key="principal.id", index=True)
    prefix: str = Field(unique=True)
    sha256: str
    description: str | None = None
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))
    expires_at: datetime | None = _ts()
    revoked_at: datetime | None = _ts()
    # Requests a minute this token may make (None: RATE_LIMIT_PER_MINUTE).
    rate_limit_per_minute: int | None = None


class AuditEntry(SQLModel, table=True):
    """One request that may change state (any method but GET, HEAD, OPTIONS): who, what, when,
    from where, and how it ended. Kept AUDIT_RETENTION_DAYS."""

    __tablename__ = "audit_entry"
    __table_args__ = (Index("ix_audit_entry_at", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))
    # Copied, not referenced: an entry outlives its token and principal.
    principal: str | None = None
    role: str | None = None
    project: str | None = None
    token_prefix: str | None = None
    method: str
    path: str
    status_code: int | None = None  # None: the client went away before an answer was sent
    client: str | None = None  # host:port the request came from (behind a proxy: uvicorn --proxy-headers)
    target: str | None = None  # what it made, when the path does not say: "job 12", "file 3", "token ft_ab12cd34"
    duration_ms: float | None = None


class Job(SQLModel, table=True):
    """One fine-tuning job: the spec as submitted plus everything the worker reports."""

    __tablename__ = "job"
    __table_args__ = (
        Index("ix_job_status_id", "status", "id"),
        Index("ix_job_project_id_id", "project_id", "id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    project_id: int = Field(
        default=DEFAULT_PROJECT_ID, foreign_key="project.id", sa_column_kwargs={"server_default": "1"}
    )
    # The principal whose token submitted it (None: no tokens, or one of API_TOKENS).
    submitted_by: str | None = None
    status: JobStatus = Field(default=JobStatus.queued, sa_type=WordEnum(JobStatus))
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))
    started_at: datetime | None = _ts()
    finished_at: datetime | None = _ts()
    spec: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))

    backend: str | None = None
    versions: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    # The trainer that ran: {"method", "class", "path": "unsloth" | "trl", "reference"}.
    trainer: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))

    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    eta_seconds: float | None = None
    # What a running job is doing: checking_data, loading_model, preparing, training, evaluating, saving.
    phase: str | None = None
    metrics: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    vram: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    # Where the job runs: {"host", "gpus": [{index, name, uuid, memory_bytes}], "world_size",
    # "strategy" (ddp, fsdp or single), "effective_batch"}; set when a worker starts it.
    placement: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    # What the trainer found in the dataset before training (rows, token lengths, steps).
    data_report: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))

    error_code: str | None = None
    error_message: str | None = None
    # The tokens the job's trainers trained on, every attempt's (the steps a resumed job trains
    # again count again), added as each attempt ends; None until one has.
    trained_tokens: int | None = Field(default=None, sa_column=Column(BigInteger()))

    cancel_requested_at: datetime | None = _ts()
    pause_requested_at: datetime | None = _ts()
    # DELETE /jobs/{id} removes the job's logs, events, checkpoints and files and empties its spec;
    # the row stays as a tombstone so that its id is never given to another job (SQLite reuses
    # the largest rowid) and every API process's cache learns it is gone.
    deleted_at: datetime | None = _ts()
    # Times a worker started the job. Starts that followed a pause, a worker's graceful stop or a
    # micro-batch too large for the GPU are `requested_restarts` too: MAX_ATTEMPTS counts only the
    # others (attempts - requested_restarts), the starts that followed a lost worker.
    attempts: int = 0
    requested_restarts: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    worker_name: str | None = None
    heartbeat_at: datetime | None = _ts()
    # When a running job last made progress, once it has gone STALL_AFTER_S without a training
    # step (the worker's StallWatch); None while it steps.
    stalled_since: datetime | None = _ts()


class StepLog(SQLModel, table=True):
    """One row per logging step, written by the trainer's callback."""

    __tablename__ = "step_log"
    __table_args__ = (Index("ix_step_log_job_step", "job_id", "step"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="job.id", ondelete="CASCADE")
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))
    step: int
    epoch: float | None = None
    loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    num_tokens: int | None = Field(default=None, sa_column=Column(BigInteger()))
    eval_loss: float | None = None  # set on the steps where the validation set was evaluated
    # The method's own figures under TRL's names (rewards/margins, reward, kl, completions/mean_length,
    # ...; eval_ ones at evaluated steps).
    method_metrics: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    vram_allocated: int | None = Field(default=None, sa_column=Column(BigInteger()))
    vram_reserved: int | None = Field(default=None, sa_column=Column(BigInteger()))
    vram_peak_allocated: int | None = Field(default=None, sa_column=Column(BigInteger()))
    device_used: int | None = Field(default=None, sa_column=Column(BigInteger()))
    device_total: int | None = Field(default=None, sa_column=Column(BigInteger()))


class JobEvent(SQLModel, table=True):
    """A state change or a message worth showing a person (queued, started, checkpoint saved...)."""

    __tablename__ = "job_event"
    __table_args__ = (Index("ix_job_event_job_id", "job_id", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="job.id", ondelete="CASCADE")
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))
    kind: str
    message: str


class Checkpoint(SQLModel, table=True):
    """A Hugging Face model folder the trainer saved under the job's checkpoints directory."""

    __tablename__ = "checkpoint"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_checkpoint_job_name"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="job.id", ondelete="CASCADE", index=True)
    name: str
    step: int
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))
    status: CheckpointStatus = Field(default=CheckpointStatus.hashing, sa_type=WordEnum(CheckpointStatus))
    size_bytes: int = Field(default=0, sa_column=Column(BigInteger(), nullable=False))
    # [{"path": "model.safetensors", "size": 123, "sha256": "..." | null, "mtime_ns": ...}, ...]: size
    # and mtime_ns as they were when the file was hashed (a file whose stat differs has changed
    # since, and its sha256 is not vouched for); "corrupt": true on a file a verification found
    # no longer matching its sha256.
    files: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    removed_at: datetime | None = _ts()
    # Verification (core/checkpoint_verify.py): when the files were last hashed and compared; when
    # a whole verification was asked for (POST .../verify); when a download or a resume saw a file
    # whose size or mtime differs from its hashing's (only such files are hashed again then); and
    # when a verifier claimed the checkpoint (the claim of one that died expires).
    verified_at: datetime | None = _ts()
    verify_requested_at: datetime | None = _ts()
    changed_seen_at: datetime | None = _ts()
    verify_claimed_at: datetime | None = _ts()


class UploadedFile(SQLModel, table=True):
    """A dataset file uploaded with POST /files, stored under DATA_DIR/files; jobs name it by id."""

    __tablename__ = "file"

    id: int | None = Field(default=None, primary_key=True)
    project_id: int = Field(
        default=DEFAULT_PROJECT_ID, foreign_key="project.id", index=True, sa_column_kwargs={"server_default": "1"}
    )
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))
    filename: str  # the name the client uploaded it under
    path: str  # relative to DATA_DIR, e.g. "files/3.jsonl"
    size_bytes: int = Field(sa_column=Column(BigInteger(), nullable=False))
    sha256: str
    # messages, prompt_completion or text; None when no format fits the columns as uploaded (a
    # job's dataset.columns can still map them).
    row_format: str | None = None
    columns: list[str] | None = Field(default=None, sa_column=Column(JSON))
    rows: int = Field(sa_column=Column(BigInteger(), nullable=False))
    bad_rows: int = Field(default=0, sa_column=Column(BigInteger(), nullable=False, server_default="0"))
    bad_row_examples: list[str] | None = Field(default=None, sa_column=Column(JSON))


class WebhookDelivery(SQLModel, table=True):
    """One POST of a job's event to one of its webhooks: queued as the event happens, sent (and
    retried with backoff) by the API's sender, never by the processes that train."""

    __tablename__ = "webhook_delivery"
    __table_args__ = (Index("ix_webhook_delivery_due", "status", "next_attempt_at"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="job.id", ondelete="CASCADE", index=True)
    url: str
    event: str  # the event's kind (or "progress"; or the OpenAI event name, fine_tuning.job.succeeded, ...)
    payload: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))
    status: str = "pending"  # pending, sending, delivered, failed
    attempts: int = 0
    next_attempt_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))
    last_status_code: int | None = None
    last_error: str | None = None
    # The latest claim: when a sender took the delivery to send it, and which ("host:pid"). A
    # claim older than WEBHOOK_CLAIM_LEASE_S whose delivery is still `sending` belonged to a sender
    # that died mid-send: any sender takes it back (the receiver may get it twice).
    claimed_at: datetime | None = _ts()
    claimed_by: str | None = None


class OpenAIJob(SQLModel, table=True):
    """What a job submitted through the OpenAI-compatible view (POST /v1/fine_tuning/jobs) keeps
    beyond its spec: the request's `suffix` and `metadata`, shown on its /v1 job object. The job
    itself is the same Job row as any other."""

    __tablename__ = "openai_job"

    job_id: int = Field(primary_key=True, foreign_key="job.id", ondelete="CASCADE")
    suffix: str | None = None
    job_metadata: dict[str, str] | None = Field(default=None, sa_column=Column(JSON))


class IdempotencyKey(SQLModel, table=True):
    """An `Idempotency-Key` a create request carried (app/idempotency.py): whose it is, the route and
    a digest of the body it came with, and the job or file it made. Kept IDEMPOTENCY_KEYS_KEPT_S."""

    __tablename__ = "idempotency_key"
    __table_args__ = (
        UniqueConstraint("principal", "key", name="uq_idempotency_key_principal_key"),
        Index("ix_idempotency_key_created_at", "created_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    principal: str  # the principal's name (unique): keys of different principals never meet
    key: str
    route: str  # "POST /jobs", "POST /files", "POST /v1/files", "POST /v1/fine_tuning/jobs"
    resource: str  # "job" or "file"
    resource_id: int
    request_sha256: str
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))


class PlannerMeasurement(SQLModel, table=True):
    """What a finished job measured against what the planner said for it: its NVML peak and
    tokens/s beside the planned peak and tokens/s, with the shape that makes two jobs comparable
    (core/measurements.py; POST /jobs/estimate's `learned`). Kept when the job is deleted: a figure
    of the hardware, not of the job."""

    __tablename__ = "planner_measurement"
    __table_args__ = (Index("ix_planner_measurement_shape", "shape_key", "method"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: int  # not a foreign key: the measurement outlives the job
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))
    model: str
    # parameters:hidden:layers:intermediate:vocab: the same key is the same model shape
    shape_key: str
    method: str
    optim: str
    precision: str
    gpus: int
    strategy: str
    card: str  # the GPU's name, or "cpu"
    card_memory_bytes: int | None = Field(default=None, sa_column=Column(BigInteger(), nullable=True))
    micro_batch: int
    gradient_accumulation_steps: int
    max_seq_length: int
    steps: int
    planned_bytes: int | None = Field(default=None, sa_column=Column(BigInteger(), nullable=True))
    peak_bytes: int | None = Field(default=None, sa_column=Column(BigInteger(), nullable=True))  # NVML device used
    planned_tokens_per_second: float | None = None
    tokens_per_second: float | None = None  # the whole job's, first step left out
