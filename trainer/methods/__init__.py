"""Each training method behind one interface (trainer/methods/base.py): `for_spec` gives the
job's. Modules are imported on demand: each imports its TRL trainer only when it builds it."""

from __future__ import annotations

import importlib

from core.spec import JobSpec
from trainer.methods.base import TrainingMethod

MODULES = {
    "sft": ("trainer.methods.sft", "SFT"),
    "dpo": ("trainer.methods.dpo", "DPO"),
    "orpo": ("trainer.methods.orpo", "ORPO"),
    "kto": ("trainer.methods.kto", "KTO"),
    "grpo": ("trainer.methods.grpo", "GRPO"),
}


def for_spec(spec: JobSpec) -> TrainingMethod:
    module, name = MODULES[spec.method]
    method: type[TrainingMethod] = getattr(importlib.import_module(module), name)
    return method(spec)
