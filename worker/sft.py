"""SFTTrainer with sharded saves.

transformers 5 writes a model as one safetensors file of up to 50 GB unless told otherwise;
a few GB per shard keeps downloads, hashes and Range requests file-sized."""

from __future__ import annotations

import os
from typing import Any

from trl import SFTTrainer


class ShardedSFTTrainer(SFTTrainer):
    def __init__(self, *args: Any, max_shard_size: str = "4GB", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_shard_size = max_shard_size

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        model.save_pretrained(output_dir, state_dict=state_dict, max_shard_size=self.max_shard_size)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
