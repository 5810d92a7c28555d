"""The parts of scripts/gpu_speed.py that run anywhere (the script runs on the GPU machine;
`--dry-run` runs its service parts on the CPU): its arguments, the steps it affords, the loss
comparison and the table printed from partial results."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from scripts.gpu_speed import LOSS_TOLERANCE, Speed, loss_comparison, main, print_table


def test_the_gpu_script_takes_its_arguments_and_refuses_unknown_parts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as help_:
        main(["--help"])
    assert help_.value.code == 0
    assert "--budget-s" in capsys.readouterr().out
    with pytest.raises(SystemExit) as wrong:
        main(["--parts", "bare,warp"])
    assert wrong.value.code == 2
    assert "unknown parts ['warp']" in capsys.readouterr().err


def speed(tmp_path: Path, **overrides: object) -> Speed:
    values: dict[str, object] = {
        "out": tmp_path,
        "results": None,
        "budget_s": 540.0,
        "steps": 0,
        "parts": "bare,service_bf16,repeat_bf16,service_fp8,auto,learned",
        "dry_run": False,
        "micro_batch": 2,
        "grad_accum": 4,
        "seq_len": 4096,
        **overrides,
    }
    return Speed(argparse.Namespace(**values))


def test_the_steps_fit_the_budget_and_never_exceed_200(tmp_path: Path) -> None:
    # 540 s less 450 s of overheads holds a few steps of 32,768 tokens each for three runs; 2,000 s more.
    few = speed(tmp_path).steps()
    assert 3 <= few < 10
    roomy = speed(tmp_path, budget_s=2000.0).steps()
    assert 3 < roomy < 200
    # Two parts with their overheads: 200 steps if the budget holds them, else fewer.
    two = "service_bf16,service_fp8"
    assert speed(tmp_path, parts=two, budget_s=100_000.0, steps=0).steps() == 200
    assert speed(tmp_path, parts=two, budget_s=100_000.0, steps=50).steps() == 50
    assert speed(tmp_path, parts=two, budget_s=560.0, steps=200).steps() < 200


def test_fp8_loss_is_compared_with_bf16_over_the_second_half() -> None:
    bf16 = [[step, 10.0 - step / 10] for step in range(1, 11)]
    close = [[step, loss * 1.01] for step, loss in bf16]
    far = [[step, loss * 1.10] for step, loss in bf16]
    assert loss_comparison(bf16, close)["within_tolerance"] is True
    assert loss_comparison(bf16, close)["second_half_mean_relative_difference"] == pytest.approx(0.01)
    assert loss_comparison(bf16, far)["within_tolerance"] is False
    assert loss_comparison(bf16, far)["tolerance"] == LOSS_TOLERANCE
    assert loss_comparison(bf16, [])["steps_compared"] == 0


def test_the_table_prints_from_whatever_parts_ran(capsys: pytest.CaptureFixture[str]) -> None:
    results = {
        "card": "NVIDIA H100 80GB HBM3",
        "date": "2026-12-06",
        "steps": 20,
        "settings": {"shape": "llama-3.1-8b", "seq_len": 4096, "micro_batch": 2, "grad_accum": 4, "optim": "x"},
        "parts": {
            "bare": {"tokens_per_second": 8000.0, "losses": [[1, 11.9], [20, 7.5]]},
            "service_bf16": {"status": "succeeded", "tokens_per_second": 8100.0, "post_to_first_step_seconds": 61.0},
            "service_fp8": {"error": "RuntimeError: no"},
            "auto": {"skipped": "10 s of the budget left, 110 s needed"},
        },
    }
    print_table(results)
    out = capsys.readouterr().out
    assert "NVIDIA H100 80GB HBM3 2026-12-06: llama-3.1-8b, seq 4096, micro-batch 2 x 4, 20 steps" in out
    assert "1.012" in out and "61.0" in out
    assert "service_fp8" in out and "error" in out and "skipped" in out
