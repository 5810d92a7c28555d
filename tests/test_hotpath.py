"""The hot path answers repeated reads from memory ahead of FastAPI: it must answer exactly as the
routes do (status, headers, body), and leave everything else to them."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import update
from sqlmodel import col

from app.hotpath import HotReads
from tests.conftest import HUB_SPEC, Env

SPEC = HUB_SPEC  # Hub ids in the tests' Hugging Face cache


@pytest.fixture
def jobs(client: httpx.Client, env: Env, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Three jobs (one running, two finished) with step logs and events; records kept a minute."""
    from core.config import get_settings
    from core.db import session_scope
    from core.models import Job, JobEvent, StepLog

    monkeypatch.setenv("RECORD_MAX_AGE_S", "60")
    get_settings.cache_clear()
    ids = [int(client.post("/jobs", json=SPEC).json()["id"]) for _ in range(3)]
    with session_scope() as session:
        for job_id, status in zip(ids, ("succeeded", "failed", "running"), strict=True):
            session.execute(update(Job).where(col(Job.id) == job_id).values(status=status, step=3))
            for step in (1, 2, 3):
                session.add(StepLog(job_id=job_id, step=step, loss=1.0 / step, vram_allocated=2**31 + step))
                session.add(JobEvent(job_id=job_id, kind="checkpoint", message=f"saved checkpoint-{step}"))
    return ids


def twice(client: httpx.Client, path: str, **kwargs: Any) -> tuple[httpx.Response, httpx.Response, int]:
    """The same request twice: the first fills the memory (FastAPI's route), the second may be
    answered by the hot path. Returns both, and how many the hot path answered."""
    before = HotReads.served
    first = client.get(path, **kwargs)
    second = client.get(path, **kwargs)
    return first, second, HotReads.served - before


def same(a: httpx.Response, b: httpx.Response) -> None:
    assert (a.status_code, a.content) == (b.status_code, b.content)
    assert a.headers.multi_items() == b.headers.multi_items()


@pytest.mark.parametrize(
    "path",
    [
        "/jobs/{0}",
        "/jobs/{2}",
        "/jobs/{0}?fields=status,progress",
        "/jobs/00{0}",
        "/jobs",
        "/jobs?limit=2",
        "/jobs?status=failed",
        "/jobs?cursor={2}&limit=1",
        "/jobs?fields=id,status",
        "/jobs/{0}/logs",
        "/jobs/{0}/logs?after_step=1",
        "/jobs/{0}/logs?limit=2&after_step=0",
        "/jobs/{1}/events",
        "/jobs/{1}/events?after_id=1&limit=5",
    ],
)
def test_answers_what_the_route_answers(client: httpx.Client, jobs: list[int], path: str) -> None:
    first, second, served = twice(client, path.format(*jobs))
    assert first.status_code == 200
    assert served == 1, "the repeat was not answered from memory"
    same(first, second)
    etag = first.headers["etag"]
    conditional, again, served = twice(client, path.format(*jobs), headers={"If-None-Match": f'W/{etag}, "x"'})
    assert conditional.status_code == 304 and served == 2
    same(conditional, again)


def test_with_tokens_it_answers_only_a_valid_token(
    client: httpx.Client, jobs: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.config import get_settings

    monkeypatch.setenv("API_TOKENS", "s3cret")
    get_settings.cache_clear()
    ok, again, served = twice(client, f"/jobs/{jobs[0]}", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and served == 1
    same(ok, again)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic czNjcmV0"}):
        refused, refused_again, served = twice(client, f"/jobs/{jobs[0]}", headers=headers)
        assert refused.status_code == 401 and served == 0
        same(refused, refused_again)


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/jobs/{0}?fields=", 422),
        ("/jobs/{0}?fields=status,nope", 422),
        ("/jobs/{0}?feilds=status", 422),
        ("/jobs/{0}?fields=status&fields=id", 200),
        ("/jobs?limit=0", 422),
        ("/jobs?limit=501", 422),
        ("/jobs?status=bogus", 422),
        ("/jobs?cursor=abc", 422),
        ("/jobs/{0}/logs?limit=5001", 422),
        ("/jobs/{0}/logs?after_id=1", 422),
        ("/jobs/{2}/logs", 200),
        ("/jobs/9223372036854775808", 422),
        ("/jobs/0", 422),
        ("/jobs/999", 404),
    ],
)
def test_leaves_everything_else_to_the_routes(client: httpx.Client, jobs: list[int], path: str, status: int) -> None:
    """Errors, duplicates, and pages of a running job (which change): FastAPI answers them."""
    first, second, served = twice(client, path.format(*jobs))
    assert (first.status_code, served) == (status, 0)
    same(first, second)


def test_no_cache_goes_to_the_database(client: httpx.Client, jobs: list[int]) -> None:
    _first, _second, served = twice(client, f"/jobs/{jobs[2]}", headers={"Cache-Control": "no-cache"})
    assert served == 0
