"""TRAINER_STANDBY_PRELOAD: an idle worker's standby trainer loads the model of the worker's last
job, and a job that asks for the same model (backend, max_seq_length, unchanged files) takes it
instead of loading it (trainer/preload.py, worker/standby.py)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from core.spec import JobSpec
from scripts.service_harness import Service, standby_pids, wait_until
from tests.conftest import Env, job_spec
from trainer import preload
from trainer.standby import StdinLines, free_other_model, preload_model, wait_for_job


@pytest.fixture
def clean_preload() -> None:
    yield
    preload.release()


def test_a_preloaded_model_is_taken_by_the_same_request_only_while_its_files_are_unchanged(
    tiny_model: Path, clean_preload: None
) -> None:
    request = preload.Request(str(tiny_model), "transformers", 64)
    loaded = preload.preload(request)
    assert preload.holds(str(tiny_model)) and loaded.tokenizer is None
    assert "model preloaded by the standby trainer" in loaded.describe()

    # Another max_seq_length is another load: the preloaded model is freed, nothing is handed over.
    assert preload.take(preload.Request(str(tiny_model), "transformers", 128)) is None
    assert preload.PRELOADED is None

    again = preload.preload(request)
    taken = preload.take(request)
    assert taken is again and taken.model.config.model_type == "llama"
    assert preload.PRELOADED is None  # handed over: the module keeps no reference

    preload.preload(request)
    config = tiny_model / "config.json"
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # the folder was rewritten
    try:
        assert preload.take(request) is None
    finally:
        os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_the_standby_frees_a_preloaded_model_its_job_does_not_train_and_says_so(
    tiny_model: Path, chat_dataset: Path, clean_preload: None, capsys: pytest.CaptureFixture[str]
) -> None:
    loaded = ["torch", "transformers", "trl", "datasets"]  # a CPU standby's imports: backend auto is transformers
    preload.preload(preload.Request(str(tiny_model), "transformers", 64))
    same = JobSpec.model_validate(job_spec(tiny_model, chat_dataset))
    assert free_other_model(7, same, loaded) is False and preload.holds(str(tiny_model))  # the job takes it

    other = JobSpec.model_validate(job_spec(tiny_model, chat_dataset, max_seq_length=96))
    assert free_other_model(7, other, loaded) is False  # freed, and nothing left allocated: train here
    assert preload.PRELOADED is None
    said = capsys.readouterr().out
    assert f"job 7 does not train the preloaded {tiny_model} (transformers, max_seq_length 64): freed it" in said

    # Had the card not been given back, the job would start in a clean process.
    preload.preload(preload.Request(str(tiny_model), "transformers", 64))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(preload, "LEFT_ALLOCATED_MAX_BYTES", -1)
        assert free_other_model(8, other, loaded) is True


def test_the_standby_preloads_only_while_no_job_is_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[dict[str, object]] = []
    monkeypatch.setattr("trainer.standby.preload_model", loaded.append)
    preload_line = json.dumps({"preload": {"model": "m", "backend": "transformers", "max_seq_length": 64}})
    job_line = json.dumps({"job_id": 7, "parent_pid": 1, "workdir": "/tmp"})

    read, write = os.pipe()
    try:
        # The job came with the request: the standby goes straight to the job.
        os.write(write, f"{preload_line}\n{job_line}\n".encode())
        assert wait_for_job(StdinLines(read)) == json.loads(job_line) and loaded == []

        # The request alone: it preloads, then waits for the job, which may come in pieces.
        os.write(write, f"{preload_line}\n".encode())

        def send_job_later() -> None:
            wait_until(lambda: loaded, 10, "the preload")
            os.write(write, job_line[:10].encode())
            os.write(write, f"{job_line[10:]}\n".encode())

        sender = threading.Thread(target=send_job_later)
        sender.start()
        assert wait_for_job(StdinLines(read)) == json.loads(job_line)
        sender.join()
        assert loaded == [json.loads(preload_line)["preload"]]

        os.close(write)  # end of input, with a request before it: no job
        write = -1
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)


@pytest.mark.slow
def test_an_idle_standby_preloads_the_last_jobs_model_for_the_next_job_and_again_after_a_restart(
    env: Env, tmp_path: Path, tiny_model: Path, chat_dataset: Path
) -> None:
    service = Service(
        tmp_path / "service",
        data_dir=env.data_dir,
        redis_url=env.redis_url,
        settings={**env.vars, "TRAINER_STANDBY": "1", "TRAINER_STANDBY_PRELOAD": "1"},
    )
    log = env.data_dir / "standby" / "standby.log"

    def preloads() -> int:
        return log.read_text().count(f"preloaded {tiny_model} (transformers, max_seq_length 64)") if log.exists() else 0

    def startup(job_id: int) -> str:
        [message] = [m for kind, m in service.events(job_id) if kind == "startup"]
        return message

    spec = job_spec(tiny_model, chat_dataset, max_steps=2, save_steps=100)
    try:
        service.start()
        first = service.submit(spec)  # nothing to preload yet: it loads its model itself
        assert service.wait_for(first, timeout_s=120)["status"] == "succeeded"
        assert "preloaded" not in startup(first)
        wait_until(lambda: preloads() == 1, 60, "the idle standby to preload the model")

        again = service.submit(spec)
        record = service.wait_for(again, timeout_s=120)
        assert record["status"] == "succeeded", record["error"]
        assert "model preloaded by the standby trainer" in startup(again)
        assert "weights read ahead" not in startup(again)  # nothing to read: it was loaded

        # Another max_seq_length: the standby frees what it preloaded and the job loads its own.
        wait_until(lambda: preloads() == 2, 60, "the next preload")
        other = service.submit({**spec, "hyperparameters": {**spec["hyperparameters"], "max_seq_length": 96}})
        record = service.wait_for(other, timeout_s=120)
        assert record["status"] == "succeeded", record["error"]
        assert "preloaded" not in startup(other)
        trainer_log = (env.data_dir / "jobs" / str(other) / "trainer.log").read_text()
        assert f"job {other} does not train the preloaded {tiny_model} (transformers, max_seq_length 64)" in trainer_log

        # A restarted worker offers its first standby the last job's model (max_seq_length 96).
        wait_until(lambda: "max_seq_length 96) in" in log.read_text(), 60, "the preload after the third job")
        service.stop_workers()
        wait_until(lambda: not standby_pids(service.data_dir), 30, "the standbys to end with the worker")
        service.start_worker()
        wait_until(lambda: log.read_text().count("max_seq_length 96) in") == 2, 60, "the restarted worker's preload")
    finally:
        service.stop()
        print(service.logs())


def test_the_worker_keeps_going_when_it_cannot_note_its_last_model(tmp_path: Path) -> None:
    from worker.standby import remember_last_model, remembered_model

    request = {"model": "/models/8b", "backend": "unsloth", "max_seq_length": 4096}
    remember_last_model(tmp_path, request)
    assert remembered_model(tmp_path) == request
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    remember_last_model(blocked, request)  # its folder cannot be made: logged, not raised
    assert remembered_model(blocked) is None
    (tmp_path / "last-model.json").write_text('{"model": "/models/8b"')  # cut short by a full disk
    assert remembered_model(tmp_path) is None


def test_a_preload_that_cannot_be_read_or_loaded_is_said_and_forgotten(
    tmp_path: Path, clean_preload: None, capsys: pytest.CaptureFixture[str]
) -> None:
    preload_model({"model": "/models/8b"})  # no backend nor max_seq_length: another worker's version
    assert "ignored a preload request it cannot read" in capsys.readouterr().out
    preload_model({"model": str(tmp_path / "gone"), "backend": "transformers", "max_seq_length": 64})
    assert f"could not preload {tmp_path / 'gone'}: " in capsys.readouterr().out
    assert preload.PRELOADED is None  # the job loads its own, and says why it cannot
