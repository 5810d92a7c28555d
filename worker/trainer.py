"""The trainer child process: `python -m worker.trainer JOB_ID`, started by the worker per job.

It loads the model and data, runs TRL's SFTTrainer (through Unsloth on a GPU), reports through
JobReporter, and writes its outcome to `result.json` in the job folder for the worker to read.
Importing this module imports nothing heavy: the backend decides what is imported, and
`import unsloth` must come before transformers and trl."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from app.config import get_settings
from app.crud import add_event
from app.db import session_scope
from app.models import Job
from app.schemas import GPU_ONLY_OPTIMIZERS, JobSpec
from worker.failures import JobFailure, classify, format_traceback
from worker.stopflag import StopFlag

logger = logging.getLogger("worker.trainer")

RESULT_FILE = "result.json"
VERSION_PACKAGES = ("torch", "transformers", "trl", "datasets", "accelerate", "unsloth", "unsloth_zoo",
                    "bitsandbytes")


def write_result(job_dir: Path, status: str, code: str | None = None, message: str | None = None,
                 **extra: Any) -> None:
    tmp = job_dir / f"{RESULT_FILE}.tmp"
    tmp.write_text(json.dumps({"status": status, "error_code": code, "error_message": message, **extra}))
    tmp.replace(job_dir / RESULT_FILE)


def versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    for name in VERSION_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def event(job_id: int, kind: str, message: str) -> None:
    with session_scope() as session:
        add_event(session=session, job_id=job_id, kind=kind, message=message)


class Run:
    """One training run of one job, phase by phase, so a failure knows what it interrupted."""

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        self.settings = get_settings()
        self.job_dir = self.settings.job_dir(job_id)
        self.checkpoints_dir = self.settings.checkpoints_dir(job_id)
        self.phase = "starting"
        self.stop = StopFlag()
        self.reporter: Any = None
        self.trainer: Any = None
        with session_scope() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise JobFailure("job_missing", f"job {job_id} is not in the database")
            self.spec = JobSpec.model_validate(job.spec)
            self.attempt = job.attempts

    def install_signal_handlers(self) -> None:
        # The worker sends SIGUSR1 to cancel; SIGTERM (docker stop, a shutdown) also stops at
        # the next step instead of killing mid-write.
        signal.signal(signal.SIGUSR1, lambda *_: self.stop.set("cancelled"))
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set("terminated"))

    def resolve_backend(self) -> str:
        import torch

        has_cuda = torch.cuda.is_available()
        backend = self.spec.backend
        if backend == "auto":
            backend = "unsloth" if has_cuda else "transformers"
        if backend == "unsloth" and not has_cuda:
            raise JobFailure(
                "gpu_unavailable",
                "backend 'unsloth' needs a CUDA GPU and this worker sees none; check the worker's "
                "CUDA_VISIBLE_DEVICES and driver, or submit with backend 'transformers'",
            )
        if backend == "unsloth":
            try:
                import unsloth  # noqa: F401  (patches transformers and trl: must come first)
            except Exception as exc:  # never train silently on another backend
                raise JobFailure(
                    "backend_unavailable",
                    f"backend 'unsloth' was chosen but Unsloth failed to import: {type(exc).__name__}: {exc}. "
                    "Install the gpu extra (pip install '.[gpu]') on this worker.",
                ) from exc
        return backend

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
            raise JobFailure("chat_template_missing",
                             f"chat_template_from {self.spec.chat_template_from!r} has no chat template")
        return str(donor.chat_template)

    def apply_chat_template(self, tokenizer: Any) -> Any:
        if self.borrowed_chat_template is not None:
            tokenizer.chat_template = self.borrowed_chat_template
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def check_data(self, tokenizer: Any) -> Any:
        """Open, check and measure the dataset before the model takes the GPU."""
        from worker.data import data_report, load_rows, prepare_dataset

        self.phase = "loading_dataset"
        hp = self.spec.hyperparameters
        dataset, row_format = prepare_dataset(
            load_rows(self.spec.dataset.source, self.spec.dataset.split),
            has_chat_template=bool(tokenizer.chat_template),
        )
        report = data_report(dataset, row_format=row_format, tokenizer=tokenizer,
                             max_seq_length=hp.max_seq_length, micro_batch=hp.per_device_train_batch_size,
                             grad_accum=hp.gradient_accumulation_steps, epochs=hp.num_train_epochs,
                             max_steps=hp.max_steps)
        with session_scope() as session:
            job = session.get(Job, self.job_id)
            assert job is not None
            job.data_report = report
            session.add(job)
        lengths = report["tokens_per_row"]
        event(self.job_id, "dataset_loaded",
              f"{report['rows']} rows in {row_format!r} format; tokens per row median {lengths['median']}, "
              f"max {lengths['max']}; {report['rows_truncated']} row(s) longer than max_seq_length "
              f"{hp.max_seq_length}; {report['optimizer_steps']} optimizer steps, "
              f"{report['tokens_to_train']} tokens to train")
        return dataset

    def load_model(self, backend: str, tokenizer: Any) -> tuple[Any, Any]:
        """The model, and the tokenizer to train with (Unsloth brings its own, patched)."""
        import torch

        hp = self.spec.hyperparameters
        self.phase = "loading_model"
        if backend == "unsloth":
            from unsloth import FastLanguageModel

            model, unsloth_tokenizer = FastLanguageModel.from_pretrained(
                model_name=self.spec.model, max_seq_length=hp.max_seq_length, dtype=torch.bfloat16,
                load_in_4bit=False, full_finetuning=True,  # gradient checkpointing "unsloth" is the default
            )
            return model, self.apply_chat_template(unsloth_tokenizer)
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return AutoModelForCausalLM.from_pretrained(self.spec.model, dtype=dtype), tokenizer

    def sft_config(self, backend: str) -> Any:
        import torch
        from trl import SFTConfig

        hp = self.spec.hyperparameters
        on_gpu = torch.cuda.is_available()
        optim = hp.optim
        if not on_gpu and optim in GPU_ONLY_OPTIMIZERS:
            optim = "adamw_torch"
            event(self.job_id, "optimizer_replaced",
                  f"optimizer {hp.optim!r} needs a CUDA GPU; this worker has none, so adamw_torch is used")
        return SFTConfig(
            output_dir=str(self.checkpoints_dir),
            per_device_train_batch_size=hp.per_device_train_batch_size,
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
            max_length=hp.max_seq_length,
            dataset_text_field="text",
            bf16=on_gpu,
            use_cpu=not on_gpu,
            # Unsloth brings its own (offloading) gradient checkpointing; the plain backend uses HF's.
            gradient_checkpointing=backend == "transformers",
            report_to="none",
            disable_tqdm=False,
        )

    def train(self) -> None:
        job_id = self.job_id
        self.install_signal_handlers()
        self.phase = "importing"
        backend = self.resolve_backend()
        with session_scope() as session:
            job = session.get(Job, job_id)
            assert job is not None
            job.backend, job.versions = backend, versions()
            session.add(job)
        tokenizer = self.load_tokenizer()
        dataset = self.check_data(tokenizer)
        if self.stop.should_stop():
            return
        model, tokenizer = self.load_model(backend, tokenizer)
        if self.stop.should_stop():
            return

        self.phase = "preparing"
        from worker.callbacks import JobReporter
        from worker.gpu import MemoryProbe
        from worker.sft import JobSFTTrainer

        trainer = self.trainer = JobSFTTrainer(
            model=model, args=self.sft_config(backend), train_dataset=dataset, processing_class=tokenizer,
            max_shard_size=self.settings.max_shard_size,
        )
        self.reporter = JobReporter(job_id=job_id, stop=self.stop, memory=MemoryProbe(),
                                    checkpoints_dir=self.checkpoints_dir, tokens_trained=trainer.tokens_trained)
        trainer.add_callback(self.reporter)
        resume = self.attempt > 1 and any(self.checkpoints_dir.glob("checkpoint-*"))
        if resume:
            event(job_id, "resumed", "resuming from the newest intermediate checkpoint")
        self.phase = "training"
        trainer.train(resume_from_checkpoint=True if resume else None)
        if self.stop.should_stop():
            return
        self.phase = "saving"
        final = self.checkpoints_dir / "final"
        trainer.save_model(str(final))
        from worker.checkpoints import record_checkpoint

        with session_scope() as session:
            record_checkpoint(session=session, job_id=job_id, folder=final, step=trainer.state.global_step)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    job_id = int(argv[1])
    job_dir = get_settings().job_dir(job_id)
    job_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    run: Run | None = None
    try:
        run = Run(job_id)
        run.train()
    except BaseException as exc:
        logger.error("job %s failed:\n%s", job_id, format_traceback(exc))
        step = run.trainer.state.global_step if run is not None and run.trainer is not None else None
        failure = classify(exc, phase=run.phase if run is not None else "starting", step=step)
        write_result(job_dir, "failed", failure.code, failure.message)
        return 1
    if run.stop.should_stop():
        step = run.trainer.state.global_step if run.trainer is not None else 0
        if run.stop.reason == "cancelled":
            write_result(job_dir, "cancelled", "cancelled", f"cancelled by request at step {step}", step=step)
        else:  # SIGTERM or the worker vanished: the job is not done, it should run again
            write_result(job_dir, "interrupted", None, f"the trainer was stopped at step {step} ({run.stop.reason})",
                         step=step)
        return 0
    reporter, state = run.reporter, run.trainer.state
    train_seconds = float(state.log_history[-1].get("train_runtime", 0.0)) if state.log_history else 0.0
    share = f" ({100 * reporter.overhead_s / train_seconds:.2f}% of {train_seconds:.1f} s of training)" \
        if train_seconds else ""
    event(job_id, "reporting_overhead",
          f"step logging, progress and checkpoint records took {reporter.overhead_s:.3f} s{share}")
    first_step = reporter.first_step_seconds
    write_result(job_dir, "succeeded", step=state.global_step, seconds=round(time.monotonic() - started, 3),
                 first_step_seconds=round(first_step, 3) if first_step is not None else None,
                 train_seconds=train_seconds, callback_overhead_seconds=round(reporter.overhead_s, 4))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(sys.argv))
