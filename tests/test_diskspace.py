"""Telling a full disk from other failures, the reserve file, and a record that must land on a
full disk; and the sweeper of uploads a killed API left behind."""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
import time
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from core.diskspace import Reserve, is_disk_full_error, write_despite_full_disk
from tests.conftest import Env


def full_database() -> OperationalError:
    return OperationalError("COMMIT", {}, sqlite3.OperationalError("database or disk is full"))


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        RuntimeError(
            "[enforce fail at inline_container.cc:664] . unexpected pos 0 vs 0"
            " PytorchStreamWriter failed writing file data/0: file write failed"
        ),
        full_database(),
    ],
)
def test_full_disk_errors_are_recognised(exc: BaseException) -> None:
    assert is_disk_full_error(exc)


def test_a_full_disk_is_recognised_through_the_cause_chain() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("saving failed") from inner
    except RuntimeError as outer:
        assert is_disk_full_error(outer)


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.EIO, "Input/output error"),
        ValueError("bad value"),
        OperationalError("SELECT", {}, sqlite3.OperationalError("database is locked")),
    ],
)
def test_other_errors_are_not_a_full_disk(exc: BaseException) -> None:
    assert not is_disk_full_error(exc)


def test_the_reserve_is_real_blocks_and_is_given_up_once(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from core.config import get_settings

    monkeypatch.setenv("DISK_RESERVE_BYTES", str(1024 * 1024))
    monkeypatch.setenv("MIN_FREE_DISK_BYTES", "0")
    get_settings.cache_clear()
    reserve = Reserve.for_settings()
    assert reserve.ensure()
    assert reserve.path.stat().st_blocks * 512 >= 1024 * 1024  # allocated, not sparse
    assert reserve.release() and not reserve.path.exists()
    assert not reserve.release()


def test_a_record_on_a_full_disk_gives_up_the_reserve_then_waits_for_space(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.config import get_settings

    monkeypatch.setenv("DISK_RESERVE_BYTES", str(1024 * 1024))
    monkeypatch.setenv("MIN_FREE_DISK_BYTES", "0")
    get_settings.cache_clear()
    Reserve.for_settings().ensure()
    attempts: list[bool] = []
    naps: list[float] = []

    def write() -> str:
        attempts.append(Reserve.for_settings().path.exists())
        if len(attempts) < 4:  # still full after the reserve is gone: it waits, with backoff
            raise full_database()
        return "recorded"

    assert write_despite_full_disk(write, what="test", sleep=naps.append) == "recorded"
    assert attempts == [True, False, False, False]
    assert naps == [1.0, 2.0]


def test_a_record_on_a_disk_already_below_the_margin_gives_up_the_reserve_even_when_it_fits(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite may write the record into log pages it already holds: the reserve still goes, for
    the writes after it."""
    from core.config import get_settings

    monkeypatch.setenv("DISK_RESERVE_BYTES", str(1024 * 1024))
    monkeypatch.setenv("MIN_FREE_DISK_BYTES", "0")
    get_settings.cache_clear()
    reserve = Reserve.for_settings()
    assert reserve.ensure()
    assert write_despite_full_disk(lambda: "recorded", what="test") == "recorded"
    assert reserve.path.exists()  # room to spare: kept

    monkeypatch.setenv("MIN_FREE_DISK_BYTES", str(2**62))  # every disk is below this margin
    get_settings.cache_clear()
    assert write_despite_full_disk(lambda: "recorded", what="test") == "recorded"
    assert not reserve.path.exists()


def test_a_record_that_fails_for_another_reason_is_not_retried(env: Env) -> None:
    def write() -> None:
        raise OperationalError("SELECT", {}, sqlite3.OperationalError("no such table: job"))

    with pytest.raises(OperationalError):
        write_despite_full_disk(write, what="test", sleep=lambda _s: None)


def test_the_sweeper_removes_unfinished_uploads_nobody_holds(tmp_path: Path) -> None:
    from app.uploads import SWEEP_MIN_AGE_S, sweep_unfinished

    abandoned = tmp_path / ".incoming-dead.jsonl"
    abandoned.write_bytes(b"x" * 100)
    in_progress = tmp_path / ".incoming-live.jsonl"
    in_progress.write_bytes(b"y" * 10)
    just_begun = tmp_path / ".incoming-new.jsonl"
    stored = tmp_path / "3.jsonl"
    stored.write_bytes(b"z")
    old = time.time() - 60
    for path in (abandoned, in_progress, stored):
        os.utime(path, (old, old))
    just_begun.write_bytes(b"")
    with open(in_progress, "ab") as receiving:  # what a live upload holds while it streams
        fcntl.flock(receiving.fileno(), fcntl.LOCK_EX)
        assert sweep_unfinished(tmp_path) == (1, 100)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".incoming-live.jsonl", ".incoming-new.jsonl", "3.jsonl"]
    time.sleep(SWEEP_MIN_AGE_S)
    assert sweep_unfinished(tmp_path) == (2, 10)
    assert [p.name for p in tmp_path.iterdir()] == ["3.jsonl"]
