"""The trainer reads a model's weight files into the page cache while it imports (trainer/prefetch.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer import prefetch


def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"x" * 3_000_000)
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"y" * 1_000_000)
    (folder / "config.json").write_text("{}")
    return folder


def test_the_weight_files_are_read_whole_and_the_summary_says_so(tmp_path: Path) -> None:
    folder = model_folder(tmp_path)
    assert [p.name for p in prefetch.weight_files(str(folder))] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    reader = prefetch.start(str(folder))
    reader.join(timeout=30)
    assert reader.read_bytes == reader.total == 4_000_000
    assert reader.summary().startswith("weights read ahead into the page cache: 4.0 MB in ")


def test_weights_larger_than_half_the_available_memory_are_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prefetch, "available_bytes", lambda: 6_000_000)
    reader = prefetch.start(str(model_folder(tmp_path)))
    reader.join(timeout=30)
    assert reader.read_bytes == 0
    assert reader.summary() == "weights not read ahead (4.0 MB of weights, more than half the 6.0 MB available)"
    missing = prefetch.start(str(tmp_path / "nowhere"))
    missing.join(timeout=30)
    assert missing.summary() == "weights not read ahead (no weight files found)"
