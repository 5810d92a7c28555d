"""The parts of scripts/gpu_speed.py that run anywhere (the script runs on the GPU machine;
`--dry-run` runs its service parts on the CPU): its arguments, the steps it affords, the loss
comparison and the table printed from partial results."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.gpu_speed import LOSS_TOLERANCE, Speed, loss_comparison, main, print_table, standby_state
from scripts.service_harness import wait_until


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
        "repeats": 1,
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


def test_the_repeat_waits_for_what_the_unused_standby_said_of_itself(tmp_path: Path) -> None:
    """The live standby of the DATA_DIR without a taken marker (found in /proc as the harness finds
    them: here a sleeping process with a standby's command line) and its own lines of the log, not
    an earlier standby's."""
    data_dir = tmp_path / "data"
    folder = data_dir / "standby"
    folder.mkdir(parents=True)
    log = folder / "standby.log"
    assert standby_state(data_dir) is None  # none running
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)", "-m", "trainer", "--standby"]
    standby = subprocess.Popen(sleeper, env={**os.environ, "DATA_DIR": str(data_dir)})
    try:
        pid = standby.pid
        wait_until(lambda: standby_state(data_dir) == "importing", 10, "the standby in /proc")
        lines = [
            "standby trainer (pid 10) ready in 21.0 s (torch, unsloth, transformers, trl, datasets)",
            "standby trainer (pid 10) preloaded /models/8b (unsloth, max_seq_length 4096) in 6.1 s",
            f"standby trainer (pid {pid}) ready in 21.0 s (torch, unsloth, transformers, trl, datasets)",
            "==((====))==  Unsloth's banner, printed while it preloads",
            f"standby trainer (pid {pid}) preloaded /models/8b (unsloth, max_seq_length 4096) in 6.1 s",
        ]
        for line, state in zip(lines, ["importing", "importing", "ready", "ready", "preloaded"], strict=True):
            with log.open("a") as out:
                out.write(line + "\n")
            assert standby_state(data_dir) == state
        (folder / f"{pid}.taken").write_text("{}")  # a job took it: no unused standby
        assert standby_state(data_dir) is None
    finally:
        standby.kill()
        standby.wait()


def test_a_gpu_hosts_worker_preloads_unless_told_not_to(tmp_path: Path) -> None:
    assert speed(tmp_path, service_env=[]).preloads() is True  # the default on a GPU host
    assert speed(tmp_path, service_env=[], dry_run=True).preloads() is False  # the CPU: no standby
    off = speed(tmp_path, service_env=[("TRAINER_STANDBY_PRELOAD", "false")])
    assert off.preloads() is False
    off.worker_env = {"TRAINER_STANDBY_PRELOAD": "true"}  # a part started the worker again with it on
    assert off.preloads() is True
