"""The trainer child process: `python -m trainer JOB_ID`, started by the worker per job.

It runs a job phase by phase: loads the data and the model, trains with the TRL trainer of the
job's method (trainer/methods/: SFT, DPO, ORPO, KTO or GRPO, through Unsloth's patched trainers on
a GPU), reports through JobReporter, and writes its outcome to `result.json` in the job folder for
the worker to read. Importing this module imports nothing heavy: the backend decides what is
imported, and `import unsloth` must come before transformers and trl."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from core.checkpoint_store import FINAL_NAME, intermediate_folders, newest_complete, sweep_partials, sync_records
from core.checkpoint_verify import corrupt_checkpoints, resume_problem
from core.config import get_settings
from core.contract import (
    PARENT_PID_ENV,
    PARENT_WATCHED_ENV,
    RESULT_FILE,
    ErrorCode,
    EventKind,
    Phase,
    TrainerOutcome,
    TrainerResult,
)
from core.data_report import DataReport, ValidationReport
from core.db import session_scope
from core.diskspace import disk_space
from core.events import add_event
from core.models import Job
from core.shared_store import FETCH_LOCK, SharedStore, StorageUnavailable, StoreMismatch, get_store, host_lock
from core.spec import GPU_ONLY_OPTIMIZERS, JobSpec
from core.stop_requests import mark_ready
from trainer import distributed, methods, preload
from trainer.failures import JobFailure, classify, format_traceback, missing_source, storage_failure
from trainer.lifeline import die_with_parent, take_job_lock, watch_parent
from trainer.methods.base import TrainerContext, TrainingMethod
from trainer.stack_sampler import StackSampler
from trainer.stopflag import StopFlag

logger = logging.getLogger("trainer")

# Phases during which a SIGTERM waits for the next step (the loop checks the flag); in the others
# (imports, loading, preparing) nothing is worth finishing, so the trainer leaves at once.
STEPPING_PHASES = frozenset({"training", "evaluating", "saving"})
# The trainer's phases, as the job record shows them while the job runs.
PUBLIC_PHASES = {
    "starting": Phase.starting,
    "importing": Phase.starting,
    "loading_tokenizer": Phase.checking_data,
    "loading_dataset": Phase.checking_data,
    "loading_model": Phase.loading_model,
    "preparing": Phase.preparing,
    "training": Phase.training,
    "evaluating": Phase.evaluating,
    "saving": Phase.saving,
}
# Unsloth 2026.10.9 runs DDP, and FSDP2 of its own when UNSLOTH_FSDP2=1 is set before its import:
# it shards the model before the optimizer exists, steps bitsandbytes' 8-bit Adam on the local
# shards and gathers full checkpoints (docs/scheduling.md, "What runs where"). Its layout follows
# the planner (core/planner.fsdp_layout): "fit" keeps the weights gathered through a step (fast);
# "sharded" divides everything and reduces gradients at each micro-batch, since the default for
# that layout ("skip") holds every gradient unsharded in float32 until the last micro-batch.
UNSLOTH_FSDP_LAYOUT_ENV = {
    "fit": {"UNSLOTH_FSDP2_LAYOUT": "fit"},
    "sharded": {"UNSLOTH_FSDP2_LAYOUT": "sharded", "UNSLOTH_FSDP2_GA_SYNC": "each"},
}
VERSION_PACKAGES = (
    "torch",
    "transformers",
    "trl",
    "datasets",
    "accelerate",
    "unsloth",
    "unsloth_zoo",
    "bitsandbytes",
    "torchao",
)


class Interrupted(BaseException):
    """Raised by the SIGTERM handler outside the training loop: leave now, the job runs again."""


def write_result(
    job_dir: Path, status: TrainerOutcome, code: ErrorCode | None = None, message: str | None = None, **extra: Any
) -> None:
    if not distributed.is_main():  # rank 0 speaks for a job of several ranks
        return
    tmp = job_dir / f"{RESULT_FILE}.tmp"
    result = TrainerResult(status=status, error_code=code, error_message=message, **extra)
    try:
        tmp.write_text(result.model_dump_json())
        tmp.replace(job_dir / RESULT_FILE)
    except OSError as exc:  # a full disk: the worker finds no result and judges by the free space
        logger.error("could not write %s: %s", RESULT_FILE, exc)
        tmp.unlink(missing_ok=True)


def trained(run: Any) -> dict[str, Any]:
    """The tokens this trainer trained on (every rank's), for result.json: the worker adds each
    attempt's to the job's trained_tokens."""
    reporter = getattr(run, "reporter", None)
    return {"tokens": int(reporter.tokens_trained())} if reporter is not None else {}


def run_name(spec: JobSpec, job_id: int) -> str:
    """The run's name in the trackers: the one an integration gives (W&B's name, MLflow's run_name),
    else job-<id>."""
    for integration in spec.integrations:
        name = getattr(getattr(integration, integration.type, None), "name", None) or getattr(
            getattr(integration, integration.type, None), "run_name", None
        )
        if name:
            return str(name)
    return f"job-{job_id}"


def versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    for name in VERSION_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def event(job_id: int, kind: EventKind, message: str) -> None:
    if not distributed.is_main():
        return
    with session_scope() as session:
        add_event(session=session, job_id=job_id, kind=kind, message=message)


class Run:
    """One training run of one job, phase by phase, so a failure knows what it interrupted."""

    def __init__(self, job_id: int, started: float | None = None) -> None:
        started = time.monotonic() if started is None else started
        self.job_id = job_id
        self.settings = get_settings()
        self.job_dir = self.settings.job_dir(job_id)
        self.checkpoints_dir = self.settings.checkpoints_dir(job_id)
        self._phase = "starting"
        # "starting" counts from the process's start (the interpreter and this module's imports).
        self._phase_since = started
        self.phase_seconds: dict[str, float] = {}
        self.stop = StopFlag(self.job_dir)
        self.reporter: Any = None
        self.trainer: Any = None
        self.spec: JobSpec
        self.method: TrainingMethod
        self.strategy = "single"  # single, ddp or fsdp: the worker's choice (job.placement)
        self.fsdp_layout: str | None = None  # fit or sharded, for Unsloth's FSDP: also the worker's
        self.stopper: Any = None
        self.trackers: list[Any] = []  # trainer.trackers.Tracker
        self.fp8: Any = None  # trainer.precision.Fp8Conversion of a precision fp8 job
        self.precision: Any = None  # trainer.precision.ChosenPrecision: the spec's, or auto's choice
        self.prefetch: Any = None  # trainer.prefetch.Prefetch: the weights read ahead
        self.preloaded: str | None = None  # how the standby trainer preloaded the model, if it did
        self.attempt = 0
        self.earlier_step = 0
        # First of all: a cancel or SIGTERM that arrives while the trainer starts must not kill it
        # with the signal's default action (the worker would see a crash, not a stop). The worker
        # signals this process only once it has said so (core/stop_requests.py); what was asked
        # before, it finds in the request file (load_job).
        self.install_signal_handlers()
        mark_ready(self.job_dir)

    def load_job(self) -> None:
        with session_scope() as session:
            job = session.get(Job, self.job_id)
            if job is None:
                raise JobFailure(ErrorCode.job_missing, f"job {self.job_id} is not in the database")
            # The spec checks shapes only: the API checked the paths on submit (app/sources.py), and
            # what has happened to them since is a failure with its own code (check_sources).
            self.spec = JobSpec.model_validate(job.spec)
            self.method = methods.for_spec(self.spec)
            placement = job.placement or {}
            self.strategy = str(placement.get("strategy") or "single")
            self.fsdp_layout = placement.get("fsdp_layout")
            self.attempt = job.attempts
            self.earlier_step = job.step  # how far earlier attempts got (a resume should start there)
            requested = "cancelled" if job.cancel_requested_at else "paused" if job.pause_requested_at else None
        if requested:  # asked for before this process could take the signal
            self.stop.set(requested)
        self.stop.sample()  # the worker's request file: asked for before we were ready for signals
        if self.stop.requested is not None:
            self._stop(self.stop.requested)
        self.check_sources()

    def check_sources(self) -> None:
        """Local models and datasets that were deleted or moved while the job waited."""
        spec = self.spec
        validation = spec.validation.source if spec.validation is not None else ""
        for what, value, code in (
            ("the model folder", spec.model, ErrorCode.model_not_found),
            ("chat_template_from's folder", spec.chat_template_from, ErrorCode.model_not_found),
            ("the dataset", spec.dataset.source, ErrorCode.dataset_invalid),
            ("the validation set", validation, ErrorCode.dataset_invalid),
        ):
            if value and Path(value).is_absolute() and not Path(value).exists() and not self.fetch_upload(Path(value)):
                raise missing_source(what, value, code)

    def fetch_upload(self, path: Path) -> bool:
        """An uploaded dataset (under DATA_DIR/files) that this host does not have: from the shared
        store, where the API that took the upload published it."""
        store = get_store()
        if store is None or path.parent != self.settings.files_dir():
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with host_lock(path.parent / FETCH_LOCK):
                return path.exists() or store.fetch_upload(path)
        except StorageUnavailable as exc:
            raise storage_failure(exc, f"The job could not download its dataset {path.name}") from exc

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, name: str) -> None:
        """What the run is doing; written to the job record when its public name changes. Each
        phase's seconds are kept for the startup event (where a job's first minutes go)."""
        now = time.monotonic()
        self.phase_seconds[self._phase] = self.phase_seconds.get(self._phase, 0.0) + now - self._phase_since
        self._phase_since = now
        changed = PUBLIC_PHASES[name] != PUBLIC_PHASES[self._phase]
        self._phase = name
        if changed and distributed.is_main():
            with session_scope() as session:
                job = session.get(Job, self.job_id)
                if job is not None:
                    job.phase = PUBLIC_PHASES[name]
                    session.add(job)

    def install_signal_handlers(self) -> None:
        # The worker sends SIGUSR1 to cancel and SIGUSR2 to pause; SIGTERM (the worker stopping,
        # docker stop, the death of the work horse) stops at the next step instead of killing
        # mid-write. Pause and SIGTERM save a checkpoint at that step to continue from.
        signal.signal(signal.SIGUSR1, lambda *_: self._stop("cancelled"))
        signal.signal(signal.SIGUSR2, lambda *_: self._stop("paused"))
        signal.signal(signal.SIGTERM, lambda *_: self._stop("terminated"))
        signal.signal(signal.SIGHUP, lambda *_: self._stop("worker_lost"))  # the kernel: our parent died
        from trainer.failpoints import ignores_stop_signals

        if ignores_stop_signals():  # a fault test: the requests must arrive through their file alone
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)

    def _stop(self, reason: str) -> None:
        self.stop.set(reason)
        if self._phase not in STEPPING_PHASES:
            raise Interrupted(f"{reason} while {self._phase.replace('_', ' ')}")

    def prepare_checkpoints(self) -> Path | None:
        """Clear what a stopped attempt left (unfinished staging folders, incomplete checkpoints),
        record complete checkpoints it never recorded, and return the one to resume from. Rank 0
        clears; the other ranks wait for it, then find the same checkpoint."""
        store = get_store()
        if store is not None:
            return self.prepare_from_store(store)
        if not distributed.is_main():
            distributed.barrier()
            with session_scope() as session:
                corrupt = corrupt_checkpoints(session, self.job_id)
            return newest_complete(self.checkpoints_dir, corrupt)[0]
        for name, size in sweep_partials(self.checkpoints_dir):
            event(
                self.job_id,
                EventKind.checkpoint_discarded,
                f"removed {name}, a checkpoint an earlier attempt did not finish writing ({size} bytes)",
            )
        resume_from, incomplete = newest_complete(self.checkpoints_dir)
        for folder, problem in incomplete:
            shutil.rmtree(folder, ignore_errors=True)
            event(self.job_id, EventKind.checkpoint_discarded, f"removed {folder.name}: it is incomplete ({problem})")
        with session_scope() as session:
            sync_records(session=session, job_id=self.job_id, checkpoints_dir=self.checkpoints_dir)
        resume_from = self.trusted(resume_from)
        distributed.barrier()
        return resume_from

    def prepare_from_store(self, store: SharedStore) -> Path | None:
        """With a shared store (STORAGE_URL) the newest checkpoint committed there is the one to
        resume from, on whichever host a rank runs: every rank makes sure its host has it in
        DATA_DIR (one download per host; the host's other ranks find it there). Local folders the
        store never committed (a save whose copy failed) are not resumed from: rank 0 removes them."""
        try:
            committed = store.intermediates(self.job_id)
        except StorageUnavailable as exc:
            raise storage_failure(exc, "The job could not learn which checkpoint to resume from") from exc
        if distributed.is_main():
            for name, size in sweep_partials(self.checkpoints_dir):
                event(
                    self.job_id,
                    EventKind.checkpoint_discarded,
                    f"removed {name}, a checkpoint an earlier attempt did not finish writing ({size} bytes)",
                )
            for folder in intermediate_folders(self.checkpoints_dir):
                if folder.name not in committed:
                    shutil.rmtree(folder, ignore_errors=True)
                    event(
                        self.job_id,
                        EventKind.checkpoint_discarded,
                        f"removed {folder.name}: it was never committed to the shared store",
                    )
        distributed.barrier()
        with session_scope() as session:
            corrupt = corrupt_checkpoints(session, self.job_id)
        resume_from = None
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        with host_lock(self.checkpoints_dir / FETCH_LOCK):
            for name in (n for n in committed if n not in corrupt):
                try:
                    resume_from = store.fetch_checkpoint(self.job_id, name, self.checkpoints_dir)
                except StoreMismatch as exc:
                    event(self.job_id, EventKind.checkpoint_discarded, f"not resuming from {name}: {exc}")
                except StorageUnavailable as exc:
                    raise storage_failure(exc, f"The job could not download {name} to resume from it") from exc
                if resume_from is not None:
                    break
        if distributed.is_main():
            with session_scope() as session:
                sync_records(session=session, job_id=self.job_id, checkpoints_dir=self.checkpoints_dir)
        return resume_from

    def trusted(self, newest: Path | None) -> Path | None:
        """The newest complete checkpoint that is not corrupt: one known corrupt, or whose files
        changed since they were hashed and no longer match, is passed over (and kept, for the
        operator to restore or delete), with an event."""
        passed_over: dict[str, str] = {}
        while newest is not None:
            problem = resume_problem(self.job_id, newest)
            if problem is None:
                return newest
            passed_over[newest.name] = problem
            event(
                self.job_id,
                EventKind.checkpoint_discarded,
                f"not resuming from {newest.name}: {problem}; it is kept on disk, and the job resumes from an "
                "older checkpoint, or starts over without one",
            )
            newest = newest_complete(self.checkpoints_dir, passed_over)[0]
        return None

    def resolve_backend(self) -> str:
        import torch

        has_cuda = torch.cuda.is_available()
        if self.strategy == "fsdp" and not has_cuda:
            raise JobFailure(
                ErrorCode.gpu_unavailable,
                "strategy 'fsdp' needs CUDA GPUs (accelerate shards a model only across accelerator devices, and "
                "Unsloth needs CUDA) and this worker's ranks see none.",
                action="Resubmit the job with strategy 'ddp' to train on this host's CPU ranks, or run it on a "
                "GPU host.",
            )
        backend = self.spec.backend
        if backend == "auto":
            backend = "unsloth" if has_cuda else "transformers"
        if backend == "unsloth" and not has_cuda:
            raise JobFailure(
                ErrorCode.gpu_unavailable,
                "backend 'unsloth' needs a CUDA GPU and this worker sees none.",
                action="Check the worker's CUDA_VISIBLE_DEVICES and NVIDIA driver, or resubmit the job with "
                "backend 'transformers'.",
            )
        if backend == "unsloth":
            if self.strategy == "fsdp":
                os.environ.update(self.unsloth_fsdp_env())  # read by Unsloth at import and in Trainer.__init__
            try:
                import unsloth  # noqa: F401  (patches transformers and trl: must come first)
            except Exception as exc:  # never train silently on another backend
                raise JobFailure(
                    ErrorCode.backend_unavailable,
                    f"backend 'unsloth' was chosen but Unsloth failed to import: {type(exc).__name__}: {exc}.",
                    action="Install the gpu extra (pip install '.[gpu]') on this worker, then resubmit the job.",
                ) from exc
        return backend

    def unsloth_fsdp_env(self) -> dict[str, str]:
        """Unsloth's FSDP2, in the layout the worker planned (none planned: Unsloth picks it)."""
        logger.info("Unsloth FSDP2, layout %s", self.fsdp_layout or "of Unsloth's choosing")
        return {"UNSLOTH_FSDP2": "1", **UNSLOTH_FSDP_LAYOUT_ENV.get(self.fsdp_layout or "", {})}

    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        self.phase = "loading_tokenizer"
        tokenizer = AutoTokenizer.from_pretrained(self.spec.model)
        return self.apply_chat_template(tokenizer)

    @functools.cached_property
    def borrowed_chat_template(self) -> str | None:
        """chat_template_from's template, loaded once (the Unsloth path sets up two tokenizers)."""
        if not self.spec.chat_template_from:
            return None
        from transformers import AutoTokenizer

        donor = AutoTokenizer.from_pretrained(self.spec.chat_template_from)
        if not donor.chat_template:
            raise JobFailure(
                ErrorCode.chat_template_missing,
                f"chat_template_from {self.spec.chat_template_from!r} has no chat template.",
            )
        return str(donor.chat_template)

    def apply_chat_template(self, tokenizer: Any) -> Any:
        if self.borrowed_chat_template is not None:
            tokenizer.chat_template = self.borrowed_chat_template
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def training_chat_template(self, tokenizer: Any) -> str | None:
        """For assistant_only_loss: the chat template with {% generation %} markers that TRL will
        use (None: the tokenizer's own has them). Asked here, before the model is loaded."""
        if not self.spec.hyperparameters.assistant_only_loss:
            return None
        from trl.chat_template_utils import get_training_chat_template

        try:
            return get_training_chat_template(tokenizer)
        except ValueError as exc:
            raise JobFailure(
                ErrorCode.chat_template_unsuitable,
                "assistant_only_loss needs a chat template that marks the assistant's tokens ({% generation %}); "
                f"TRL adds the marks to the templates it knows, but not to this one ({exc}).",
                action="Set chat_template_from to a tokenizer whose template TRL knows (Llama 3, Qwen 2.5/3, Gemma, "
                "Phi-3, ...), add the marks to the template, or train on whole conversations "
                "(assistant_only_loss false); then resubmit the job.",
            ) from None

    def check_data(self, tokenizer: Any) -> tuple[Any, Any]:
        """Open, check and measure the dataset (and validation set) before the model takes the GPU."""
        from trainer.data import load_checked

        self.phase = "loading_dataset"
        spec, hp, method = self.spec, self.spec.hyperparameters, self.method
        limit = self.settings.max_bad_row_fraction
        dataset, check = load_checked(
            spec.dataset.source,
            spec.dataset.split,
            spec.dataset.columns,
            what="the dataset",
            max_bad_fraction=limit,
            max_row_bytes=self.settings.max_row_bytes,
            formats=method.formats,
            required=method.required_columns(),
        )
        row_format = check.row_format
        assert row_format is not None
        problem = method.option_problem(check)
        if problem:
            raise JobFailure(ErrorCode.dataset_invalid, problem)
        if check.conversational and not tokenizer.chat_template:
            raise JobFailure(
                ErrorCode.chat_template_missing,
                "The dataset holds chat messages but the model's tokenizer has no chat template.",
                action="Set chat_template_from to a tokenizer that has one (e.g. the model's instruct version), "
                "then resubmit the job.",
            )
        eval_dataset, eval_check = self.validation_set(dataset, row_format)
        dataset = method.prepare(dataset, row_format)
        if eval_dataset is not None and eval_check is not None:
            assert eval_check.row_format is not None
            eval_dataset = method.prepare(eval_dataset, eval_check.row_format)
        held_out = spec.validation.fraction if spec.validation is not None else None
        if held_out is not None:
            split = dataset.train_test_split(test_size=held_out, seed=hp.seed)
            dataset, eval_dataset = split["train"], split["test"]
        template = self.training_chat_template(tokenizer)
        dataset, measured = method.measure(
            dataset, row_format=row_format, tokenizer=tokenizer, template=template, what="the dataset"
        )
        report = method.report(measured, check)
        if eval_dataset is not None:
            eval_format = eval_check.row_format if eval_check is not None and eval_check.row_format else row_format
            eval_dataset, eval_measured = method.measure(
                eval_dataset, row_format=eval_format, tokenizer=tokenizer, template=template, what="the validation set"
            )
            eval_trained = eval_measured.trained
            report.validation = ValidationReport(
                **(eval_check.summary() if eval_check is not None else {"fraction": held_out}),
                rows_used=len(eval_dataset),
                tokens=int(eval_trained.sum()) if eval_trained is not None else None,
                loss_tokens=int(eval_measured.loss_tokens.sum()) if eval_measured.loss_tokens is not None else None,
            )
        self.save_report(report)
        event(self.job_id, EventKind.dataset_loaded, self.dataset_message(report, check, eval_dataset))
        return dataset, eval_dataset

    def dataset_message(self, report: DataReport, check: Any, eval_dataset: Any) -> str:
        hp = self.spec.hyperparameters
        lengths = report.tokens_per_row
        assert lengths is not None
        identical = f", {check.identical_pairs} of them with two identical answers" if check.identical_pairs else ""
        skipped = f" ({check.bad_rows} malformed row(s) skipped{identical})" if check.bad_rows else ""
        held = f"; {len(eval_dataset)} validation rows" if eval_dataset is not None else ""
        what = {"sft": "rows", "grpo": "prompts", "kto": "rows"}.get(self.spec.method, "pairs")
        room = hp.max_seq_length - (hp.max_completion_length or 0)
        limit = (
            f"prompt(s) longer than max_seq_length - max_completion_length ({room}), left out"
            if self.spec.method == "grpo"
            else f"{what[:-1]}(s) longer than max_seq_length {hp.max_seq_length}"
        )
        loss = (
            f"; {report.loss_tokens_per_epoch} tokens in the loss per epoch"
            if report.loss_tokens_per_epoch is not None
            else ""
        )
        tokens = f", {report.tokens_to_train} tokens to train" if report.tokens_to_train is not None else ""
        return (
            f"{report.rows_used} {what} in {check.row_format!r} format{skipped}{held}; tokens per "
            f"{what[:-1]} median {lengths.median}, max {lengths.max}; {report.rows_truncated} {limit}{loss}; "
            f"{report.optimizer_steps} optimizer steps{tokens}"
        )

    def validation_set(self, dataset: Any, row_format: str) -> tuple[Any, Any]:
        """(validation rows, their check): another split or source, checked as the dataset is; for a
        held-out fraction, (the dataset itself, None) and the caller splits it."""
        from trainer.data import load_checked

        validation = self.spec.validation
        if validation is None:
            return None, None
        if validation.fraction is not None:
            return dataset, None
        source = validation.source or self.spec.dataset.source
        rows, check = load_checked(
            source,
            validation.split or "train",
            self.spec.dataset.columns,
            what="the validation set",
            max_bad_fraction=self.settings.max_bad_row_fraction,
            max_row_bytes=self.settings.max_row_bytes,
            formats=self.method.formats,
            required=self.method.required_columns(),
        )
        if check.row_format != row_format and self.spec.method == "sft":
            raise JobFailure(
                ErrorCode.dataset_invalid,
                f"the validation set's rows are {check.row_format!r} but the "
                f"dataset's are {row_format!r}; both need the same format",
            )
        return rows, check

    def save_report(self, report: DataReport) -> None:
        if not distributed.is_main():
            return
        with session_scope() as session:
            job = session.get(Job, self.job_id)
            assert job is not None
            job.data_report = report.model_dump()
            session.add(job)

    def record_trainer(self, trainer: Any) -> None:
        """The record's `trainer`: the method, the class that trains, Unsloth's or TRL's."""
        path = self.method.trainer_path(trainer)
        path["precision"] = self.precision.precision if torch_on_gpu() and self.precision else "fp32"
        if self.fp8 is not None:
            path.update(fp8_recipe=self.fp8.recipe, fp8_layers=len(self.fp8.layers), fp8_compiled=self.fp8.compiled)
        logger.info("training with %s (%s's) for method %s", path["trainer_class"], path["path"], path["method"])
        if not distributed.is_main():
            return
        with session_scope() as session:
            job = session.get(Job, self.job_id)
            assert job is not None
            job.trainer = path
            session.add(job)

    def refine_report(self, trainer: Any) -> None:
        """Sequences and steps as TRL actually prepared them (packing, rows it dropped)."""
        from core.planner import optimizer_steps

        if not distributed.is_main():
            return
        with session_scope() as session:
            job = session.get(Job, self.job_id)
            assert job is not None and job.data_report is not None
            sequences = self.method.sequences_prepared(trainer.train_dataset)
            report = DataReport.model_validate(job.data_report).model_copy(
                update={
                    "sequences_per_epoch": sequences,
                    "sequences_estimated": False if self.spec.method == "sft" else None,
                    "optimizer_steps": optimizer_steps(self.spec.hyperparameters, sequences),
                    "loss_tokens_prepared": prepared_loss_tokens(trainer.train_dataset),
                }
            )
            job.data_report = report.model_dump()
            session.add(job)

    def load_model(self, backend: str, tokenizer: Any) -> tuple[Any, Any]:
        """The model, and the tokenizer to train with (Unsloth brings its own, patched): the one the
        standby trainer preloaded where it is this job's (trainer/preload.py), else loaded now."""
        self.phase = "loading_model"
        request = preload.Request(self.spec.model, backend, self.spec.hyperparameters.max_seq_length)
        preloaded = preload.take(request) if distributed.world_size() == 1 else None
        if preloaded is not None:
            self.preloaded = preloaded.describe()
            model, own_tokenizer = preloaded.model, preloaded.tokenizer
        else:
            preload.release()
            model, own_tokenizer = preload.load_pretrained(request)
        if backend == "unsloth":
            return model, self.apply_chat_template(own_tokenizer)
        return model, tokenizer

    def training_arguments(self, backend: str, *, evaluate: bool) -> dict[str, Any]:
        """TrainingArguments every method's TRL config takes (its own it adds: trainer/methods/)."""
        import torch

        hp = self.spec.hyperparameters
        on_gpu = torch.cuda.is_available()
        optim = hp.optim
        if not on_gpu and optim in GPU_ONLY_OPTIMIZERS:
            optim = "adamw_torch"
            event(
                self.job_id,
                EventKind.optimizer_replaced,
                f"optimizer {hp.optim!r} needs a CUDA GPU; this worker has none, so adamw_torch is used",
            )
        elif self.strategy == "fsdp" and backend == "transformers" and optim in GPU_ONLY_OPTIMIZERS:
            # Seen on 2 x H200 (docs/scheduling.md): accelerate's FSDP2 hands bitsandbytes DTensors it
            # cannot update, and FSDP1 trains but cannot gather its states into a checkpoint (tensors
            # on two devices). Sharding already divides the optimizer's states among the GPUs.
            # (Unsloth's own FSDP2 steps bitsandbytes on the local shards: the job's optimizer stays.)
            optim = "adamw_torch_fused"
            event(
                self.job_id,
                EventKind.optimizer_replaced,
                f"optimizer {hp.optim!r} (bitsandbytes) cannot be sharded by FSDP, so adamw_torch_fused is used: "
                f"its 32-bit states are sharded across the job's {distributed.world_size()} GPUs",
            )
        return dict(
            output_dir=str(self.checkpoints_dir),
            per_device_train_batch_size=hp.micro_batch,
            gradient_accumulation_steps=hp.gradient_accumulation_steps,
            learning_rate=hp.learning_rate,
            num_train_epochs=hp.num_train_epochs,
            max_steps=hp.max_steps or -1,
            warmup_steps=hp.warmup_ratio,  # transformers 5: a value below 1 is a ratio of all steps
            lr_scheduler_type=hp.lr_scheduler_type,
            optim=optim,
            weight_decay=hp.weight_decay,
            max_grad_norm=hp.max_grad_norm,
            seed=hp.seed,
            logging_steps=hp.logging_steps,
            save_strategy="steps",
            save_steps=hp.save_steps,
            save_total_limit=hp.save_total_limit,
            eval_strategy="steps" if evaluate else "no",
            eval_steps=hp.eval_steps or hp.logging_steps,
            per_device_eval_batch_size=hp.per_device_eval_batch_size or hp.micro_batch,
            # Only the loss: gathering logits (vocabulary x sequence per row) would fill the GPU.
            prediction_loss_only=True,
            bf16=on_gpu,
            use_cpu=not on_gpu,
            # Unsloth brings its own (offloading) gradient checkpointing; the plain backend uses HF's
            # (FSDP's own activation checkpointing replaces it there: distributed_config).
            gradient_checkpointing=backend == "transformers" and self.strategy != "fsdp",
            # Trackers are added as callbacks of their own, guarded (trainer/trackers.py).
            report_to="none",
            run_name=run_name(self.spec, self.job_id),
            disable_tqdm=False,
            **self.distributed_config(backend, on_gpu=on_gpu),
        )

    def distributed_config(self, backend: str, *, on_gpu: bool) -> dict[str, Any]:
        """SFTConfig's fields for a job of several ranks: DDP, or FSDP sharding each decoder layer
        (the model's own _no_split_modules) with activation checkpointing in place of the Trainer's."""
        if distributed.world_size() == 1:
            return {}
        fields: dict[str, Any] = {"ddp_backend": "nccl" if on_gpu else "gloo"}
        if self.strategy == "fsdp" and backend == "transformers":
            fields["fsdp"] = "full_shard auto_wrap"
            fields["fsdp_config"] = {
                "fsdp_version": 1,
                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                # `final` is one Hugging Face folder, gathered from the shards on rank 0.
                "state_dict_type": "FULL_STATE_DICT",
                "activation_checkpointing": True,
            }
        elif self.strategy == "ddp":
            # Every parameter gets a gradient in a full fine-tune: no search for unused ones.
            fields["ddp_find_unused_parameters"] = False
        # (Unsloth's own FSDP2 shards the model in the Trainer's __init__: nothing to set here.)
        return fields

    def train(self) -> None:
        job_id = self.job_id
        # The page cache is the host's: one reader is enough, and none where the standby has loaded
        # the model already.
        if distributed.is_main() and not preload.holds(self.spec.model):
            from trainer import prefetch

            self.prefetch = prefetch.start(self.spec.model)  # while the imports below take their time
        self.report_neighbours()  # before this process has a CUDA context of its own
        self.phase = "importing"
        backend = self.resolve_backend()
        from trainer.precision import check_fp8_support, resolve_precision

        self.precision = resolve_precision(
            self.spec, backend, distributed.world_size(), compiled=self.settings.fp8_compile
        )
        if self.spec.precision == "fp8":
            check_fp8_support()  # before the model takes a minute to load for nothing
        if distributed.is_main():
            with session_scope() as session:
                job = session.get(Job, job_id)
                assert job is not None
                job.backend, job.versions = backend, versions()
                session.add(job)
        tokenizer = self.load_tokenizer()
        dataset, eval_dataset = self.check_data(tokenizer)
        if self.stop.should_stop():
            return
        model, tokenizer = self.load_model(backend, tokenizer)
        if self.stop.should_stop():
            return

        self.phase = "preparing"
        self.configure_compile(backend, model)
        import torch

        if self.precision.precision == "fp8":
            from trainer.precision import convert_to_fp8

            self.fp8 = convert_to_fp8(
                model,
                self.precision.recipe,
                compile_layers=self.settings.fp8_compile,
                region=self.settings.fp8_compile_region,
            )
        if self.spec.hyperparameters.per_device_train_batch_size == "auto":
            self.choose_micro_batch(model)

        from trainer.callbacks import JobReporter, StopAtStep
        from trainer.gpu import MemoryProbe

        evaluate = eval_dataset is not None
        context = TrainerContext(
            spec=self.spec,
            backend=backend,
            on_gpu=torch.cuda.is_available(),
            job_kwargs={
                "max_shard_size": self.settings.max_shard_size,
                "on_phase": self.set_phase_from_trainer,
                "min_free_bytes": self.settings.min_free_disk_bytes,
                "store": get_store(),
            },
        )
        trainer = self.trainer = self.method.build(
            model=model,
            args=self.method.config(self.training_arguments(backend, evaluate=evaluate), context),
            train_dataset=dataset,
            eval_dataset=eval_dataset,
            tokenizer=tokenizer,
            context=context,
        )
        self.record_trainer(trainer)
        self.refine_report(trainer)
        memory: Any = MemoryProbe()
        tokens_trained = trainer.tokens_trained
        if distributed.world_size() > 1:  # first: the others then see the job's stop flag and tokens
            sync = distributed.RankSync(self.stop, trainer.tokens_trained, memory)
            trainer.add_callback(sync)
            memory, tokens_trained = distributed.GatheredMemory(sync, memory), lambda: sync.tokens_total
        self.stopper = StopAtStep(self.stop)
        trainer.add_callback(self.stopper)
        if distributed.is_main():
            self.reporter = JobReporter(
                job_id=job_id,
                memory=memory,
                checkpoints_dir=self.checkpoints_dir,
                tokens_trained=tokens_trained,
                paused_seconds=lambda: trainer.paused_seconds,
                publish_seconds=lambda: trainer.last_publish_seconds,
            )
            trainer.add_callback(self.reporter)
            self.add_trackers(trainer)
        resume_from = self.prepare_checkpoints()
        if resume_from is not None:
            event(job_id, EventKind.resumed, f"resuming from {resume_from.name}, the newest complete checkpoint")
        elif self.earlier_step > 0:
            # Its checkpoints were deleted, or none was saved before the earlier attempt stopped: say
            # so, rather than let a job that reached step 120 quietly start over. The callback drops
            # the earlier attempt's step logs, which this one writes again.
            event(
                job_id,
                EventKind.restarted,
                f"no complete checkpoint to resume from (an earlier attempt reached step {self.earlier_step}; its "
                "checkpoints were deleted or none had been saved): training starts again from step 0, and the "
                "earlier attempt's step logs are replaced",
            )
        self.phase = "training"
        self.report_startup()
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
        if self.stopped_early():
            return
        if evaluate and not evaluated_at(trainer.state):
            trainer.evaluate()  # the final model's eval loss, when the last step was not an eval step
        if self.reporter is not None:
            self.reporter.write_held_row()  # the last step's row, with that eval loss
        self.phase = "saving"
        final = self.checkpoints_dir / FINAL_NAME
        seconds = trainer.save_final(final)  # every rank: FSDP gathers the sharded weights
        if not distributed.is_main():
            return
        from core.checkpoint_store import record_checkpoint

        with session_scope() as session:
            record_checkpoint(
                session=session,
                job_id=job_id,
                folder=final,
                step=trainer.state.global_step,
                note=f"; fsync and rename took {seconds:.2f} s",
            )
            report = session.get(Job, job_id)
            details = {
                "data_report": (report.data_report if report is not None else None) or {},
                "final_model": str(final),
                "final_model_url": f"/jobs/{job_id}/checkpoints/{FINAL_NAME}",
            }
        for tracker in self.trackers:
            tracker.on_final(trainer.args, trainer.state, details)

    def add_trackers(self, trainer: Any) -> None:
        """The spec's experiment trackers, after the reporter: the figures it reads for a step log
        go with that step's log to them."""
        if not self.spec.integrations:
            return
        from trainer.trackers import ServiceFigures, tracker_places, trackers  # imports transformers

        self.trackers = trackers(
            self.spec.integrations,
            job_dir=self.job_dir,
            run_name=run_name(self.spec, self.job_id),
            report=lambda kind, message: event(self.job_id, EventKind(kind), message),
        )
        reporter = self.reporter
        trainer.add_callback(ServiceFigures(lambda: reporter.last_figures))
        for tracker in self.trackers:
            trainer.add_callback(tracker)
        names = ", ".join(t.name for t in self.trackers if not t.failed)
        if names:
            event(self.job_id, EventKind.tracker, f"reporting to {names} ({tracker_places(self.spec, self.job_dir)})")

    def configure_compile(self, backend: str, model: Any) -> None:
        """DDP_COMPILE for a DDP job on several GPUs (core/config.py)."""
        if distributed.world_size() == 1 or self.strategy != "ddp":
            return
        import torch._dynamo

        choice = self.settings.ddp_compile
        if choice == "whole":
            torch._dynamo.config.optimize_ddp = False
        elif choice == "off":
            torch._dynamo.config.disable = True
        if choice != "off" and backend == "unsloth":
            from trainer.unsloth_compat import warm_packed_attention_probe

            warm_packed_attention_probe(model)  # else compiled DDP deadlocks in its first step
        logger.info(
            "DDP with torch.compile %s", {"whole": "of whole graphs", "split": "split at buckets", "off": "off"}[choice]
        )

    def choose_micro_batch(self, model: Any) -> None:
        """per_device_train_batch_size "auto": time the planner's candidates (trainer/auto_batch.py),
        train with the fastest that fits, and store the sizes chosen in the job's spec, so that a
        resumed attempt trains with the same ones (as a halved micro-batch is stored)."""
        import torch

        from core.planner import (
            SAFETY_SHARE,
            PlanError,
            auto_micro_batches,
            plan_memory,
            read_config,
            shape_from_config,
            with_micro_batch,
        )
        from trainer.auto_batch import choose

        hp = self.spec.hyperparameters
        card = int(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else None
        try:
            shape = shape_from_config(read_config(self.spec.model, allow_network=False))
        except PlanError as exc:  # an architecture the planner cannot count: every size up to the limit
            logger.info("auto micro-batch without a plan: %s", exc)
            shape, card_for_plan = None, None
        else:
            card_for_plan = card
        candidates = auto_micro_batches(shape, hp, card_for_plan)
        budget: int | None = None
        if card is not None and shape is not None:
            # What the passes do not hold yet: the optimizer's states, the CUDA context, the overhead.
            plan = plan_memory(shape, with_micro_batch(hp, candidates[-1]), card)
            later = plan.parts["optimizer_states"] + plan.parts["cuda_context"] + plan.parts["allocator_overhead"]
            budget = int(card * (1 - SAFETY_SHARE)) - later
        chosen, trials = choose(model, candidates, hp.max_seq_length, budget)
        resolved = with_micro_batch(hp, chosen)
        self.spec.hyperparameters = resolved
        timed = "; ".join(trial.describe() for trial in trials)
        message = (
            f'per_device_train_batch_size "auto" chose {chosen} x {resolved.gradient_accumulation_steps} '
            f"(micro-batch x accumulation; {resolved.sequences_per_step} sequences per step, as given) of the "
            f"planner's candidates {', '.join(map(str, candidates))}, timed on full {hp.max_seq_length}-token "
            f"sequences: {timed}"
        )
        if not distributed.is_main():
            return
        with session_scope() as session:
            job = session.get(Job, self.job_id)
            assert job is not None
            stored = dict(job.spec.get("hyperparameters") or {})
            stored.update(
                per_device_train_batch_size=chosen, gradient_accumulation_steps=resolved.gradient_accumulation_steps
            )
            job.spec = {**job.spec, "hyperparameters": stored}
            session.add(job)
            add_event(session=session, job_id=self.job_id, kind=EventKind.micro_batch_chosen, message=message)

    def set_phase_from_trainer(self, name: str) -> None:
        self.phase = name

    def report_neighbours(self) -> None:
        """An event when other processes hold memory on the job's GPU, with the plan's verdict for
        the memory actually free (not the card's size)."""
        from trainer.neighbours import GIB, card_state

        state = card_state()
        if state is None or not state.neighbours:
            return
        verdict = ""
        try:
            from core.planner import plan_memory, read_config, shape_from_config

            shape = shape_from_config(read_config(self.spec.model, allow_network=False))
            plan = plan_memory(shape, self.spec.hyperparameters, state.free_bytes, method=self.spec.method)
            verdict = {
                "fits": "; the job's planned peak of {peak:.1f} GiB fits the free memory",
                "fits_with_paging": "; the job's planned peak of {peak:.1f} GiB fits the free memory only with its "
                "optimizer states paged to host memory: expect fewer tokens/s",
                "does_not_fit": "; the job's planned peak of {peak:.1f} GiB does not fit the free memory: expect "
                "an out-of-memory failure (the micro-batch is then halved and the job retried)",
            }[str(plan.verdict)].format(peak=plan.total_bytes / GIB)
        except Exception as exc:  # no config.json here: the figures alone
            logger.info("no plan for the free memory: %s", exc)
        event(
            self.job_id,
            EventKind.gpu_shared,
            f"other processes hold {state.held_by_others / GIB:.1f} GiB of this GPU ({state.name}, {state.uuid}): "
            f"{state.describe_neighbours()}; {state.free_bytes / GIB:.1f} of {state.total_bytes / GIB:.1f} GiB "
            f"free{verdict}",
        )

    def report_startup(self) -> None:
        """One event with the seconds from the process's start to training, phase by phase (the
        first step's own seconds, which include compilation, follow in the training record)."""
        parts = ", ".join(f"{name.replace('_', ' ')} {seconds:.1f} s" for name, seconds in self.phase_seconds.items())
        chosen = self.precision.describe() if self.precision is not None else ""
        precision = f"; {chosen}" if chosen else ""
        precision += f"; {self.fp8.describe()}" if self.fp8 is not None else ""
        precision += f"; {self.prefetch.summary()}" if self.prefetch is not None else ""
        precision += f"; {self.preloaded}" if self.preloaded is not None else ""
        event(
            self.job_id,
            EventKind.startup,
            f"ready to train {sum(self.phase_seconds.values()):.1f} s after the trainer process started: {parts}"
            f"{precision}",
        )

    def stopped_early(self) -> bool:
        """A stop came before the job was done. One that arrives after the last step is too late
        to pause or interrupt anything: the job saves `final` and succeeds (a cancel still wins)."""
        if not self.stop.should_stop():
            return False
        state = self.trainer.state if self.trainer is not None else None
        return self.stop.reason == "cancelled" or state is None or state.global_step < state.max_steps


def torch_on_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def evaluated_at(state: Any) -> bool:
    """Whether the Trainer evaluated at its last step (the same answer on every rank)."""
    return any("eval_loss" in entry and entry.get("step") == state.global_step for entry in state.log_history)


def prepared_loss_tokens(dataset: Any) -> int | None:
    """Tokens whose labels count in the loss, as the trainer prepared them (None when it keeps no
    labels column): the check that the report's loss_tokens_per_epoch is what trains."""
    if "labels" not in getattr(dataset, "column_names", ()):
        return None
    import pyarrow.compute as pc

    # Through the arrow format, which honours a selection (dataset.data would be the whole table).
    labels = pc.list_flatten(dataset.with_format("arrow")["labels"])
    return int(pc.sum(pc.not_equal(labels, -100)).as_py() or 0)


def start_startup_profile(job_dir: Path, current_run: Callable[[], Run | None]) -> StackSampler | None:
    """STARTUP_PROFILE: sample this process's main thread until the job's first step has ended."""
    if not get_settings().startup_profile or not distributed.is_main():
        return None

    def first_step_done() -> bool:
        run = current_run()
        return run is not None and run.reporter is not None and run.reporter.first_step_seconds is not None

    job_dir.mkdir(parents=True, exist_ok=True)
    sampler = StackSampler(threading.main_thread().ident or 0, folder=job_dir, until=first_step_done)
    sampler.start()
    return sampler


def main(argv: list[str], started: float | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    job_id = int(argv[1])
    settings = get_settings()
    job_dir = settings.job_dir(job_id)
    parent = os.environ.get(PARENT_PID_ENV)
    if os.environ.get(PARENT_WATCHED_ENV) == "1":  # a standby trainer: the horse is not our parent
        if parent and parent.isdigit():
            watch_parent(int(parent))
    else:
        die_with_parent(int(parent) if parent and parent.isdigit() else None)
    started = time.monotonic() if started is None else started
    run: Run | None = None
    sampler = start_startup_profile(job_dir, lambda: run)
    try:
        try:
            run = Run(job_id, started)
            # Before anything touches the job's folder: no earlier trainer of this job still runs. (Rank 0's
            # lock stands for its job; the other ranks die with the same work horse.)
            if distributed.is_main():
                take_job_lock(
                    job_dir,
                    job_id,
                    grace_s=settings.stop_grace_s,
                    on_wait=lambda pid: event(
                        job_id,
                        EventKind.waiting,
                        f"an earlier trainer of this job (pid {pid}) is still running; stopping it first",
                    ),
                )
            run.load_job()
            run.train()
        except Interrupted as exc:
            # What this process was asked (ranks agree on a reason only while they step).
            reason = run.stop.requested if run is not None else None
            if reason == "cancelled":
                write_result(
                    job_dir,
                    TrainerOutcome.cancelled,
                    ErrorCode.cancelled,
                    "cancelled by request before training started",
                    step=0,
                )
            elif reason == "paused":
                write_result(job_dir, TrainerOutcome.paused, None, f"paused before training ({exc})", step=0)
            else:  # the job is not done: it should run again
                write_result(
                    job_dir,
                    TrainerOutcome.interrupted,
                    None,
                    f"the trainer was stopped before training ({exc})",
                    step=0,
                )
            return 0
        except BaseException as exc:
            logger.error("job %s failed:\n%s", job_id, format_traceback(exc))
            step = run.trainer.state.global_step if run is not None and run.trainer is not None else None
            failure = classify(
                exc, phase=run.phase if run is not None else "starting", step=step, disk=disk_space(job_dir)
            )
            write_result(job_dir, TrainerOutcome.failed, failure.code, failure.message, **trained(run))
            return 1
        if run.stopped_early():
            step = run.trainer.state.global_step if run.trainer is not None else 0
            saved = run.stopper.stopped_with_checkpoint if run.stopper is not None else None
            if run.stop.reason == "cancelled":
                write_result(
                    job_dir,
                    TrainerOutcome.cancelled,
                    ErrorCode.cancelled,
                    f"cancelled by request at step {step}",
                    step=step,
                    **trained(run),
                )
            elif run.stop.reason == "paused":
                write_result(
                    job_dir,
                    TrainerOutcome.paused,
                    None,
                    f"paused at step {step}",
                    step=step,
                    checkpoint=saved,
                    **trained(run),
                )
            else:  # SIGTERM or the worker vanished: the job is not done, it should run again
                write_result(
                    job_dir,
                    TrainerOutcome.interrupted,
                    None,
                    f"the trainer was stopped at step {step} ({run.stop.reason})",
                    step=step,
                    checkpoint=saved,
                    **trained(run),
                )
            return 0
        if not distributed.is_main():
            return 0
        reporter, state = run.reporter, run.trainer.state
        train_seconds = float(state.log_history[-1].get("train_runtime", 0.0)) if state.log_history else 0.0
        share = (
            f" ({100 * reporter.overhead_s / train_seconds:.2f}% of {train_seconds:.1f} s of training)"
            if train_seconds
            else ""
        )
        event(
            job_id,
            EventKind.reporting_overhead,
            f"step logging, progress and checkpoint records took {reporter.overhead_s:.3f} s{share}",
        )
        first_step = reporter.first_step_seconds
        write_result(
            job_dir,
            TrainerOutcome.succeeded,
            step=state.global_step,
            seconds=round(time.monotonic() - started, 3),
            first_step_seconds=round(first_step, 3) if first_step is not None else None,
            train_seconds=train_seconds,
            callback_overhead_seconds=round(reporter.overhead_s, 4),
            **trained(run),
        )
        return 0
    finally:
        if sampler is not None:
            sampler.stop()  # a job that ended (or failed) before its first step: what was sampled
