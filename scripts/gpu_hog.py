"""Another tenant of the GPU, for scripts/gpu_lifecycle.py: holds `--gib` of device memory and,
with --compute, keeps the card's compute busy with matmuls. Writes --ready once it holds the
memory; runs until killed."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, required=True)
    parser.add_argument("--compute", action="store_true")
    parser.add_argument("--ready", type=Path, required=True)
    args = parser.parse_args()
    held = torch.empty(int(args.gib * 1024**3), dtype=torch.uint8, device="cuda")
    held.fill_(1)  # touched, so the driver really backs it
    torch.cuda.synchronize()
    args.ready.write_text(str(held.numel()))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    while True:
        if args.compute:
            for _ in range(50):
                a = (a @ a).clamp_(-1, 1)
            torch.cuda.synchronize()
        else:
            torch.cuda._sleep(10**9)  # no compute, memory held
            torch.cuda.synchronize()


if __name__ == "__main__":
    main()
