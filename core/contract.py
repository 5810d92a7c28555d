"""The words the service's processes and its clients share, as types: a job's status and phase,
its events' kinds, its failures' codes, and what the trainer reports to the worker when it ends.

The API's OpenAPI document is generated from these (its enums are these members), the README's
tables are checked against them (tests/test_contract.py), and the worker and the trainer write
nothing else."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    paused = "paused"  # by request, with a checkpoint to continue from; POST /jobs/{id}/resume
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    unknown = "unknown"  # read only, never written: see understood()

    @property
    def finished(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class CheckpointStatus(StrEnum):
    hashing = "hashing"  # on disk, sizes known, sha256 still being computed off the training path
    ready = "ready"
    removed = "removed"  # rotated away by save_total_limit, or lost from disk
    # A file no longer matches the sha256 recorded when it was hashed (a verification found it):
    # that file is not served and the job does not resume from it.
    corrupt = "corrupt"
    unknown = "unknown"  # read only, never written: see understood()


class Phase(StrEnum):
    """What a running job is doing, as its record shows it."""

    starting = "starting"  # the trainer process imports its libraries
    checking_data = "checking_data"
    loading_model = "loading_model"
    preparing = "preparing"  # TRL tokenizes (and packs) the rows
    training = "training"
    evaluating = "evaluating"
    saving = "saving"
    unknown = "unknown"  # read only, never written: see understood()


class ErrorCode(StrEnum):
    """`error.code` of a job that did not succeed: a stable word a client may branch on."""

    model_not_found = "model_not_found"
    dataset_invalid = "dataset_invalid"
    chat_template_missing = "chat_template_missing"
    chat_template_unsuitable = "chat_template_unsuitable"
    cuda_oom = "cuda_oom"
    disk_full = "disk_full"
    disk_error = "disk_error"
    storage_unavailable = "storage_unavailable"  # the shared store (STORAGE_URL) failed through every retry
    gpu_unavailable = "gpu_unavailable"
    backend_unavailable = "backend_unavailable"
    trainer_crashed = "trainer_crashed"
    worker_lost = "worker_lost"
    job_missing = "job_missing"
    cancelled = "cancelled"
    unknown = "unknown"  # read only, never written: see understood()


class EventKind(StrEnum):
    """The kinds of a job's events (GET /jobs/{id}/events), roughly in the order a job meets them."""

    queued = "queued"
    enqueue_delayed = "enqueue_delayed"  # Redis was away at submit; the reconciler enqueues it later
    started = "started"
    placed = "placed"  # by Ray (RAY_ADDRESS): the host and GPU of each rank
    waiting = "waiting"  # for an earlier attempt's trainer to let go of the job's folder
    resumed = "resumed"
    restarted = "restarted"  # an earlier attempt trained, but no checkpoint was left: from step 0 again
    checkpoint_discarded = "checkpoint_discarded"
    dataset_loaded = "dataset_loaded"
    gpu_shared = "gpu_shared"  # other processes hold memory on the job's GPU
    startup = "startup"  # seconds from the trainer's start to training, phase by phase
    optimizer_replaced = "optimizer_replaced"
    micro_batch_chosen = "micro_batch_chosen"  # per_device_train_batch_size "auto": the sizes timed and chosen
    training_started = "training_started"
    first_step = "first_step"  # the first step's seconds and how many of them compiling took
    evaluated = "evaluated"
    checkpoint = "checkpoint"
    checkpoint_removed = "checkpoint_removed"
    reporting_overhead = "reporting_overhead"
    measured = "measured"  # a succeeded job's peak memory and tokens/s against the plan (the planner learns)
    slowdown = "slowdown"  # tokens/s fell, with the cause when one is known
    stalled = "stalled"  # no training step for STALL_AFTER_S although the trainer process lives
    stall_ended = "stall_ended"  # steps came again after a stall
    cancel_requested = "cancel_requested"
    pause_requested = "pause_requested"
    paused = "paused"
    resume_requested = "resume_requested"
    stopping = "stopping"  # the worker was asked to stop: a checkpoint at the next step, then queued again
    batch_halved = "batch_halved"  # out of GPU memory: the same effective batch in smaller micro-batches
    waiting_for_disk = "waiting_for_disk"
    waiting_for_gpus = "waiting_for_gpus"  # the GPUs it asked for are leased to other jobs
    checkpoint_deleted = "checkpoint_deleted"
    checkpoint_corrupt = "checkpoint_corrupt"  # a verification found files that no longer match their sha256
    checkpoint_verified = "checkpoint_verified"  # verified on request, or intact again after being corrupt
    optimizer_state_dropped = "optimizer_state_dropped"
    tracker = "tracker"  # an experiment tracker of the spec's integrations started: where its run is
    tracker_failed = "tracker_failed"  # a tracker failed and was dropped; the job went on without it
    retried = "retried"
    requeued = "requeued"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    unknown = "unknown"  # read only, never written: see understood()


Word = TypeVar("Word", JobStatus, CheckpointStatus, Phase, ErrorCode, EventKind)


def understood(words: type[Word], stored: str | None) -> tuple[Word | None, str | None]:
    """A stored word as this version of the service reads it: (member, None) when it knows the
    word; (`unknown`, the word) when it does not, as for a row another version wrote (a rolling
    upgrade, a rollback): a reader shows it as `unknown` with the word beside it (`status_raw`,
    ...) instead of failing, and nothing acts on it. (None, None) when there is no word."""
    if stored is None:
        return None, None
    member = words._value2member_map_.get(stored)
    if member is None or member == "unknown":
        return words("unknown"), str(stored)
    return member, None  # type: ignore[return-value]


# Upper bounds (seconds) of the step-duration histogram the trainer keeps in the job's metrics
# (`step_seconds`: counts per bucket, sum and count) and GET /metrics exports.
STEP_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0)

# The trainer's result file, in the job's folder (DATA_DIR/jobs/<id>/), read by the worker.
RESULT_FILE = "result.json"
# Touched by the trainer at every step and micro-batch, in the job's folder: the worker's proof of
# progress (worker/stalls.py). It holds the number of the last step that ended (worker/standby.py
# starts the next standby trainer once there is one).
PROGRESS_FILE = "progress"
# Set by the worker for the trainer: the work horse's pid, whose death stops the trainer.
PARENT_PID_ENV = "FINETUNE_PARENT_PID"
# Set for a standby trainer, whose work horse is not its parent: it watches that pid instead.
PARENT_WATCHED_ENV = "FINETUNE_PARENT_WATCHED"
# A horse that asks the trainer fork server for a trainer waits this long for its pid (the fork
# itself takes milliseconds).
FORKSERVER_ANSWER_TIMEOUT_S = 10.0
# The name (/proc/PID/comm) of a standby trainer the fork server forked, whose command line is the
# server's: how `top`, the test harness and scripts/cpu_by_process.py tell it from the server.
FORKED_STANDBY_NAME = "trainer:standby"


class TrainerOutcome(StrEnum):
    """How a trainer process ended, in its result file. `interrupted`: stopped by the worker's
    SIGTERM before it finished (with a checkpoint when it was training); the job is queued again
    and resumes from its last checkpoint. `paused`: stopped by POST /jobs/{id}/pause, likewise with
    a checkpoint; the job waits for POST /jobs/{id}/resume."""

    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    interrupted = "interrupted"
    paused = "paused"


class TrainerResult(BaseModel):
    """`result.json`, which the trainer writes in the job's folder as it ends, for the worker."""

    model_config = ConfigDict(extra="allow")  # figures of its own (step, tokens) ride along

    status: TrainerOutcome
    error_code: ErrorCode | None = None
    error_message: str | None = None
    step: int | None = Field(default=None, ge=0, description="the last optimizer step the trainer finished")
    checkpoint: str | None = Field(default=None, description="the checkpoint a stopped trainer saved to resume from")

    def extra_fields(self) -> dict[str, Any]:
        return dict(self.model_extra or {})
