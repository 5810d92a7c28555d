"""The model an idle standby trainer loads before its job comes (TRAINER_STANDBY_PRELOAD).

A repeat of an 8B job on an H100 spends about 6 s of its start loading the model it loaded the
time before (docs/benchmarks.md). When its worker is idle, the worker tells its standby which model
its last job loaded (a `{"preload": {...}}` line on the standby's stdin, the same pipe its job comes
on); the standby loads it exactly as the job would (`load_pretrained`) and keeps it. The job's
trainer takes it instead of loading (`take`) when it asks for the same model, backend and
max_seq_length and the model's files have not changed since; otherwise the preloaded model is freed
first, and the job loads its own.

Only the worker knows when its card is idle (a standby started while a job runs must not fill the
job's card), so the standby preloads only when told, and not when its job is already waiting."""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """What to load: a job's model as its trainer loads it."""

    model: str
    backend: str
    max_seq_length: int

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> Request:
        return cls(str(message["model"]), str(message["backend"]), int(message["max_seq_length"]))


def files_signature(model: str) -> tuple[tuple[str, int, int], ...]:
    """Name, size and modification time of a local model folder's files (its weights, its config):
    a folder rewritten since the preload is loaded again. A Hub id has none (its cached snapshot
    is immutable)."""
    folder = Path(model)
    if not folder.is_dir():
        return ()
    return tuple(
        (p.name, (stat := p.stat()).st_size, stat.st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()
    )


def load_pretrained(request: Request) -> tuple[Any, Any | None]:
    """The model (and Unsloth's patched tokenizer, for that backend) as a job's trainer loads it on
    one device: the one place both the job's load and the standby's preload go through."""
    import torch

    if request.backend == "unsloth":
        from unsloth import FastLanguageModel

        return FastLanguageModel.from_pretrained(  # type: ignore[no-any-return]
            model_name=request.model,
            max_seq_length=request.max_seq_length,
            dtype=torch.bfloat16,
            load_in_4bit=False,
            full_finetuning=True,  # gradient checkpointing "unsloth" is the default
        )
    from transformers import AutoModelForCausalLM

    from trainer import distributed

    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    # One GPU: the weights go from the safetensors files straight to the card, not through a copy
    # in host memory (several ranks: each rank's Trainer places its own copy, FSDP shards it).
    device_map = "cuda" if on_gpu and distributed.world_size() == 1 else None
    return AutoModelForCausalLM.from_pretrained(request.model, dtype=dtype, device_map=device_map), None


@dataclass
class Preloaded:
    request: Request
    signature: tuple[tuple[str, int, int], ...]
    model: Any
    tokenizer: Any | None
    seconds: float  # to load it
    at: float  # monotonic time it was ready

    def describe(self) -> str:
        return (
            f"model preloaded by the standby trainer ({self.seconds:.1f} s to load, "
            f"{time.monotonic() - self.at:.0f} s before the job took it)"
        )


# This process's preloaded model, if any (a standby's: one per process).
PRELOADED: Preloaded | None = None
# More than this still allocated on the card once the preloaded model is freed means something
# kept a reference to it: the job then starts in a clean process rather than beside the leftovers.
LEFT_ALLOCATED_MAX_BYTES = 1 << 30


def preload(request: Request) -> Preloaded:
    """Load `request`'s model and keep it for the job (freeing one preloaded before)."""
    global PRELOADED
    release()
    started = time.monotonic()
    signature = files_signature(request.model)
    model, tokenizer = load_pretrained(request)
    PRELOADED = Preloaded(request, signature, model, tokenizer, time.monotonic() - started, time.monotonic())
    return PRELOADED


def holds(model: str) -> bool:
    """Whether a model of that name is preloaded (the trainer then reads no weights ahead)."""
    return PRELOADED is not None and PRELOADED.request.model == model


def matches(request: Request) -> bool:
    """Whether the preloaded model is `request`'s, its files unchanged since."""
    found = PRELOADED
    return found is not None and found.request == request and found.signature == files_signature(request.model)


def take(request: Request) -> Preloaded | None:
    """The preloaded model, if it is `request`'s and its files are unchanged (handed over: this
    module keeps no reference); otherwise None, with whatever was preloaded freed."""
    global PRELOADED
    found = PRELOADED
    if found is not None and matches(request):
        PRELOADED = None
        return found
    if found is not None:
        logger.info("the preloaded model (%s) is not this job's: freeing it", found.request)
    release()
    return None


def release() -> int:
    """Free the preloaded model, its GPU memory given back to the driver; the bytes torch still has
    allocated on the card after (a standby allocates nothing else before its job)."""
    global PRELOADED
    if PRELOADED is None:
        return 0
    PRELOADED = None
    gc.collect()
    import torch

    # A process that never touched CUDA has nothing there (and must not make a context for this).
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        return 0
    torch.cuda.empty_cache()
    return int(torch.cuda.memory_allocated())
