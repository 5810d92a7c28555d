"""The card's measured bf16 matrix rate, the ceiling MFU is taken against."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save

SIZE = 8192
REPEATS = 50


def main() -> None:
    a = torch.randn(SIZE, SIZE, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(SIZE, SIZE, device="cuda", dtype=torch.bfloat16)
    for _ in range(10):
        a @ b
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    median = sorted(times)[len(times) // 2]
    save(
        Path(sys.argv[1]),
        "matmul",
        {"card": torch.cuda.get_device_name(0), "size": SIZE, "bf16_tflops": round(2 * SIZE**3 / median / 1e12, 1)},
    )


main()
