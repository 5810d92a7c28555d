"""Turning what went wrong into a stable `error.code` and a message a person can act on."""

from __future__ import annotations

import errno
import traceback

LOG_HINT = "The trainer's full output is in the job's trainer.log."


class JobFailure(Exception):
    """A failure we understood: it carries the code and the message to show."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _is_oom(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name == "OutOfMemoryError" or "CUDA out of memory" in str(exc)


def classify(exc: BaseException, *, phase: str, step: int | None = None) -> JobFailure:
    """`phase` is what the trainer was doing: loading_model, loading_tokenizer, loading_dataset, training, saving."""
    if isinstance(exc, JobFailure):
        return exc
    detail = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}".rstrip(": ")
    if "No space left on device" in str(exc) or getattr(exc, "errno", None) == errno.ENOSPC:
        return JobFailure(
            "disk_full",
            f"The disk under DATA_DIR filled up while {phase.replace('_', ' ')}. A checkpoint of an N-billion "
            "parameter model takes about 4N GB (weights and optimizer state), the final model 2N GB: free space, "
            f"or set save_total_limit. ({detail})",
        )
    if _is_oom(exc):
        where = f" at step {step}" if step is not None else f" while {phase.replace('_', ' ')}"
        return JobFailure(
            "cuda_oom",
            f"The GPU ran out of memory{where}. Lower per_device_train_batch_size (and raise "
            "gradient_accumulation_steps to keep the effective batch) or max_seq_length, or train a "
            f"smaller model. ({detail}) {LOG_HINT}",
        )
    if phase in ("loading_model", "loading_tokenizer") and isinstance(exc, (OSError, ValueError)):
        return JobFailure(
            "model_not_found",
            f"Could not load the model or tokenizer: {detail}. Check the Hub id or local folder, that this "
            "worker can reach the Hub or has the model in its cache, and HF_TOKEN for gated models.",
        )
    if phase == "loading_dataset":
        return JobFailure(
            "dataset_invalid",
            f"Could not load the dataset: {detail}. Check the source and split, and that the worker can "
            "reach it.",
        )
    if phase == "saving" and isinstance(exc, OSError):
        return JobFailure("disk_error", f"Saving a checkpoint failed: {detail}. Check free space under DATA_DIR.")
    return JobFailure("trainer_crashed", f"The trainer failed while {phase.replace('_', ' ')}: {detail}. {LOG_HINT}")


def format_traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))
