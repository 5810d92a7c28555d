"""per_device_train_batch_size "auto": the planner proposes the micro-batches that fit
(core/planner.auto_micro_batches), then a few timed forward and backward passes of each, on
full-length sequences of random tokens, pick the fastest that fits. The effective batch stays the
same (micro-batch x accumulation), and the passes change no weight (no optimizer step; gradients
and random state are put back), so the loss curve is the one the chosen sizes give."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

# Passes per candidate: the first compiles (its time is left out), the others are timed.
TRIAL_PASSES = 2


@dataclass(frozen=True)
class Trial:
    micro_batch: int
    tokens_per_second: float | None  # None: it did not fit
    peak_bytes: int | None  # torch's reserved peak during its passes (GPU only)
    fits: bool
    note: str = ""

    def describe(self) -> str:
        if not self.fits:
            return f"{self.micro_batch}: {self.note}"
        peak = f", peak {self.peak_bytes / 2**30:.1f} GiB" if self.peak_bytes is not None else ""
        return f"{self.micro_batch}: {self.tokens_per_second:,.0f} tokens/s{peak}"


def time_micro_batch(model: Any, micro_batch: int, seq_len: int, budget_bytes: int | None) -> Trial:
    """TRIAL_PASSES forward and backward passes of one micro-batch of full-length sequences."""
    import torch

    on_gpu = torch.cuda.is_available()
    device = next(model.parameters()).device
    vocab = int(model.config.vocab_size)
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    seconds: list[float] = []
    try:
        ids = torch.randint(0, vocab, (micro_batch, seq_len), device=device)
        for _ in range(TRIAL_PASSES):
            started = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if on_gpu:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - started)
            del loss
    except torch.OutOfMemoryError:
        return Trial(micro_batch, None, None, False, "out of GPU memory")
    finally:
        model.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.empty_cache()
    peak = int(torch.cuda.max_memory_reserved()) if on_gpu else None
    timed = seconds[1:] or seconds
    rate = micro_batch * seq_len / (sum(timed) / len(timed))
    if budget_bytes is not None and peak is not None and peak > budget_bytes:
        return Trial(micro_batch, rate, peak, False, f"peak {peak / 2**30:.1f} GiB leaves too little for the rest")
    return Trial(micro_batch, rate, peak, True)


def choose(model: Any, candidates: list[int], seq_len: int, budget_bytes: int | None) -> tuple[int, list[Trial]]:
    """The fastest candidate that fits (the smallest candidate when none does: training then
    fails or halves as any job out of memory does), with every trial."""
    import torch

    was_training = model.training
    model.train()
    trials: list[Trial] = []
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        for micro_batch in candidates:
            trial = time_micro_batch(model, micro_batch, seq_len, budget_bytes)
            logger.info("auto micro-batch: %s", trial.describe())
            trials.append(trial)
    model.train(was_training)
    if devices:  # the job's own peak (its record's peak_allocated) starts after the trials
        torch.cuda.reset_peak_memory_stats()
    fitting = [t for t in trials if t.fits]
    if not fitting:
        return min(candidates), trials
    best = max(fitting, key=lambda t: t.tokens_per_second or 0.0)
    return best.micro_batch, trials
