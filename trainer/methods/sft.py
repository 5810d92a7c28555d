"""Supervised fine-tuning: TRL's SFTTrainer (Unsloth's patched one on the unsloth backend), on
chat `messages`, `prompt`/`completion` or plain `text` rows."""

from __future__ import annotations

import math
from typing import Any

from core.rows import RowCheck, loss_option_problem
from trainer.methods.base import Measured, TrainerContext, TrainingMethod, clipped


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
        )

    def trainer_base(self) -> type:
        from trl import SFTTrainer

        return SFTTrainer
