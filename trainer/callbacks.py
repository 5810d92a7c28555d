"""The TrainerCallback that reports a running job: step logs, progress, ETA, VRAM, checkpoints,
and the flag that stops training when the job is cancelled. It observes and raises flags; it
never steers the loop itself."""

from __future__ import annotations

import functools
import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import delete
from sqlmodel import Session, col, select
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from core.checkpoint_store import mark_removed, record_checkpoint
from core.contract import PROGRESS_FILE, STEP_SECONDS_BUCKETS, EventKind
from core.db import session_scope
from core.events import add_event
from core.models import Job, StepLog
from core.webhooks import queue_progress
from trainer.compile_clock import CompileClock
from trainer.failpoints import out_of_memory_above
from trainer.gpu import MemoryProbe
from trainer.neighbours import SlowdownWatch
from trainer.stopflag import StopFlag

logger = logging.getLogger(__name__)

METRIC_KEYS = ("loss", "learning_rate", "grad_norm")
# What a method's step log keeps beyond METRIC_KEYS: every other figure TRL logs (rewards/margins,
# reward, kl, completions/mean_length, ...), under its TRL name, except these bookkeeping ones.
NOT_METHOD_METRICS = frozenset({"epoch", "num_tokens", "total_flos", "num_input_tokens_seen"})
EVAL_BOOKKEEPING = frozenset({"eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"})
MAX_METHOD_METRICS = 64  # a step log's figures are bounded, whatever a reward module logs
MAX_METRIC_NAME = 100


def method_metrics(logs: dict[str, Any], *, evaluation: bool = False) -> dict[str, float | None]:
    """The figures of a TRL log that are the method's own, under TRL's names (numbers only)."""
    found: dict[str, float | None] = {}
    for key, value in logs.items():
        if len(found) >= MAX_METHOD_METRICS or len(key) > MAX_METRIC_NAME:
            break
        if evaluation:
            if not key.startswith("eval_") or key in EVAL_BOOKKEEPING or key == "eval_num_tokens":
                continue
        elif key in METRIC_KEYS or key in NOT_METHOD_METRICS or key.startswith(("train_", "eval_")):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            found[key] = _finite(value)
    return found


# The ETA is the median of this many recent step durations times the steps left: a stall, an
# evaluation or a checkpoint save is one slow step among them, not a new average.
ETA_WINDOW_STEPS = 64


def _timed(method: Callable[..., None]) -> Callable[..., None]:
    """Adds the time spent in a callback method to `overhead_s`, so the cost of reporting is
    itself reported (it must stay a small fraction of step time)."""

    @functools.wraps(method)
    def wrapper(self: JobReporter, *args: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        try:
            method(self, *args, **kwargs)
        finally:
            self.overhead_s += time.perf_counter() - started

    return wrapper


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class StopAtStep(TrainerCallback):
    """Steers the loop at each step's end, on every rank alike: stops it when the stop flag is up
    (with a checkpoint of this step when the job is to go on from it), and skips the Trainer's
    checkpoint of the last step, which `final` makes redundant."""

    def __init__(self, stop: StopFlag) -> None:
        self.stop = stop
        self.stopped_with_checkpoint: str | None = None  # the checkpoint a pause or stop saved

    def on_substep_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # A cancel keeps nothing, so it need not wait for the optimizer step: with 64 micro-batches
        # of an 8B model that is a minute. Ranks of a job agree on stops only at steps' ends, so a
        # job of several ranks stops there (a lone rank leaving mid-step would hang the others).
        if not self.stop.synced and self.stop.should_stop() and self.stop.reason == "cancelled":
            control.should_training_stop = True

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.stop.should_stop():
            control.should_training_stop = True
            if self.stop.saves_checkpoint and state.global_step < state.max_steps:
                # Paused, or the worker is stopping: this step's checkpoint is where the job goes on.
                control.should_save = True
                self.stopped_with_checkpoint = f"checkpoint-{state.global_step}"
                return
        if state.global_step >= state.max_steps and args.save_steps and state.global_step % args.save_steps:
            # The Trainer saves a full checkpoint at the last step (with optimizer state: 32 GB
            # for an 8B model); the final model is saved right after as `final`, so skip it.
            control.should_save = False


class JobReporter(TrainerCallback):
    def __init__(
        self,
        *,
        job_id: int,
        memory: MemoryProbe,
        checkpoints_dir: Path,
        tokens_trained: Callable[[], float],
        paused_seconds: Callable[[], float],
        publish_seconds: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.job_id = job_id
        self.slowdowns = SlowdownWatch()
        self.memory = memory
        self.checkpoints_dir = checkpoints_dir
        self.tokens_trained = tokens_trained
        # Seconds spent evaluating and saving checkpoints so far, which tokens/s leaves out.
        self.paused_seconds = paused_seconds
        self.publish_seconds = publish_seconds
        self._first_step_end: tuple[int, float] | None = None
        self._step_ended_at: float | None = None
        self._step_seconds: deque[float] = deque(maxlen=ETA_WINDOW_STEPS)
        # Touched at every step and micro-batch: the worker's proof that training moves (worker/stalls.py);
        # it holds the last step that ended.
        self.progress_file = checkpoints_dir.parent / PROGRESS_FILE
        self._last_logged_step = 0
        self._held_row: StepLog | None = None  # a step's row waiting for the evaluation that follows it
        # (wall time, tokens seen, seconds paused) at the start of the tokens/s window:
        # it opens after the first step (which compiles) and leaves out evaluations and checkpoint saves.
        self._last_log: tuple[float, float, float] | None = None
        # The same at the end of this attempt's first step, for the whole job's mean tokens/s, and
        # (tokens, seconds) of training that earlier attempts of the job recorded.
        self._since_first_step: tuple[float, float, float] | None = None
        self._earlier_totals: tuple[float, float] | None = None
        self.first_step_seconds: float | None = None
        self.overhead_s = 0.0
        self.last_figures: dict[str, Any] = {}  # the latest step log's figures, for trackers
        self._train_start = 0.0
        self._eval_steps: set[int] = set()
        # torch.compile's seconds, to say how much of the first step was compiling.
        self.compile_clock = CompileClock().install()
        self._compiled_before_training = (0.0, 0)

    def evaluated_at(self, step: int) -> bool:
        return step in self._eval_steps

    # --- helpers ----------------------------------------------------------------------
    def _report_first_step(self, step: int, seconds: float) -> None:
        """The first step's seconds and how many of them torch.compile took: after the startup
        event, the rest of where a job's first minute goes."""
        compiling = self.compile_clock.describe_since(self._compiled_before_training)
        with session_scope() as session:
            add_event(
                session=session,
                job_id=self.job_id,
                kind=EventKind.first_step,
                message=f"step {step}, the first of this run, took {seconds:.1f} s, {compiling}",
            )

    def _eta_seconds(self, state: TrainerState) -> float | None:
        # The first step compiles (an 8B model on an H100: 24 s, 6x a later step, with cold
        # compile caches; 12 s with warm ones; the first_step event): extrapolating from it would be
        # wildly wrong, so the rate comes from the steps after it; and from their median, so a
        # frozen minute or a checkpoint save does not inflate it for the rest of the run.
        if not self._step_seconds or not state.max_steps:
            return None
        per_step = statistics.median(self._step_seconds)
        return round(per_step * max(state.max_steps - state.global_step, 0), 1)

    def _beat(self, step: int | None = None) -> None:
        """Touch the progress file; at a step's end, write the step into it (the worker starts the
        next standby trainer once a job's first step is done: worker/standby.NextStandby)."""
        try:
            if step is not None:
                self.progress_file.write_text(str(step))
            else:
                self.progress_file.touch()  # its mtime; created if it is not there
        except OSError as exc:  # a full or failing disk: the trainer's own checks say so
            logger.debug("could not touch %s: %s", self.progress_file, exc)

    # --- callback events --------------------------------------------------------------
    @_timed
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._train_start = time.monotonic()
        self._compiled_before_training = self.compile_clock.mark()
        self._last_log = None
        with session_scope() as session:
            job = session.get(Job, self.job_id)
            assert job is not None
            job.total_steps, job.step = state.max_steps, state.global_step
            session.add(job)
            # An earlier attempt's logs past where this one starts (its checkpoint, or step 0 when
            # none was left) are superseded: this attempt logs those steps again, and no step is
            # logged twice.
            session.execute(
                delete(StepLog).where(col(StepLog.job_id) == self.job_id, col(StepLog.step) > state.global_step)
            )
            resumed = f", resuming at step {state.global_step}" if state.global_step else ""
            add_event(
                session=session,
                job_id=self.job_id,
                kind=EventKind.training_started,
                message=f"training started: {state.max_steps} optimizer steps{resumed}",
            )

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.write_held_row()
        out_of_memory_above(args.per_device_train_batch_size)  # inert outside the fault tests

    @staticmethod
    def _evaluation_follows(args: TrainingArguments, state: TrainerState, control: TrainerControl) -> bool:
        """An evaluation of this step comes next: the Trainer's own, or the trainer process's
        evaluation of the final model (trainer/run.py) after the last step."""
        last = state.global_step >= state.max_steps and args.eval_strategy != "no"
        return bool(control.should_evaluate) or last

    def write_held_row(self) -> None:
        """A row held for an evaluation that never logged (it failed, or the run stopped)."""
        if self._held_row is not None:
            row, self._held_row = self._held_row, None
            with session_scope() as session:
                session.add(row)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.global_step < state.max_steps:  # stopped early: no final evaluation will come
            self.write_held_row()

    @_timed
    def on_substep_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._beat()

    @_timed
    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._beat(state.global_step)
        now = time.monotonic()
        if self._step_ended_at is not None:
            self._step_seconds.append(now - self._step_ended_at)
        self._step_ended_at = now
        if self._first_step_end is None:
            self._first_step_end = (state.global_step, now)
            self.first_step_seconds = now - self._train_start
            self._report_first_step(state.global_step, self.first_step_seconds)
            self._last_log = (now, self.tokens_trained(), self.paused_seconds())
            self._last_logged_step = state.global_step  # the step-duration windows start here too

    @_timed
    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        logs = logs or {}
        if "eval_loss" in logs:
            self._eval_steps.add(state.global_step)
            with session_scope() as session:
                self._write_eval(session, state, _finite(logs["eval_loss"]), method_metrics(logs, evaluation=True))
            return
        if "loss" not in logs:
            return  # the end-of-training summary (train_runtime, ...) is not a step log
        now = time.monotonic()
        tokens = self.tokens_trained()
        paused = self.paused_seconds()
        self._since_first_step = self._since_first_step or self._last_log
        tokens_per_second = None
        step_seconds: tuple[float, int] | None = None  # (seconds per step in this window, steps)
        if self._last_log is not None:
            started, tokens_then, paused_then = self._last_log
            training = (now - started) - (paused - paused_then)
            if training > 0 and tokens > tokens_then:
                tokens_per_second = round((tokens - tokens_then) / training, 1)
            steps = state.global_step - self._last_logged_step
            if training > 0 and steps > 0:
                step_seconds = (training / steps, steps)
        self._last_log = (now, tokens, paused)
        self._last_logged_step = state.global_step
        vram = self.memory.read()
        metrics = {key: _finite(logs.get(key)) for key in METRIC_KEYS}
        metrics["tokens_per_second"] = tokens_per_second
        # For the experiment trackers (trainer/trackers.py), which log after this callback.
        self.last_figures = {
            "tokens_per_second": tokens_per_second,
            "num_tokens": tokens,
            **{f"vram/{key}_gib": round(value / 2**30, 3) for key, value in vram.items() if value is not None},
        }
        own = method_metrics(logs)
        slowdown = self.slowdowns.observe(tokens_per_second) if self.memory.cuda else None
        with session_scope() as session:
            metrics.update(self._whole_job_throughput(session, now, tokens, paused))
            self._write_log(
                session,
                state,
                metrics,
                vram,
                tokens,
                step_seconds,
                hold=self._evaluation_follows(args, state, control),
                own=own,
            )
            if slowdown is not None:
                add_event(
                    session=session,
                    job_id=self.job_id,
                    kind=EventKind.slowdown,
                    message=f"{slowdown} (step {state.global_step})",
                )

    def _whole_job_throughput(self, session: Session, now: float, tokens: float, paused: float) -> dict[str, Any]:
        """tokens_per_second_mean: the whole job's tokens over its training time, each attempt's
        after its first step, evaluations and saves left out as for the window's figure; the
        totals it comes from are kept in the job's metrics for the attempts that follow."""
        if self._since_first_step is None:
            return {}
        if self._earlier_totals is None:
            job = session.get(Job, self.job_id)
            totals = ((job.metrics if job is not None else None) or {}).get("training_totals") or {}
            self._earlier_totals = (float(totals.get("tokens") or 0), float(totals.get("seconds") or 0))
        started, tokens_then, paused_then = self._since_first_step
        trained = self._earlier_totals[0] + tokens - tokens_then
        seconds = self._earlier_totals[1] + (now - started) - (paused - paused_then)
        mean = round(trained / seconds, 1) if seconds > 0 and trained > 0 else None
        return {"tokens_per_second_mean": mean, "training_totals": {"tokens": trained, "seconds": round(seconds, 3)}}

    def _write_eval(
        self, session: Session, state: TrainerState, eval_loss: float | None, own: dict[str, float | None]
    ) -> None:
        """The eval loss joins the step's log row (the Trainer logs training first, then evaluates),
        or gets a row of its own when eval_steps is not a multiple of logging_steps."""
        row = self._held_row if self._held_row is not None and self._held_row.step == state.global_step else None
        self._held_row = None
        row = (
            row
            or session.exec(
                select(StepLog)
                .where(StepLog.job_id == self.job_id, StepLog.step == state.global_step)
                .order_by(col(StepLog.id).desc())
            ).first()
        )
        if row is None:
            row = StepLog(job_id=self.job_id, step=state.global_step, epoch=_finite(state.epoch))
        row.eval_loss = eval_loss
        if own:
            row.method_metrics = {**(row.method_metrics or {}), **own}
        session.add(row)
        job = session.get(Job, self.job_id)
        assert job is not None
        job.metrics = {**(job.metrics or {}), "eval_loss": eval_loss, "eval_step": state.global_step}
        session.add(job)
        add_event(
            session=session,
            job_id=self.job_id,
            kind=EventKind.evaluated,
            message=f"validation loss {eval_loss if eval_loss is None else round(eval_loss, 4)} "
            f"at step {state.global_step}",
        )

    def _write_log(
        self,
        session: Session,
        state: TrainerState,
        metrics: dict[str, float | None],
        vram: dict[str, int | None],
        tokens: float,
        step_seconds: tuple[float, int] | None = None,
        *,
        hold: bool = False,
        own: dict[str, float | None] | None = None,
    ) -> None:
        """The step's row, and the job's progress and metrics. With `hold` (an evaluation of this
        step follows), the row waits for its eval_loss: a row is seen once, complete, by pollers of
        /logs?after_step= and by the watch page (which never read a row twice)."""
        row = StepLog(
            job_id=self.job_id,
            step=state.global_step,
            epoch=_finite(state.epoch),
            loss=metrics["loss"],
            learning_rate=metrics["learning_rate"],
            grad_norm=metrics["grad_norm"],
            tokens_per_second=metrics["tokens_per_second"],
            num_tokens=int(tokens),
            vram_allocated=vram.get("allocated"),
            vram_reserved=vram.get("reserved"),
            vram_peak_allocated=vram.get("peak_allocated"),
            device_used=vram.get("device_used"),
            device_total=vram.get("device_total"),
            method_metrics=own or None,
        )
        if hold:
            self._held_row = row
        else:
            session.add(row)
        job = session.get(Job, self.job_id)
        assert job is not None
        job.step, job.epoch = state.global_step, _finite(state.epoch)  # total_steps: on_train_begin
        job.eta_seconds = self._eta_seconds(state)
        earlier = job.metrics or {}
        kept: dict[str, Any] = {k: earlier[k] for k in ("eval_loss", "eval_step", "step_seconds") if k in earlier}
        job.metrics = {**metrics, **kept}
        if own:
            job.metrics["method_metrics"] = own
        if step_seconds is not None:
            job.metrics["step_seconds"] = observe_steps(kept.get("step_seconds"), *step_seconds)
        queue_progress(session=session, job=job, step=state.global_step, metrics=metrics)
        if vram:
            job.vram = vram
        session.add(job)

    @_timed
    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.write_held_row()
        folder = self.checkpoints_dir / f"checkpoint-{state.global_step}"
        with session_scope() as session:
            if folder.is_dir():
                record_checkpoint(
                    session=session,
                    job_id=self.job_id,
                    folder=folder,
                    step=state.global_step,
                    note=f"; fsync and rename took {self.publish_seconds():.2f} s",
                )
            # The trainer rotated old checkpoints (save_total_limit) before calling us.
            mark_removed(session=session, job_id=self.job_id, checkpoints_dir=self.checkpoints_dir)


def observe_steps(histogram: dict[str, Any] | None, seconds: float, steps: int) -> dict[str, Any]:
    """Add `steps` steps of `seconds` each (a logging window's mean) to the job's cumulative
    step-duration histogram: counts per STEP_SECONDS_BUCKETS bound (and +Inf), sum and count."""
    counts = list((histogram or {}).get("buckets") or [0] * (len(STEP_SECONDS_BUCKETS) + 1))
    index = next((i for i, bound in enumerate(STEP_SECONDS_BUCKETS) if seconds <= bound), len(STEP_SECONDS_BUCKETS))
    counts[index] += steps
    return {
        "buckets": counts,
        "sum": float((histogram or {}).get("sum", 0.0)) + seconds * steps,
        "count": int((histogram or {}).get("count", 0)) + steps,
    }
