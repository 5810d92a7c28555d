"""Checkpoint folders on disk: which are complete, which a resume takes, what is swept, and how
a finished folder is published (fsync, rename) so that no incomplete folder ever has a real name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.checkpoint_files import publish, staging_path
from core.checkpoint_store import checkpoint_problem, newest_complete, sweep_partials


def write_checkpoint(folder: Path, step: int, *, shards: int = 0, optimizer: bool = True, state: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    if shards:
        names = [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {f"w{i}": n for i, n in enumerate(names)}})
        )
        for name in names:
            (folder / name).write_bytes(b"w")
    else:
        (folder / "model.safetensors").write_bytes(b"weights")
    if optimizer:
        (folder / "optimizer.pt").write_bytes(b"state")
    if state:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_a_complete_checkpoint_has_weights_state_and_optimizer(tmp_path: Path) -> None:
    assert checkpoint_problem(write_checkpoint(tmp_path / "checkpoint-20", 20)) is None
    assert checkpoint_problem(write_checkpoint(tmp_path / "checkpoint-30", 30, shards=3)) is None


def test_what_makes_a_checkpoint_incomplete(tmp_path: Path) -> None:
    assert (
        checkpoint_problem(write_checkpoint(tmp_path / "checkpoint-1", 1, optimizer=False)) == "optimizer.pt is missing"
    )
    assert (
        checkpoint_problem(write_checkpoint(tmp_path / "checkpoint-2", 2, state=False))
        == "trainer_state.json is missing or unreadable"
    )
    assert checkpoint_problem(write_checkpoint(tmp_path / "checkpoint-3", 4)) == "trainer_state.json is for step 4"
    sharded = write_checkpoint(tmp_path / "checkpoint-5", 5, shards=2)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    assert checkpoint_problem(sharded) == "weight shard(s) model-00002-of-00002.safetensors missing"
    final = tmp_path / "final"
    final.mkdir()
    (final / "config.json").write_text("{}")
    assert checkpoint_problem(final) == "neither model.safetensors nor model.safetensors.index.json is there"
    (final / "model.safetensors").write_bytes(b"w")
    assert checkpoint_problem(final) is None  # the final model has no optimizer state or trainer state


def test_resume_takes_the_newest_complete_checkpoint_by_step_not_by_name(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "checkpoint-9", 9)
    write_checkpoint(tmp_path / "checkpoint-20", 20)
    write_checkpoint(tmp_path / "checkpoint-40", 40, optimizer=False)  # what a crash mid-save left, before staging
    (tmp_path / ".partial-checkpoint-60").mkdir()
    resume, skipped = newest_complete(tmp_path)
    assert resume == tmp_path / "checkpoint-20"
    assert skipped == [(tmp_path / "checkpoint-40", "optimizer.pt is missing")]


def test_no_complete_checkpoint_means_no_resume(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "checkpoint-5", 5, state=False)
    assert newest_complete(tmp_path)[0] is None
    assert newest_complete(tmp_path / "missing") == (None, [])


def test_sweep_removes_staging_folders_only(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "checkpoint-4", 4)
    partial = write_checkpoint(tmp_path / ".partial-checkpoint-8" / "checkpoint-8", 8).parent
    assert sweep_partials(tmp_path) == [(".partial-checkpoint-8", len(b"{}weightsstate") + len('{"global_step": 8}'))]
    assert not partial.exists() and (tmp_path / "checkpoint-4").is_dir()


def test_publish_makes_the_folder_appear_whole_and_replaces_an_earlier_one(tmp_path: Path) -> None:
    final = tmp_path / "checkpoint-8"
    staging = write_checkpoint(staging_path(final), 8)
    assert not final.exists()
    publish(staging, final)
    assert checkpoint_problem(final) is None and not staging.exists()
    # A resumed attempt saving the same step again: the new folder wins, nothing of the old stays.
    again = write_checkpoint(staging_path(final), 8, shards=2)
    publish(again, final)
    assert sorted(p.name for p in final.iterdir()) == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "optimizer.pt",
        "trainer_state.json",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-8"]


@pytest.mark.parametrize("name", ["final", "checkpoint-3"])
def test_staging_names_are_hidden_from_the_trainers_own_globs(name: str, tmp_path: Path) -> None:
    # transformers rotates and resumes by globbing checkpoint-*: a staging folder must never match.
    staging = staging_path(tmp_path / name)
    staging.mkdir()
    assert list(tmp_path.glob("checkpoint-*")) == []
