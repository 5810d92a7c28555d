"""The parts of scripts/gpu_methods.py that run anywhere (the script itself runs on the GPU
machine; `--cpu-smoke` runs it whole on the CPU): pairs cut at max_seq_length, so its tokens/s
is arithmetic, and the table printed from partial results."""

from __future__ import annotations

from pathlib import Path

from scripts.gpu_methods import dpo_settings, long_pairs, main, print_table


def test_every_pair_of_the_gpu_script_is_cut_at_max_seq_length(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for row in long_pairs(4, 256):
        prompt = len(tokenizer(row["prompt"])["input_ids"])
        assert prompt < 256  # TRL would drop a pair whose prompt alone fills max_length
        for answer in (row["chosen"], row["rejected"]):
            assert len(tokenizer(row["prompt"] + answer)["input_ids"]) > 256


def test_the_table_prints_from_whatever_phases_ran(capsys: object) -> None:
    import argparse

    args = argparse.Namespace(
        shape="llama-3.1-8b", seq_len=2048, micro_batch=1, grad_accum=4, steps=6, optim="paged_adamw_8bit"
    )
    settings = dpo_settings(args, "precomputed")
    assert settings["tokens_per_step"] == 1 * 4 * 2 * 2048
    results = {"card": "NVIDIA H100 80GB HBM3", "date": "2026-12-06", "dpo_settings": settings, "dpo_bare": {}}
    print_table(results, [("bare DPO script ran", False, "no GPU")])
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert "NVIDIA H100 80GB HBM3 2026-12-06: DPO of llama-3.1-8b, seq 2048, micro-batch 1 x 4" in out
    assert "0 of 1 checks passed; FAILED: ['bare DPO script ran']" in out


def test_the_gpu_script_takes_its_arguments() -> None:
    try:
        main(["--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
