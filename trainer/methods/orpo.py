"""Odds ratio preference optimization: TRL's ORPOTrainer (trl.experimental; Unsloth has no patch
of it, so TRL's runs on either backend) on preference pairs, with no reference model: the
supervised loss on the chosen answers plus beta times the odds-ratio loss."""

from __future__ import annotations

import os
from typing import Any

from trainer.methods.base import TrainerContext
from trainer.methods.preference import PreferenceMethod


class PairMasksMixin:
    """ORPO's batches hold the chosen and rejected sequences apart: both are trained on."""

    def batch_tokens(self, inputs: Any) -> Any:
        return inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum()


class ORPO(PreferenceMethod):
    name = "orpo"

    def config(self, common: dict[str, Any], context: TrainerContext) -> Any:
        config_class, _trainer = _experimental()
        return config_class(**common, **self.options(), max_length=self.hp.max_seq_length)

    def trainer_base(self) -> type:
        return _experimental()[1]

    def trainer_mixin(self) -> type | None:
        return PairMasksMixin


def _experimental() -> tuple[type, type]:
    # trl.experimental warns on import; the job record already says which trainer ran.
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return ORPOConfig, ORPOTrainer
