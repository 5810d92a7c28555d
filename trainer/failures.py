"""Turning what went wrong into a stable `error.code` and a message a person can act on: every
message ends with what to do next."""

from __future__ import annotations

import traceback

from core.contract import ErrorCode
from core.diskspace import DiskSpace, is_disk_full_error

LOG_HINT = "The trainer's full output is in the job's trainer.log."
RESUBMIT = "then resubmit the job."
# What to do next, for failures whose message says only what happened.
NEXT_STEP: dict[ErrorCode, str] = {
    ErrorCode.dataset_invalid: "Fix the rows, or the job's dataset settings (source, split, columns, validation), "
    f"{RESUBMIT}",
    ErrorCode.model_not_found: "Check the Hub id or local folder, that this worker can reach the Hub or has the model "
    f"in its cache, and HF_TOKEN for gated models; {RESUBMIT}",
    ErrorCode.chat_template_missing: f"Set chat_template_from to a tokenizer that has a chat template, {RESUBMIT}",
    ErrorCode.disk_full: f"Free space on that disk (or lower save_total_limit, raise save_steps), {RESUBMIT}",
    ErrorCode.disk_error: f"Check the disk under DATA_DIR (the system log names the device's errors), {RESUBMIT}",
    ErrorCode.storage_unavailable: "Check that every host reaches STORAGE_URL (its endpoint, credentials and free "
    f"space), {RESUBMIT}",
    ErrorCode.trainer_crashed: f"{LOG_HINT} Fix what its traceback names, {RESUBMIT}",
}


class JobFailure(Exception):
    """A failure we understood: its code, and a message that ends with what to do next
    (`action`, or the code's usual next step when `action` is None; "" when `message` already
    says what to do)."""

    def __init__(self, code: ErrorCode, message: str, action: str | None = None) -> None:
        step = NEXT_STEP.get(code, "") if action is None else action
        text = message.rstrip()
        if step:
            text = f"{text if text.endswith(('.', '!', '?')) else text + '.'} {step}"
        super().__init__(text)
        self.code = code
        self.message = text


def storage_failure(exc: Exception, consequence: str) -> JobFailure:
    """The shared store failed through every retry (core/shared_store.StorageUnavailable)."""
    text = str(exc)
    return JobFailure(ErrorCode.storage_unavailable, f"{text[:1].upper()}{text[1:]}. {consequence}")


def _is_oom(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name == "OutOfMemoryError" or "CUDA out of memory" in str(exc)


def _detail(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}".rstrip(": ")


def classify(exc: BaseException, *, phase: str, step: int | None = None, disk: DiskSpace | None = None) -> JobFailure:
    """`phase` is what the trainer was doing: loading_model, loading_tokenizer, loading_dataset,
    training, saving. `disk` is the free space under the job's folder when it failed."""
    if isinstance(exc, JobFailure):
        return exc
    detail = _detail(exc)
    doing = phase.replace("_", " ")
    if is_disk_full_error(exc):
        figures = f" There is {disk.describe()}." if disk is not None else ""
        return JobFailure(
            ErrorCode.disk_full,
            f"The disk under DATA_DIR filled up while {doing} ({detail}).{figures} A checkpoint of an N-billion "
            "parameter model takes about 4N GB (weights and optimizer state), the final model 2N GB.",
        )
    if _is_oom(exc):
        where = f" at step {step}" if step is not None else f" while {doing}"
        return JobFailure(
            ErrorCode.cuda_oom,
            f"The GPU ran out of memory{where} ({detail}). {LOG_HINT}",
            action="Lower per_device_train_batch_size (and raise gradient_accumulation_steps to keep the effective "
            f"batch) or max_seq_length, or train a smaller model; {RESUBMIT}",
        )
    if phase in ("loading_model", "loading_tokenizer") and isinstance(exc, (OSError, ValueError)):
        return JobFailure(ErrorCode.model_not_found, f"Could not load the model or tokenizer: {detail}.")
    if phase == "loading_dataset":
        return JobFailure(
            ErrorCode.dataset_invalid,
            f"Could not load the dataset: {detail}.",
            action=f"Check the source and split, and that the worker can reach it; {RESUBMIT}",
        )
    if phase == "saving" and isinstance(exc, OSError):
        free = f" There is {disk.describe()}." if disk is not None else ""
        return JobFailure(ErrorCode.disk_error, f"Saving a checkpoint failed: {detail}.{free}")
    return JobFailure(ErrorCode.trainer_crashed, f"The trainer failed while {doing}: {detail}.")


def missing_source(what: str, path: str, code: ErrorCode) -> JobFailure:
    """A local model or dataset that was there when the job was submitted and is gone now."""
    return JobFailure(
        code,
        f"{what} {path} no longer exists on this host: it was there when the job was submitted "
        "and has been moved or deleted since.",
        action="Put it back, or give its new path, and resubmit the job.",
    )


def format_traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))
