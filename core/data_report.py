"""The job's data report (`data_report` in its record): what the API's check before queuing
found in the rows, then what the trainer's first phase counted in tokens. Written by both,
stored as JSON in the job's row, and served as it is stored; a figure nobody has measured yet
is absent rather than null (docs/datasets.md)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer


class _Figures(BaseModel):
    # Records written by older versions may hold keys this one no longer writes: ignored.
    model_config = ConfigDict(extra="ignore")

    # No return annotation on purpose: with one, pydantic takes it as the serialized shape and the
    # OpenAPI document would lose every field of the report.
    @model_serializer(mode="wrap")
    def _measured_only(self, handler: SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]
        return {key: value for key, value in handler(self).items() if value is not None}


class TokensPerRow(_Figures):
    min: int
    median: int
    p95: int
    max: int


class ValidationReport(_Figures):
    fraction: float | None = Field(default=None, description="the held-out fraction of the dataset, when one is")
    checked_before_queuing: bool | None = None
    rows: int | None = Field(default=None, description="rows read (or held out, with a fraction)")
    row_format: str | None = None
    bad_rows: int | None = None
    bad_row_examples: list[str] | None = None
    rows_used: int | None = Field(default=None, description="rows the evaluation runs on")
    tokens: int | None = Field(default=None, description="tokens evaluated, after truncation")
    loss_tokens: int | None = Field(default=None, description="of those, tokens in the loss")


class DataReport(_Figures):
    checked_before_queuing: bool | None = Field(
        default=None, description="true when the API read every row of a local file before queuing the job"
    )
    rows: int = Field(description="rows read")
    row_format: str | None = Field(
        default=None,
        description="messages, prompt_completion or text (sft); preference, openai_preference or "
        "implicit_preference (dpo, orpo, kto); unpaired_preference (kto); prompt_only or prompt_messages (grpo)",
    )
    bad_rows: int = Field(description="malformed rows, skipped")
    bad_row_examples: list[str] = Field(description="the first few problems, with row numbers")
    pairs: int | None = Field(default=None, description="preference rows: the good pairs")
    identical_pairs: int | None = Field(
        default=None, description="preference rows: pairs whose two answers are the same (malformed, skipped)"
    )
    desirable_rows: int | None = Field(default=None, description="kto's unpaired rows labelled true")
    undesirable_rows: int | None = Field(default=None, description="kto's unpaired rows labelled false")
    rows_used: int | None = Field(default=None, description="rows that train (after bad rows and a held-out set)")
    tokens_per_row: TokensPerRow | None = None
    rows_truncated: int | None = Field(
        default=None,
        description="rows longer than max_seq_length (a pair: either answer with its prompt); grpo: prompts "
        "longer than max_seq_length - max_completion_length, which are left out",
    )
    tokens_cut_by_truncation: int | None = None
    tokens_per_epoch: int | None = Field(default=None, description="tokens trained per epoch, after truncation")
    loss_tokens_per_epoch: int | None = Field(default=None, description="of those, tokens in the loss")
    sequences_per_epoch: int | None = None
    sequences_estimated: bool | None = Field(
        default=None, description="true while packed sequences are estimated, before TRL has packed the rows"
    )
    optimizer_steps: int | None = None
    tokens_to_train: int | None = Field(default=None, description="tokens over the whole job (epochs or max_steps)")
    loss_tokens_prepared: int | None = Field(
        default=None, description="tokens in the loss as TRL prepared the labels: what actually trains"
    )
    validation: ValidationReport | None = None
