"""Supervised fine-tuning: TRL's SFTTrainer (Unsloth's patched one on the unsloth backend), on
chat `messages`, `prompt`/`completion` or plain `text` rows."""

from __future__ import annotations

import math
from typing import Any

from core.rows import RowCheck, loss_option_problem
from trainer.methods.base import Measured, TrainerContext, TrainingMethod, clipped


def padding_free(asked: bool | None, *, packing: bool) -> dict[str, Any]:
    """SFTConfig's padding_free: the spec's, or padded rows when it is null and packing is off.
    Unsloth turns padding-free on by itself when it is unset, and on an H100 (8B shape, full
    4096-token rows, docs/benchmarks.md) its padding-free steps were the slower: 8,120 tokens/s for
    the bare recipe against 8,718 padded through the service at micro-batch 2, and at micro-batch 8
    one row of 32,768 tokens trained at a third of the padded speed. With packing, TRL's packed
    rows need padding-free (their position ids keep the rows apart), so it is left to TRL."""
    if asked is not None:
        return {"padding_free": asked}
    return {} if packing else {"padding_free": False}


class SFT(TrainingMethod):
    name = "sft"

    def option_problem(self, check: RowCheck) -> str | None:
        assert check.row_format is not None
        return loss_option_problem(
            check.row_format,
            bool(check.conversational),
            assistant_only_loss=self.hp.assistant_only_loss,
            completion_only_loss=self.hp.completion_only_loss,
        )

    def measure(
        self, dataset: Any, *, row_format: str, tokenizer: Any, template: str | None, what: str
    ) -> tuple[Any, Measured]:
        from trainer.data import token_counts

        hp = self.hp
        lengths, loss_tokens = token_counts(
            dataset,
            row_format=row_format,
            tokenizer=tokenizer,
            max_length=hp.max_seq_length,
            assistant_only=hp.assistant_only_loss,
            completion_only=hp.completion_only_loss is not False and row_format == "prompt_completion",
            template=template,
            what=what,
        )
        trained = clipped(lengths, hp.max_seq_length)
        # Packed: estimated as the trained tokens over max_seq_length; the trainer corrects it once
        # TRL has packed the rows.
        sequences = math.ceil(int(trained.sum()) / hp.max_seq_length) if hp.packing else len(lengths)
        return dataset, Measured(lengths, trained, loss_tokens, lengths > hp.max_seq_length, sequences)

    def config(self, common: dict[str, Any], context: TrainerContext) -> Any:
        from trl import SFTConfig

        hp = self.hp
        return SFTConfig(
            **common,
            max_length=hp.max_seq_length,
            dataset_text_field="text",
            completion_only_loss=hp.completion_only_loss,
            assistant_only_loss=hp.assistant_only_loss,
            packing=hp.packing,
            **padding_free(hp.padding_free, packing=hp.packing),
        )

    def trainer_path(self, trainer: Any) -> dict[str, Any]:
        """Also whether the batches were padding-free (`padding_free`): TRL's trainer decides it from its
        config (packing's best-fit decreasing turns it on)."""
        decided = getattr(trainer, "padding_free", getattr(trainer.args, "padding_free", False))
        return {**super().trainer_path(trainer), "padding_free": bool(decided)}

    def trainer_base(self) -> type:
        from trl import SFTTrainer

        return SFTTrainer
