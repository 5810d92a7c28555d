"""A job on several GPUs, seen from one of its ranks (worker/ranks.py starts them with torchrun's
environment; the Trainer, through accelerate, runs DDP or FSDP over them).

Rank 0 speaks for the job: it alone writes the database, the job's events and result.json, and
publishes checkpoints. Every rank trains, saves its part of a checkpoint, and stops at the same
step: a cancel, pause or stop reaches each rank as a signal, but not always before the same step,
and a rank that leaves the loop alone would hang the others in their next collective. So at the
end of every step the ranks agree, in one all-reduce, on whether to stop and why (and sum their
token counts for the job's tokens/s)."""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from core.stop_requests import STOP_REASONS
from trainer.stopflag import StopFlag


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a job of one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _device() -> Any:
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class RankSync(TrainerCallback):
    """Added before every other callback on every rank of a job with more than one. It makes the
    stop flag and the token count the job's, not the rank's."""

    def __init__(self, stop: StopFlag, tokens_trained: Any, memory: Any) -> None:
        self.stop = stop
        stop.synced = True  # a rank stops where all agree, never alone (a lone rank would hang the rest)
        self.local_tokens = tokens_trained
        self.local_memory = memory
        self.tokens_total = 0.0
        self.memory_figures: dict[str, Any] = {}

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        import torch
        import torch.distributed as dist

        local = [0.0] * len(STOP_REASONS) + [self.local_tokens()]
        self.stop.sample()
        if self.stop.requested in STOP_REASONS:
            local[STOP_REASONS.index(self.stop.requested)] = 1.0
        # float64: a count of tokens exceeds float32's exact integers within a day of training.
        tensor = torch.tensor(local, dtype=torch.float64, device=_device())
        dist.all_reduce(tensor)
        summed = tensor.tolist()
        self.tokens_total = summed[-1]
        seen = [reason for reason, count in zip(STOP_REASONS, summed, strict=False) if count > 0]
        if seen:
            self.stop.agree(seen[-1])  # the strongest any rank saw: every rank stops at this step

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        import torch.distributed as dist

        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self.local_memory.read())
        self.memory_figures = combine_memory(gathered)


def combine_memory(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Each rank's figures as `per_gpu`, and the largest of each at the top (the job's peak)."""
    if not any(per_rank):
        return {}
    combined: dict[str, Any] = {}
    for key in ("allocated", "reserved", "peak_allocated", "device_used", "device_total", "device_used_peak"):
        values = [int(figures[key]) for figures in per_rank if figures.get(key) is not None]
        combined[key] = max(values) if values else None
    combined["per_gpu"] = per_rank
    return combined


class GatheredMemory:
    """What JobReporter reads for VRAM on rank 0 of a job of several: every rank's figures."""

    def __init__(self, sync: RankSync, local: Any) -> None:
        self.sync = sync
        self.cuda = local.cuda

    def read(self) -> dict[str, Any]:
        return self.sync.memory_figures
