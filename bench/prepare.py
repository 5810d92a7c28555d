"""Build the benchmark's model and dataset in a process of their own: a process that built an
8B model on the GPU keeps ~16 GB of it cached, and a benchmark sharing the card with it would
measure paging, not training (seen: 79 GiB used, 6,100 instead of 8,000 tokens/s)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import prepare

parser = argparse.ArgumentParser()
parser.add_argument("--workdir", default="/tmp/bench")
parser.add_argument("--shape", default="llama-3.1-8b")
parser.add_argument("--seq-len", type=int, default=4096)
parser.add_argument("--micro-batch", type=int, default=2)
parser.add_argument("--grad-accum", type=int, default=4)
parser.add_argument("--steps", type=int, default=10)
args, _ = parser.parse_known_args()
prepare(Path(args.workdir), args.shape, args.seq_len, args.steps * args.micro_batch * args.grad_accum + 16)
