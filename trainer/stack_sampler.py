"""Where a job's start goes, function by function: a thread that samples the trainer's main
thread's Python stack every few milliseconds from the job's start to the end of its first step
(STARTUP_PROFILE on; off by default).

The startup event says how long each phase took (loading the model, the first step, the compile
inside it); this says what inside a phase held the time. A sampler rather than cProfile: cProfile
slows every Python call, and a job's start is mostly Python (Dynamo tracing, Inductor lowering,
Unsloth's patching), so it would inflate exactly what it measures; sampling costs one stack walk
per interval. Time spent in C (a CUDA synchronisation, a file read, waiting on the compile
workers) is counted to the Python frame that called it, which is what one can change.

Each sample is weighted by the time since the one before it, not counted once: the sampler needs
the GIL to read a stack, so while the main thread holds it in a long C call (copying weights, a
compile step) samples are missed, and counting samples would shrink exactly those calls (on an
H100 an 8B job's start had 31 s of samples in 42 s). The time goes to the stack seen when the
sampler gets the GIL back, which is the long call's Python caller or its next line.

It writes two files into the job's folder:
- `startup-stacks.folded`: one line per distinct stack, `outermost;...;innermost milliseconds`,
  the format flame graph tools read (flamegraph.pl, speedscope, inferno);
- `startup-profile.json`: the samples' interval and count, the wall time, the seconds each function
  was on the stack (inclusive) and at its top (own), the largest first."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import defaultdict
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
        self.samples = 0
        self.stacks: defaultdict[tuple[str, ...], float] = defaultdict(float)  # seconds each stack was seen for
        self.started_at = time.monotonic()
        self.ended_at: float | None = None
        self._stopping = threading.Event()

    def run(self) -> None:
        previous = self.started_at
        while not self._stopping.wait(self.interval_s):
            frame = sys._current_frames().get(self.target)
            now = time.monotonic()
            if frame is None:  # the thread ended
                break
            self.stacks[stack_of(frame)] += now - previous
            self.samples += 1
            previous = now
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
        inclusive: defaultdict[str, float] = defaultdict(float)
        own: defaultdict[str, float] = defaultdict(float)
        for stack, seconds in self.stacks.items():
            for name in set(stack):  # a recursive function counts once per sample
                inclusive[name] += seconds
            if stack:
                own[stack[-1]] += seconds
        ended = self.ended_at if self.ended_at is not None else time.monotonic()

        def rounded(seconds_of: dict[str, float]) -> list[tuple[str, float]]:
            largest = sorted(seconds_of.items(), key=lambda item: -item[1])[:TOP_FUNCTIONS]
            return [(name, round(seconds, 2)) for name, seconds in largest]

        return {
            "interval_s": self.interval_s,
            "samples": self.samples,
            "wall_s": round(ended - self.started_at, 2),
            # The samples' seconds (each weighted by the time since the one before): the wall time
            # up to the last sample.
            "sampled_s": round(sum(self.stacks.values()), 2),
            "inclusive_s": rounded(inclusive),
            "own_s": rounded(own),
        }

    def write(self, folder: Path) -> None:
        heaviest = sorted(self.stacks.items(), key=lambda item: -item[1])
        lines = [f"{';'.join(stack)} {round(seconds * 1000)}" for stack, seconds in heaviest]
        (folder / FOLDED_FILE).write_text("\n".join(lines) + ("\n" if lines else ""))
        (folder / SUMMARY_FILE).write_text(json.dumps(self.summary(), indent=1))
