"""The dataset check POST /jobs makes before a job is queued: every row of an uploaded or local
file is read, and a job whose data cannot train is refused with row numbers, in seconds rather
than after its wait in the queue. Hub datasets and `datasets` folders are checked by the
trainer as its first phase, with the same rules (core.rows)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sqlmodel import Session

from app.errors import InvalidDataset
from core.config import get_settings
from core.data_report import DataReport, ValidationReport
from core.graders import item_fields
from core.methods import facts
from core.models import UploadedFile
from core.rows import PAIRED_FORMATS, SFT_FORMATS, DataError, RowCheck, check_file, loss_option_problem
from core.spec import JobSpec


@dataclass
class DataCheck:
    report: DataReport | None  # the job's first data_report; the trainer adds token figures
    note: str  # for the "queued" event

    @property
    def training_rows(self) -> int | None:
        """Good rows left for training (after a held-out fraction), when the file was read."""
        if self.report is None:
            return None
        validation = self.report.validation
        held_out = validation.rows or 0 if validation is not None and validation.fraction is not None else 0
        return self.report.rows - self.report.bad_rows - held_out


@dataclass(frozen=True)
class RowRules:
    """What the job's rows must be: the method's formats, and the columns its grader reads."""

    formats: tuple[str, ...] = SFT_FORMATS
    required: Mapping[str, str] | None = None

    @classmethod
    def of(cls, job_in: JobSpec) -> RowRules:
        required = (
            {name: f"the grader reads as {{{{item.{name}}}}}" for name in sorted(item_fields(job_in.grader))}
            if job_in.grader is not None
            else None
        )
        return cls(facts(job_in.method).formats, required)


def _stored_check(
    session: Session, file_id: int | None, mapping: Mapping[str, str], rules: RowRules
) -> RowCheck | None:
    """The check made when the file was uploaded, when it still answers: no column mapping, SFT's
    rows (uploads are checked for no method), and the row format alone says whether the rows are
    chat (prompt/completion rows may or may not be lists of messages). Uploads made before 0004
    recorded no columns."""
    uploaded = session.get(UploadedFile, file_id) if file_id is not None and not mapping else None
    if uploaded is None or not uploaded.columns or uploaded.row_format == "prompt_completion":
        return None
    if rules.formats != SFT_FORMATS or uploaded.row_format not in SFT_FORMATS:
        return None
    return RowCheck(
        row_format=uploaded.row_format,
        columns=uploaded.columns,
        rows=uploaded.rows,
        conversational=uploaded.row_format == "messages",
        bad_rows=uploaded.bad_rows,
        problems=list(uploaded.bad_row_examples or []),
    )


def _check_source(
    session: Session, source: str, file_id: int | None, mapping: Mapping[str, str], what: str, rules: RowRules
) -> RowCheck | None:
    """Every row of a local file, checked; None for sources the API does not read (Hub
    datasets, `datasets` folders)."""
    path = Path(source)
    if not path.is_absolute() or not path.is_file():
        return None
    stored = _stored_check(session, file_id, mapping, rules)
    if stored is not None:
        return stored
    try:
        return check_file(
            path,
            mapping,
            max_row_bytes=get_settings().max_row_bytes,
            formats=rules.formats,
            required=rules.required,
        )
    except DataError as exc:
        raise InvalidDataset(f"{what}: {exc}") from None


def _refuse_unusable(check: RowCheck, what: str) -> None:
    reason = check.unusable(get_settings().max_bad_row_fraction, what)
    if reason:
        raise InvalidDataset(reason)


def check_before_queuing(*, session: Session, job_in: JobSpec) -> DataCheck:
    """Raises InvalidDataset (422) for data that cannot train; else the report to start from."""
    dataset, validation, hp = job_in.dataset, job_in.validation, job_in.hyperparameters
    rules = RowRules.of(job_in)
    train = _check_source(session, dataset.source, dataset.file_id, dataset.columns, "the dataset", rules)
    if train is None:
        if validation is not None and validation.source:
            check = _check_source(
                session, validation.source, validation.file_id, dataset.columns, "the validation set", rules
            )
            if check is not None:
                _refuse_unusable(check, "the validation set")
        return DataCheck(None, "the dataset is read and checked when the job starts")
    _refuse_unusable(train, "the dataset")
    assert train.row_format is not None
    problem = loss_option_problem(
        train.row_format,
        bool(train.conversational),
        assistant_only_loss=hp.assistant_only_loss,
        completion_only_loss=hp.completion_only_loss,
    )
    if problem:
        raise InvalidDataset(problem)
    report = DataReport(checked_before_queuing=True, **train.summary())
    good = train.rows - train.bad_rows
    if validation is not None:
        report.validation = _check_validation(session, job_in, train, good, rules)
    skipped = f", {train.bad_rows} malformed row(s) will be skipped" if train.bad_rows else ""
    identical = f" ({train.identical_pairs} of them with two identical answers)" if train.identical_pairs else ""
    counted = f"{good} pairs of {train.rows} rows" if train.row_format in PAIRED_FORMATS else f"{train.rows} rows"
    return DataCheck(report, f"dataset checked: {counted} in {train.row_format!r} format{skipped}{identical}")


def _check_validation(
    session: Session, job_in: JobSpec, train: RowCheck, good: int, rules: RowRules
) -> ValidationReport:
    validation = job_in.validation
    assert validation is not None
    if validation.fraction is not None:
        held_out = math.ceil(validation.fraction * good)  # as datasets' train_test_split rounds
        if held_out < 1 or good - held_out < 1:
            raise InvalidDataset(
                f"validation.fraction {validation.fraction} of {good} good rows leaves "
                f"{held_out} for validation and {good - held_out} for training; each needs one"
            )
        return ValidationReport(fraction=validation.fraction, rows=held_out)
    if not validation.source:
        raise InvalidDataset(
            f"validation.split {validation.split!r} names a split of dataset.source, but a file "
            "has no splits; use validation.fraction, or a file of its own (validation.file_id)"
        )
    check = _check_source(
        session, validation.source, validation.file_id, job_in.dataset.columns, "the validation set", rules
    )
    if check is None:
        return ValidationReport(checked_before_queuing=False)
    _refuse_unusable(check, "the validation set")
    if check.row_format != train.row_format and job_in.method == "sft":
        raise InvalidDataset(
            f"the validation set's rows are {check.row_format!r} but the dataset's are "
            f"{train.row_format!r}; both need the same format"
        )
    return ValidationReport(checked_before_queuing=True, **check.summary())
