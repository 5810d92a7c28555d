"""The attention shapes the trainer warms Unsloth's packed-attention probe with before a compiled
DDP job (trainer/unsloth_compat.py; the probe itself needs CUDA and was proven on 2 x H200:
docs/scheduling.md). A key that missed transformers' attention layers would warm nothing and
let the deadlock back in, so the keys are checked against a real Llama here."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from trainer.unsloth_compat import attention_shapes, warm_packed_attention_probe


def no_window(module: object, kwargs: dict[str, object]) -> object:
    return getattr(module, "sliding_window", None)


def test_every_attention_layer_gives_the_probe_its_shape(tiny_model: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    # The tiny Llama: 4 query heads of 16, 2 key/value heads, two layers of one shape; the key
    # may reach attention with its own 2 heads or repeated to 4.
    assert attention_shapes(model, no_window) == {
        (None, torch.bfloat16, 16, 4, 2, None),
        (None, torch.bfloat16, 16, 4, 4, None),
    }


def test_without_unsloth_nothing_is_warmed(tiny_model: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert warm_packed_attention_probe(model) == 0  # no Unsloth (no CUDA) here: a no-op, no error
