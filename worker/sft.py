"""TRL's SFTTrainer with the two things a job needs beyond the recipe.

- Sharded saves: transformers 5 writes a model as one safetensors file of up to 50 GB unless
  told otherwise; a few GB per shard keeps downloads, hashes and Range requests file-sized.
- A token count that costs no GPU sync: the Trainer's own count (include_num_input_tokens_seen)
  calls .item() on every micro-batch, which stalls the CPU until the GPU catches up and cost
  a fifth of the throughput of a small model on an H100. Here the count stays a device
  tensor (or a shape-derived int) and is read once per logging step."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from trl import SFTTrainer


class JobSFTTrainer(SFTTrainer):
    def __init__(self, *args: Any, max_shard_size: str = "4GB", on_phase: Callable[[str], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_shard_size = max_shard_size
        self.on_phase = on_phase
        self._tokens: Any = 0
        self.eval_seconds = 0.0  # time spent evaluating, which tokens/s must leave out

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        # The job record shows "evaluating" while the validation set runs (minutes on a big one).
        if self.on_phase:
            self.on_phase("evaluating")
        started = time.monotonic()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.eval_seconds += time.monotonic() - started
            if self.on_phase:
                self.on_phase("training")

    def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        mask = inputs.get("attention_mask")
        # Padding-free batches (Unsloth's default) carry no mask and no padding: numel is exact.
        self._tokens = self._tokens + (mask.sum() if mask is not None else inputs["input_ids"].numel())
        return super().training_step(model, inputs, *args, **kwargs)

    def tokens_trained(self) -> float:
        return float(self._tokens)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = str(output_dir or self.args.output_dir)
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        model.save_pretrained(output_dir, state_dict=state_dict, max_shard_size=self.max_shard_size)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
