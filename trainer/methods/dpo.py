"""Direct preference optimization: TRL's DPOTrainer (Unsloth's patched one on the unsloth
backend) on preference pairs. The reference model is the model as loaded, held beside it in bf16
(TRL would load it in float32), or, with precompute_ref_log_probs, used once before training to
compute the reference log-probabilities of every pair and then not held at all."""

from __future__ import annotations

from typing import Any

from core.methods import uses_reference
from trainer.methods.base import TrainerContext, policy_dtype_name
from trainer.methods.preference import PreferenceMethod


class DPO(PreferenceMethod):
    name = "dpo"

    def config(self, common: dict[str, Any], context: TrainerContext) -> Any:
        from trl import DPOConfig

        return DPOConfig(
            **common,
            **{**self.options(), "loss_type": [self.hp.loss_type]},
            max_length=self.hp.max_seq_length,
            **reference_kwargs(self.name, self.hp, context),
        )

    def trainer_base(self) -> type:
        from trl import DPOTrainer

        return DPOTrainer


def reference_kwargs(method: str, hp: Any, context: TrainerContext) -> dict[str, Any]:
    """How TRL loads the reference model itself (from the model's own path): in the policy's
    dtype, not TRL's default float32."""
    return {"model_init_kwargs": {"dtype": policy_dtype_name(context.on_gpu)}} if uses_reference(method, hp) else {}
