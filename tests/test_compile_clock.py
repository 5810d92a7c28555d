"""trainer/compile_clock.py: torch.compile's seconds in a trainer process, from Dynamo's own
compile callbacks (the first_step event says how much of a job's first step was compiling)."""

from __future__ import annotations

import torch

from trainer.compile_clock import CompileClock


def test_the_clock_counts_each_compilation_once_and_only_after_its_mark() -> None:
    clock = CompileClock().install()
    assert clock.installed
    assert clock.describe_since() == "nothing compiled (torch.compile)"

    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1

    compiled = torch.compile(double, backend="eager")  # Dynamo traces it; no C++ compiler needed
    compiled(torch.ones(3))
    assert clock.compilations == 1 and clock.seconds > 0
    mark = clock.mark()
    compiled(torch.ones(3))  # the same shapes: no new compilation
    assert clock.describe_since(mark) == "nothing compiled (torch.compile)"
    compiled(torch.ones(2, 2))  # a new rank: Dynamo compiles again
    assert clock.describe_since(mark).endswith("of it compiling (torch.compile, 1 compilation)")
    assert clock.describe_since().endswith("(torch.compile, 2 compilations)")


def test_a_clock_that_could_not_install_says_so_rather_than_zero() -> None:
    assert CompileClock().describe_since() == "compile time unknown (this torch has no compile callbacks)"
