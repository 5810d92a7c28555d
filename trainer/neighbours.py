"""Who else is on the job's GPU. A card shared with other processes (a notebook, an inference
server, another team's job) has less memory free than its size, and a job planned for the whole
card pages its optimizer states or runs out of memory. NVML lists the processes holding memory;
read before this process has a CUDA context, every process it lists is somebody else.

No torch here: the trainer calls this before importing it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)
GIB = 1024**3


@dataclass(frozen=True)
class Neighbour:
    pid: int
    name: str
    used_bytes: int | None  # None where the driver does not say (some MIG and container setups)

    def describe(self) -> str:
        used = f"{self.used_bytes / GIB:.1f} GiB" if self.used_bytes is not None else "memory not reported"
        return f"pid {self.pid} {self.name} ({used})"


@dataclass(frozen=True)
class CardState:
    name: str
    uuid: str
    total_bytes: int
    free_bytes: int
    neighbours: tuple[Neighbour, ...]

    @property
    def held_by_others(self) -> int:
        return sum(n.used_bytes or 0 for n in self.neighbours)

    def describe_neighbours(self) -> str:
        return "; ".join(n.describe() for n in self.neighbours)


def _handle(pynvml: Any) -> Any:
    """This rank's GPU: the LOCAL_RANK-th of CUDA_VISIBLE_DEVICES (an index or a UUID; the first for
    a single trainer), as CUDA will number it."""
    visible_list = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    visible = visible_list[min(local_rank, len(visible_list) - 1)].strip()
    if visible.startswith(("GPU-", "MIG-")):
        return pynvml.nvmlDeviceGetHandleByUUID(visible)
    return pynvml.nvmlDeviceGetHandleByIndex(int(visible) if visible.isdigit() else 0)


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as handle:
            return handle.read().strip()
    except OSError:  # another container's process, or gone
        return "(name unknown)"


def _job_processes() -> set[int]:
    """This trainer and its sibling ranks (one parent, the worker's work horse): the job's own."""
    own, parent = {os.getpid()}, os.getppid()
    if parent <= 1:
        return own
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                if int(handle.read().rsplit(")", 1)[1].split()[1]) == parent:
                    own.add(int(entry))
        except (OSError, IndexError, ValueError):  # gone, or not ours to read
            continue
    return own


def card_state() -> CardState | None:
    """The job's GPU and the other processes on it (not the job's own ranks); None without an
    NVIDIA driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = _handle(pynvml)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        processes: dict[int, int | None] = {}
        for listing in (pynvml.nvmlDeviceGetComputeRunningProcesses, pynvml.nvmlDeviceGetGraphicsRunningProcesses):
            for process in listing(handle):
                used = process.usedGpuMemory
                processes[int(process.pid)] = int(used) if isinstance(used, int) else None
        own = _job_processes()
        neighbours = tuple(
            Neighbour(pid, _process_name(pid), used) for pid, used in sorted(processes.items()) if pid not in own
        )
        name = pynvml.nvmlDeviceGetName(handle)
        return CardState(
            name=name.decode() if isinstance(name, bytes) else str(name),
            uuid=str(pynvml.nvmlDeviceGetUUID(handle)),
            total_bytes=int(memory.total),
            free_bytes=int(memory.free),
            neighbours=neighbours,
        )
    except Exception as exc:  # no driver, no NVML library, an index that is not there
        logger.info("NVML unavailable; other processes on the GPU cannot be listed: %s", exc)
        return None


class SlowdownWatch:
    """Tells when tokens/s falls well below the best this run has reached, once per fall, with
    the cause when one is known (other processes holding memory on the card)."""

    FALL = 0.7  # below 70% of the best: a slowdown
    RECOVERED = 0.9  # above 90% again: the next fall is told too
    WARMUP_WINDOWS = 2  # the first windows compile and fill caches

    def __init__(self, card: Any = card_state) -> None:
        self.card = card
        self.best = 0.0
        self.windows = 0
        self.falling = False

    def observe(self, tokens_per_second: float | None) -> str | None:
        """The event message for a new slowdown, or None."""
        if not tokens_per_second:
            return None
        self.windows += 1
        if self.windows <= self.WARMUP_WINDOWS:
            return None
        if tokens_per_second > self.best:
            self.best = tokens_per_second
        if self.falling:
            self.falling = tokens_per_second < self.best * self.RECOVERED
            return None
        if tokens_per_second >= self.best * self.FALL:
            return None
        self.falling = True
        drop = 100 * (1 - tokens_per_second / self.best)
        head = f"tokens/s fell from {self.best:,.0f} to {tokens_per_second:,.0f} (-{drop:.0f}%)"
        state = self.card()
        if state is not None and state.neighbours:
            return (
                f"{head} while other processes hold {state.held_by_others / GIB:.1f} GiB of this GPU "
                f"({state.describe_neighbours()}) and {state.free_bytes / GIB:.1f} GiB is free: with less memory "
                "the paged optimizer moves its states between host and GPU memory, and the card's compute is shared"
            )
        return f"{head}; no other process holds memory on this GPU (evaluation or longer sequences can slow steps)"
