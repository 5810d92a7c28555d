"""The one interface every training method has behind it (trainer/run.py keeps only the phases):
the rows it trains on and how they are measured for the data report, its TRL config and trainer,
and what the job record says of the trainer that ran. core/methods.py holds the facts the API and
the planner share (formats, options and their defaults, planner terms)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from core.data_report import DataReport, TokensPerRow
from core.methods import MethodFacts, facts, training_sequences, uses_reference
from core.planner import optimizer_steps, steps_per_epoch
from core.rows import RowCheck
from core.spec import JobSpec


@dataclass
class Measured:
    """What the rows of a dataset come to in tokens, row by row (numpy arrays)."""

    lengths: Any  # tokens of each row as the method sees it (a pair: its prompt and longer answer)
    trained: Any | None  # tokens each row trains on after truncation (a pair: both sequences; None: unknown)
    loss_tokens: Any | None  # of those, tokens in the loss (None: not known before training, as for GRPO)
    truncated: Any  # rows cut (or, for GRPO, left out) by the length limit
    sequences: int  # sequences an epoch trains on


@dataclass
class TrainerContext:
    """What a method needs of the run to build its trainer."""

    spec: JobSpec
    backend: str
    on_gpu: bool
    job_kwargs: dict[str, Any]  # for JobTrainerMixin: max_shard_size, on_phase, min_free_bytes
    event: Callable[[str], None] = field(default=lambda message: None)  # an optimizer_replaced-like note


class TrainingMethod(ABC):
    """One method: subclasses in trainer/methods/<name>.py."""

    name: ClassVar[str]

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.hp = spec.hyperparameters
        self.facts: MethodFacts = facts(spec.method)

    # ---- rows -----------------------------------------------------------------------------------

    @property
    def formats(self) -> tuple[str, ...]:
        return self.facts.formats

    def required_columns(self) -> dict[str, str]:
        """Columns every row must have beyond its format's (GRPO: those its grader reads)."""
        return {}

    def option_problem(self, check: RowCheck) -> str | None:
        """Why the spec's options do not suit these rows (SFT's loss options), or None."""
        return None

    def prepare(self, dataset: Any, row_format: str) -> Any:
        """The checked rows in the columns TRL's trainer reads."""
        return dataset

    @abstractmethod
    def measure(
        self, dataset: Any, *, row_format: str, tokenizer: Any, template: str | None, what: str
    ) -> tuple[Any, Measured]:
        """(the rows that train, their token figures), before the model is loaded. `dataset` is
        as `prepare` left it; `row_format` the format the rows were read in."""

    def report(self, measured: Measured, check: RowCheck) -> DataReport:
        """The data report of the training rows: figures any method has, from `measure`."""
        import numpy as np

        hp = self.hp
        lengths, trained = measured.lengths, measured.trained
        steps = optimizer_steps(hp, measured.sequences)
        epochs_run = steps / steps_per_epoch(hp, measured.sequences)
        return DataReport(
            **check.summary(),
            rows_used=int(len(lengths)),
            tokens_per_row=TokensPerRow(
                min=int(lengths.min()),
                median=int(np.median(lengths)),
                p95=int(np.percentile(lengths, 95)),
                max=int(lengths.max()),
            ),
            rows_truncated=int(measured.truncated.sum()),
            tokens_cut_by_truncation=(
                int(np.maximum(lengths - trained, 0).sum()) if self.name == "sft" and trained is not None else None
            ),
            tokens_per_epoch=int(trained.sum()) if trained is not None else None,
            loss_tokens_per_epoch=int(measured.loss_tokens.sum()) if measured.loss_tokens is not None else None,
            sequences_per_epoch=int(measured.sequences),
            sequences_estimated=hp.packing if self.name == "sft" else None,
            optimizer_steps=int(steps),
            tokens_to_train=int(trained.sum() * epochs_run) if trained is not None else None,
        )

    def sequences_prepared(self, train_dataset: Any) -> int:
        """Sequences per epoch once TRL prepared the rows (packed, unpaired, dropped)."""
        return training_sequences(self.name, len(train_dataset), self.hp)

    # ---- the trainer ----------------------------------------------------------------------------

    def options(self) -> dict[str, Any]:
        """The method's own hyperparameters, as the spec holds them (TRL's names, defaults filled)."""
        return {name: getattr(self.hp, name) for name in self.facts.defaults}

    @abstractmethod
    def config(self, common: dict[str, Any], context: TrainerContext) -> Any:
        """TRL's config for this method: `common` (every method's TrainingArguments) and its own."""

    @abstractmethod
    def trainer_base(self) -> type:
        """TRL's trainer class, as imported now: Unsloth's patched class once Unsloth is imported."""

    def trainer_mixin(self) -> type | None:
        """The method's own additions to its trainer class (placed before JobTrainerMixin)."""
        return None

    def trainer_kwargs(self, context: TrainerContext) -> dict[str, Any]:
        """Arguments of the trainer's constructor beyond model, args, datasets and tokenizer."""
        return {}

    def build(
        self, *, model: Any, args: Any, train_dataset: Any, eval_dataset: Any, tokenizer: Any, context: TrainerContext
    ) -> Any:
        from trainer.job_trainer import job_trainer_class

        cls = job_trainer_class(self.trainer_base(), self.trainer_mixin())
        return cls(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            **self.trainer_kwargs(context),
            **context.job_kwargs,
        )

    def reference(self) -> str | None:
        """How the reference log-probabilities are had: 'model', 'precomputed', or None."""
        if not self.facts.reference_model and self.name != "grpo":
            return None
        if uses_reference(self.name, self.hp):
            return "model"
        return "precomputed" if self.facts.reference_model else None

    def trainer_path(self, trainer: Any) -> dict[str, Any]:
        """What the job record says of the trainer that ran (`trainer`)."""
        base: type = getattr(type(trainer), "trl_base", type(trainer))
        unsloth = any(c.__name__.startswith("Unsloth") for c in base.__mro__)
        return {
            "method": self.name,
            "trainer_class": base.__name__,
            "path": "unsloth" if unsloth else "trl",
            "reference": self.reference(),
        }


def policy_dtype_name(on_gpu: bool) -> str:
    """The dtype a reference model TRL loads itself gets: the policy's (TRL's default is float32,
    twice the memory of a bf16 reference)."""
    return "bfloat16" if on_gpu else "float32"


def clipped(values: Any, limit: int) -> Any:
    import numpy as np

    return np.minimum(values, limit)


def ceil_div(a: int, b: int) -> int:
    return math.ceil(a / b)
