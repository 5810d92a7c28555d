"""`packing: true` and `padding_free: true` put several sequences in one row, position ids restarting
at each (TRL's padding-free collator). That is only correct if the model then attends within each
sequence: transformers finds the boundaries from the position ids, but only when the forward pass
keeps no cache (with one, it attends across the whole row), and TRL's SFTTrainer calls the model
with use_cache=False. This holds that contract on the transformers backend (the CPU's), so that an
upgrade that breaks it fails here rather than silently training on other sequences' tokens.
Unsloth's own attention (the GPU's) is checked by scripts/gpu_standby_probe.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SEQUENCE_LENGTHS = (30, 50, 20)


def logits_of_each_sequence(model: Any, batch: dict[str, torch.Tensor], *, use_cache: bool) -> list[torch.Tensor]:
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=use_cache).logits[0]
    return list(torch.split(logits, list(SEQUENCE_LENGTHS)))


def test_a_padding_free_row_attends_within_each_of_its_sequences(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(3, 400, (n,), generator=generator) for n in SEQUENCE_LENGTHS]
    # The row as TRL's padding-free collator builds it (DataCollatorForLanguageModeling with
    # padding_free=True; not imported here: it brings all of TRL's SFT trainer and wandb, seconds).
    batch = {
        "input_ids": torch.cat(sequences).unsqueeze(0),
        "position_ids": torch.cat([torch.arange(n) for n in SEQUENCE_LENGTHS]).unsqueeze(0),
    }

    with torch.no_grad():
        alone = [model(input_ids=seq.unsqueeze(0), use_cache=False).logits[0] for seq in sequences]
    # As SFTTrainer.compute_loss calls the model: each sequence as if it were alone.
    for packed, own in zip(logits_of_each_sequence(model, batch, use_cache=False), alone, strict=True):
        torch.testing.assert_close(packed, own, rtol=1e-4, atol=1e-4)
    # With a cache the row is one long sequence: the second and third see the tokens before them.
    # (What this test would see if the contract broke.)
    crossed = logits_of_each_sequence(model, batch, use_cache=True)
    assert all((crossed[i] - alone[i]).abs().max() > 1e-2 for i in (1, 2))
