"""Build the benchmark's model and dataset in a process of their own: a process that built an
8B model on the GPU keeps ~16 GB of it cached, and a benchmark sharing the card with it would
measure paging, not training (seen: 79 GiB used, 6,100 instead of 8,000 tokens/s)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_workload_args, dataset_rows, prepare

parser = argparse.ArgumentParser()
add_workload_args(parser)
args, _ = parser.parse_known_args()
prepare(Path(args.workdir), args.shape, args.seq_len, dataset_rows(args))
