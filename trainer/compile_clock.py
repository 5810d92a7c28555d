"""How long torch.compile spends compiling in this trainer process.

A job's first step is its slowest: Dynamo traces the compiled regions (Unsloth's compiled blocks,
the fp8 layers), then Inductor compiles them or loads them from its caches under DATA_DIR/cache.
How much of that step is compiling tells which to attack: for an 8B model on an H100, 13.4 s of a
24.2 s first step with cold caches, 2.5 s of 11.6 s with warm ones, against 3.8 s for each step
after it (docs/benchmarks.md). Dynamo's
own compile callbacks bracket each compilation, the nested ones merged into the outermost
(torch._dynamo.callback), so the clock counts wall seconds once."""

from __future__ import annotations

import time
from typing import Any


class CompileClock:
    def __init__(self) -> None:
        self.seconds = 0.0
        self.compilations = 0
        self._since: float | None = None
        self.installed = False

    def install(self) -> CompileClock:
        """Register with Dynamo's callbacks; where this torch has none, the clock stays unset
        (`installed` False) and says so rather than reporting zero."""
        try:
            from torch._dynamo.callback import callback_handler
        except ImportError:
            return self
        callback_handler.register_start_callback(self._start)
        callback_handler.register_end_callback(self._end)
        self.installed = True
        return self

    def _start(self, *_args: Any) -> None:
        self._since = time.monotonic()

    def _end(self, *_args: Any) -> None:
        if self._since is not None:
            self.seconds += time.monotonic() - self._since
            self.compilations += 1
            self._since = None

    def mark(self) -> tuple[float, int]:
        return self.seconds, self.compilations

    def describe_since(self, mark: tuple[float, int] = (0.0, 0)) -> str:
        """The compiling done since `mark` (an earlier `mark()`), in words."""
        if not self.installed:
            return "compile time unknown (this torch has no compile callbacks)"
        seconds, compilations = self.seconds - mark[0], self.compilations - mark[1]
        if not compilations:
            return "nothing compiled (torch.compile)"
        plural = "" if compilations == 1 else "s"
        return f"{seconds:.1f} s of it compiling (torch.compile, {compilations} compilation{plural})"
