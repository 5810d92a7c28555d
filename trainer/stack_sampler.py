"""Where a job's start goes, function by function: a thread that samples the trainer's main
thread's Python stack every few milliseconds from the job's start to the end of its first step
(STARTUP_PROFILE on; off by default).

The startup event says how long each phase took (loading the model, the first step, the compile
inside it); this says what inside a phase held the time. A sampler rather than cProfile: cProfile
slows every Python call, and a job's start is mostly Python (Dynamo tracing, Inductor lowering,
Unsloth's patching), so it would inflate exactly what it measures; sampling costs one stack walk
per interval. Time spent in C (a CUDA synchronisation, a file read, waiting on the compile
workers) is counted to the Python frame that called it, which is what one can change.

It writes two files into the job's folder:
- `startup-stacks.folded`: one line per distinct stack, `outermost;...;innermost count`, the
  format flame graph tools read (flamegraph.pl, speedscope, inferno);
- `startup-profile.json`: the samples' interval and count, the seconds each function was on the
  stack (inclusive) and at its top (own), the largest first."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import FrameType

FOLDED_FILE = "startup-stacks.folded"
SUMMARY_FILE = "startup-profile.json"
INTERVAL_S = 0.01
# The deepest stack kept (Dynamo's recursion goes deep; the outermost frames say where we were).
MAX_DEPTH = 400
TOP_FUNCTIONS = 60


def frame_name(frame: FrameType) -> str:
    code = frame.f_code
    where = code.co_filename
    for marker in ("site-packages/", "dist-packages/", "gpu-bundle/site/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    else:
        where = Path(where).name if where.startswith("/usr/lib") else where
    return f"{code.co_qualname}({where}:{code.co_firstlineno})"


def stack_of(frame: FrameType | None) -> tuple[str, ...]:
    names: list[str] = []
    while frame is not None and len(names) < MAX_DEPTH:
        names.append(frame_name(frame))
        frame = frame.f_back
    return tuple(reversed(names))


class StackSampler(threading.Thread):
    """Samples the stack of the thread `target` (an ident) until `stop()` or `until()` says so, then
    writes the files into `folder` (when given)."""

    def __init__(
        self,
        target: int,
        *,
        folder: Path | None = None,
        interval_s: float = INTERVAL_S,
        until: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__(name="stack-sampler", daemon=True)
        self.target = target
        self.folder = folder
        self.interval_s = interval_s
        self.until = until
        self.stacks: Counter[tuple[str, ...]] = Counter()
        self.started_at = time.monotonic()
        self.ended_at: float | None = None
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            frame = sys._current_frames().get(self.target)
            if frame is None:  # the thread ended
                break
            self.stacks[stack_of(frame)] += 1
            del frame
            if self.until is not None and self.until():
                break
        self.ended_at = time.monotonic()
        if self.folder is not None:
            self.write(self.folder)

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5)

    def summary(self) -> dict[str, object]:
        inclusive: Counter[str] = Counter()
        own: Counter[str] = Counter()
        for stack, count in self.stacks.items():
            for name in set(stack):  # a recursive function counts once per sample
                inclusive[name] += count
            if stack:
                own[stack[-1]] += count
        samples = sum(self.stacks.values())
        ended = self.ended_at if self.ended_at is not None else time.monotonic()

        def seconds(counter: Counter[str]) -> list[tuple[str, float]]:
            return [(name, round(count * self.interval_s, 2)) for name, count in counter.most_common(TOP_FUNCTIONS)]

        return {
            "interval_s": self.interval_s,
            "samples": samples,
            "wall_s": round(ended - self.started_at, 2),
            # Fewer samples than wall/interval: the sampler waited for the GIL (a long C call).
            "sampled_s": round(samples * self.interval_s, 2),
            "inclusive_s": seconds(inclusive),
            "own_s": seconds(own),
        }

    def write(self, folder: Path) -> None:
        lines = [f"{';'.join(stack)} {count}" for stack, count in self.stacks.most_common()]
        (folder / FOLDED_FILE).write_text("\n".join(lines) + ("\n" if lines else ""))
        (folder / SUMMARY_FILE).write_text(json.dumps(self.summary(), indent=1))
