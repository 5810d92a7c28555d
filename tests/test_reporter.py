"""JobReporter's arithmetic with a controlled clock: tokens/s leaves out the first step (it
compiles) and evaluations, and eval losses join the step rows. Real SQLite through the
migrations; the Trainer is replaced by the state and logs it would pass."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlmodel import col, select
from transformers import TrainerControl, TrainerState, TrainingArguments

from tests.conftest import Env


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class NoMemory:
    cuda = False

    def read(self) -> dict[str, int | None]:
        return {}


@pytest.fixture
def job_id(env: Env) -> int:
    from core.db import session_scope
    from core.models import Job

    with session_scope() as session:
        job = Job(spec={"model": "m", "dataset": {"source": "d"}})
        session.add(job)
        session.flush()
        assert job.id is not None
        return job.id


def test_tokens_per_second_leaves_out_the_first_step_and_evaluations(
    env: Env, job_id: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.db import session_scope
    from core.models import Job, StepLog
    from trainer import callbacks

    clock, tokens, evaluating = Clock(), [0.0], [0.0]
    monkeypatch.setattr(callbacks.time, "monotonic", clock)
    reporter = callbacks.JobReporter(
        job_id=job_id,
        memory=NoMemory(),  # type: ignore[arg-type]
        checkpoints_dir=tmp_path,
        tokens_trained=lambda: tokens[0],
        paused_seconds=lambda: evaluating[0],
    )
    args = TrainingArguments(output_dir=str(tmp_path), save_steps=1000, report_to="none", use_cpu=True)
    state, control = TrainerState(max_steps=10), TrainerControl()
    reporter.on_train_begin(args, state, control)

    def step(seconds: float, step_tokens: float) -> None:
        clock.now += seconds
        tokens[0] += step_tokens
        state.global_step += 1
        reporter.on_step_end(args, state, control)

    step(40.0, 1000)  # the first step compiles: 40 s
    step(1.0, 1000)
    control.should_evaluate = True  # as the Trainer's flow callback says at an eval step
    reporter.on_log(args, state, control, logs={"loss": 2.0})  # step 2: one 1 s step since the first
    with session_scope() as session:  # the row waits for its eval_loss: a poller never sees it half done
        assert session.exec(select(StepLog).where(StepLog.job_id == job_id)).all() == []
    clock.now += 9.0  # an evaluation of 9 s
    evaluating[0] += 9.0
    reporter.on_log(args, state, control, logs={"eval_loss": 1.5})
    control.should_evaluate = False
    step(1.0, 1000)
    step(1.0, 1000)
    reporter.on_log(args, state, control, logs={"loss": 1.8})  # step 4: 2 s of training, 11 s of wall time
    step(1.0, 1000)
    reporter.on_log(args, state, control, logs={"eval_loss": 1.4})  # an eval step without a training log

    with session_scope() as session:
        rows = session.exec(select(StepLog).where(StepLog.job_id == job_id).order_by(col(StepLog.step))).all()
        assert [(r.step, r.loss, r.eval_loss, r.tokens_per_second) for r in rows] == [
            (2, 2.0, 1.5, 1000.0),
            (4, 1.8, None, 1000.0),
            (5, None, 1.4, None),
        ]
        job = session.get(Job, job_id)
        assert job is not None and job.metrics is not None
        assert (job.metrics["loss"], job.metrics["eval_loss"], job.metrics["eval_step"]) == (1.8, 1.4, 5)
    assert reporter.first_step_seconds == 40.0
    assert reporter.evaluated_at(2) and reporter.evaluated_at(5) and not reporter.evaluated_at(4)


def test_tokens_per_second_is_the_last_windows_and_the_mean_the_whole_jobs_across_attempts(
    env: Env, job_id: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.db import session_scope
    from core.models import Job
    from trainer import callbacks

    clock = Clock()
    monkeypatch.setattr(callbacks.time, "monotonic", clock)
    args = TrainingArguments(output_dir=str(tmp_path), save_steps=1000, report_to="none", use_cpu=True)

    def attempt(windows: list[list[float]]) -> dict:
        """One trainer process: a first step of 40 s, then each window's steps (seconds, 1000
        tokens each), logged at the window's end. Its token count starts again at 0."""
        tokens = [0.0]
        reporter = callbacks.JobReporter(
            job_id=job_id,
            memory=NoMemory(),  # type: ignore[arg-type]
            checkpoints_dir=tmp_path,
            tokens_trained=lambda: tokens[0],
            paused_seconds=lambda: 0.0,
        )
        state, control = TrainerState(max_steps=10), TrainerControl()
        reporter.on_train_begin(args, state, control)
        for window in [[40.0], *windows]:
            for seconds in window:
                clock.now += seconds
                tokens[0] += 1000
                state.global_step += 1
                reporter.on_step_end(args, state, control)
            if window != [40.0]:
                reporter.on_log(args, state, control, logs={"loss": 2.0})
        with session_scope() as session:
            job = session.get(Job, job_id)
            assert job is not None and job.metrics is not None
            return dict(job.metrics)

    metrics = attempt([[1.0, 1.0], [4.0, 4.0]])  # 1000 tokens/s, then 250
    assert (metrics["tokens_per_second"], metrics["tokens_per_second_mean"]) == (250.0, 400.0)  # 4000 in 10 s
    metrics = attempt([[1.0, 1.0]])  # resumed: 2000 more tokens in 2 s, its first step left out too
    assert (metrics["tokens_per_second"], metrics["tokens_per_second_mean"]) == (1000.0, 500.0)  # 6000 in 12 s
