"""The card's measured bf16 matrix rate, the ceiling MFU is taken against."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save

SIZE = 8192
REPEATS = 50


def tflops(run: Callable[[], object], size: int = SIZE, warmup: int = 10, repeats: int = REPEATS) -> float:
    """TFLOP/s of `run`, one size^3 matrix product, by the median of `repeats` timed calls."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    median = sorted(times)[len(times) // 2]
    return round(2 * size**3 / median / 1e12, 1)


def main() -> None:
    a = torch.randn(SIZE, SIZE, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(SIZE, SIZE, device="cuda", dtype=torch.bfloat16)
    save(
        Path(sys.argv[1]),
        "matmul",
        {"card": torch.cuda.get_device_name(0), "size": SIZE, "bf16_tflops": tflops(lambda: a @ b)},
    )


if __name__ == "__main__":
    main()
