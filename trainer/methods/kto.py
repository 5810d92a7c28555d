"""Kahneman-Tversky optimization: TRL's KTOTrainer (Unsloth's patched one on the unsloth backend)
on unpaired rows (a completion labelled desirable or not), or pairs, each two such rows. Its KL
term compares each completion with another of its micro-batch, so micro-batches hold two or more."""

from __future__ import annotations

from typing import Any

from trainer.methods.base import TrainerContext
from trainer.methods.dpo import reference_kwargs
from trainer.methods.preference import UnpairedMethod


class KTO(UnpairedMethod):
    name = "kto"

    def config(self, common: dict[str, Any], context: TrainerContext) -> Any:
        from trl import KTOConfig

        return KTOConfig(
            **common,
            **self.options(),
            max_length=self.hp.max_seq_length,
            **reference_kwargs(self.name, self.hp, context),
        )

    def trainer_base(self) -> type:
        from trl import KTOTrainer

        return KTOTrainer
