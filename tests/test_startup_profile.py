"""STARTUP_PROFILE: the trainer samples its own stack from the job's start to the end of its first
step and leaves a flame graph's input and a summary in the job's folder (trainer/stack_sampler.py)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Env, job_spec, run_to_end
from trainer.stack_sampler import FOLDED_FILE, SUMMARY_FILE, StackSampler


def spin_in_a_known_place(until: threading.Event) -> None:
    while not until.is_set():
        sum(range(1000))


def test_the_sampler_finds_where_a_thread_spends_its_time_and_writes_both_files(tmp_path: Path) -> None:
    done = threading.Event()
    worker = threading.Thread(target=spin_in_a_known_place, args=(done,))
    worker.start()
    assert worker.ident is not None
    sampler = StackSampler(worker.ident, folder=tmp_path, interval_s=0.005)
    sampler.start()
    time.sleep(0.3)
    done.set()
    worker.join()
    sampler.join(timeout=5)  # the thread it samples ended: so does the sampler, and it writes
    assert not sampler.is_alive()

    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert summary["samples"] >= 10 and summary["interval_s"] == 0.005
    # Each sample weighs the time since the one before: together, the time sampled.
    assert 0.3 <= summary["sampled_s"] <= summary["wall_s"]
    inclusive = dict(summary["inclusive_s"])
    [spinning] = [name for name in inclusive if name.startswith("spin_in_a_known_place(")]
    assert f"{Path(__file__)}:" in spinning  # a file outside site-packages keeps its path
    assert inclusive[spinning] >= 0.5 * summary["sampled_s"]
    # Folded stacks: outermost first, milliseconds at the end of each line, adding up to the time.
    lines = (tmp_path / FOLDED_FILE).read_text().splitlines()
    milliseconds = sum(int(line.rsplit(" ", 1)[1]) for line in lines)
    assert abs(milliseconds - 1000 * summary["sampled_s"]) <= len(lines) + 10
    assert any(line.split(";")[0].startswith("Thread._bootstrap(") and spinning in line for line in lines)


def test_the_sampler_stops_when_told_its_moment_has_come(tmp_path: Path) -> None:
    deadline = time.monotonic() + 0.1
    sampler = StackSampler(
        threading.main_thread().ident or 0, interval_s=0.005, until=lambda: time.monotonic() > deadline
    )
    sampler.start()
    sampler.join(timeout=5)  # without stop(): until() ended it
    assert not sampler.is_alive() and sampler.summary()["samples"] >= 1
    assert not (tmp_path / SUMMARY_FILE).exists()  # no folder given, nothing written


@pytest.mark.slow
def test_a_job_with_startup_profile_on_leaves_its_profile_beside_its_log(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STARTUP_PROFILE", "true")
    record = run_to_end(client, job_spec(tiny_model, chat_dataset, max_steps=2, save_steps=100))
    assert record["status"] == "succeeded", record["error"]
    job_dir = env.data_dir / "jobs" / str(record["id"])
    summary = json.loads((job_dir / SUMMARY_FILE).read_text())
    inclusive = dict(summary["inclusive_s"])
    # The trainer's own phases are on the stacks: loading the model, and training up to step 1.
    assert any(name.startswith("Run.train(") for name in inclusive), list(inclusive)[:20]
    assert any(name.startswith("Run.load_model(") for name in inclusive), list(inclusive)[:20]
    assert (job_dir / FOLDED_FILE).read_text().strip()
