"""bench/plot_losses.py: a gpu-speed results file's loss curves as an SVG (docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "plot_losses.py"


def plot_losses():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("plot_losses", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_part_with_losses_is_one_line_scaled_to_the_frame() -> None:
    results = {
        "card": "NVIDIA H100 80GB HBM3",
        "date": "2026-12-06",
        "settings": {"shape": "llama-3.1-8b", "seq_len": 2048, "micro_batch": 2, "grad_accum": 1},
        "parts": {
            "service_bf16": {"losses": [[1, 12.0], [2, 11.0], [3, 10.0]]},
            "service_fp8": {"losses": [[1, 12.0], [2, 11.5]]},
            "repeat_bf16": {"losses": [[1, 12.0]]},  # one point is no line
            "learned": {"estimate": {}},
        },
    }
    drawn = plot_losses().svg(results)
    lines = re.findall(r'<polyline points="([^"]+)"', drawn)
    assert [len(points.split()) for points in lines] == [3, 2]
    xs = [float(p.split(",")[0]) for p in lines[0].split()]
    ys = [float(p.split(",")[1]) for p in lines[0].split()]
    assert xs == sorted(xs) and ys == sorted(ys)  # later steps right, lower losses lower
    assert "service_bf16" in drawn and "service_fp8" in drawn and "repeat_bf16" not in drawn
    assert "llama-3.1-8b, seq 2048, 2 x 1, NVIDIA H100 80GB HBM3, 2026-12-06" in drawn


def test_results_without_a_curve_say_so() -> None:
    with pytest.raises(SystemExit, match="no part of these results logged more than one loss"):
        plot_losses().svg({"parts": {"bare": {"tokens_per_second": 1.0}}})
