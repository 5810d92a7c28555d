"""The memory planner's estimate beside each NVML peak bench/planner_points measured.

python3 bench/planner_check.py OUT [OUT...]   (prints a Markdown table for docs/planner.md)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES

from core.planner import GIB, plan_memory, shape_from_config
from core.spec import Hyperparameters


def rows(folders: list[Path]) -> list[str]:
    lines = [
        "| card | shape | micro-batch | sequence | estimate GiB | measured NVML peak GiB | error | tokens/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(p for folder in folders for p in folder.glob("bare_unsloth-*.json")):
        result = json.loads(path.read_text())
        s = result["settings"]
        hp = Hyperparameters(
            per_device_train_batch_size=s["micro_batch"],
            gradient_accumulation_steps=s["grad_accum"],
            max_seq_length=s["seq_len"],
        )
        plan = plan_memory(shape_from_config(dict(SHAPES[s["shape"]])), hp, gpu_memory_bytes=None)
        peak = result["nvml_device_used_peak_bytes"]
        error = 100 * (plan.total_bytes - peak) / peak
        lines.append(
            f"| {result['card']} | {s['shape']} | {s['micro_batch']} | {s['seq_len']} | "
            f"{plan.total_bytes / GIB:.1f} | {peak / GIB:.1f} | {error:+.1f}% | "
            f"{result.get('tokens_per_second')} |"
        )
    return lines


if __name__ == "__main__":
    print("\n".join(rows([Path(a) for a in sys.argv[1:]])))
