"""Who may do what on a shared box: tokens (hashed, cached, revoked, expired), roles, one project
never seeing another's jobs and files on any route, quotas, priorities, per-token rates and the
audit. The API in-process against real SQLite and a real redis-server (docs/security.md)."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import Session, select

from tests.builders import chat_rows, write_jsonl
from tests.conftest import HUB_SPEC, Env

MARKER = "alpha-secret-7f3a"  # in everything project alpha owns: no answer to beta may hold it


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def make_token(client: httpx.Client, admin: dict[str, str], principal: str, **fields: Any) -> str:
    made = client.post("/admin/tokens", json={"principal": principal, **fields}, headers=admin)
    assert made.status_code == 201, made.text
    return str(made.json()["token"])


@pytest.fixture
def admin(client: httpx.Client, env: Env) -> dict[str, str]:
    """An open server (no API_TOKENS, no token yet) closed by its first token, an admin's; two projects."""
    for project in ("alpha", "beta"):
        assert client.post("/admin/projects", json={"name": project}).status_code == 201
    token = make_token(client, {}, "root", role="admin")
    return bearer(token)


def test_the_first_token_closes_an_open_server_and_tokens_are_kept_hashed(
    client: httpx.Client, env: Env, admin: dict[str, str]
) -> None:
    from core.db import session_scope
    from core.models import ApiToken

    missing = client.get("/jobs")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == 'Bearer realm="finetune"'
    alice = make_token(client, admin, "alice", project="alpha", role="member", description=MARKER)
    assert alice.startswith("ft_") and len(alice) > 40
    prefix = alice[: len("ft_") + 8]
    with session_scope() as session:
        rows = session.exec(select(ApiToken)).all()
    stored = {row.prefix: row for row in rows}
    assert stored[prefix[3:]].sha256 == hashlib.sha256(alice.encode()).hexdigest()
    assert all(alice not in json.dumps(row.model_dump(mode="json")) for row in rows)  # never the token itself
    listed = client.get("/admin/tokens", headers=admin).json()["items"]
    assert {(t["prefix"], t["principal"], t["role"], t["project"], t["state"]) for t in listed} == {
        (prefix, "alice", "member", "alpha", "active"),
        (listed[-1]["prefix"], "root", "admin", "default", "active"),
    }
    assert alice.split("_", 2)[2] not in json.dumps(listed)
    me = client.get("/me", headers=bearer(alice)).json()
    assert me == {
        "principal": "alice",
        "kind": "user",
        "role": "member",
        "project": "alpha",
        "token_prefix": prefix,
        "rate_limit_per_minute": None,
    }

    revoked = client.delete(f"/admin/tokens/{prefix}", headers=admin)
    assert revoked.status_code == 200 and revoked.json()["state"] == "revoked"
    refused = client.get("/jobs", headers=bearer(alice))
    assert (refused.status_code, refused.json()["detail"]) == (
        401,
        f"the bearer token {prefix} was revoked; ask an admin for a new one",
    )
    # Revoking every token does not open the server again.
    root_prefix = listed[-1]["prefix"]
    assert client.delete(f"/admin/tokens/{root_prefix}", headers=admin).status_code == 200
    assert client.get("/jobs").status_code == 401
    assert client.get("/jobs", headers=admin).status_code == 401


def test_an_expired_token_is_refused_saying_when(client: httpx.Client, env: Env, admin: dict[str, str]) -> None:
    from app.auth import get_registry
    from core.db import session_scope
    from core.models import ApiToken, utcnow

    token = make_token(client, admin, "temp", project="alpha", expires_in_days=1)
    assert client.get("/jobs", headers=bearer(token)).status_code == 200
    with session_scope() as session:
        row = session.exec(select(ApiToken).where(ApiToken.prefix == token[3:11])).one()
        row.expires_at = utcnow() - timedelta(seconds=1)
        session.add(row)
    get_registry().forget()
    refused = client.get("/jobs", headers=bearer(token))
    assert refused.status_code == 401
    assert refused.json()["detail"].startswith(f"the bearer token {token[:11]} expired at ")


def test_api_tokens_keep_working_as_admins_of_the_default_project(
    client: httpx.Client, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.config import get_settings

    monkeypatch.setenv("API_TOKENS", "s3cret")
    get_settings.cache_clear()
    me = client.get("/me", headers=bearer("s3cret")).json()
    assert (me["principal"], me["role"], me["project"]) == ("API_TOKENS #1", "admin", "default")
    job = client.post("/jobs", json=HUB_SPEC, headers=bearer("s3cret")).json()
    assert (job["project"], job["submitted_by"]) == ("default", None)


def test_without_any_token_the_server_stays_open_as_before(client: httpx.Client, env: Env) -> None:
    job = client.post("/jobs", json=HUB_SPEC)
    assert job.status_code == 201 and job.json()["project"] == "default"
    assert client.get("/me").json()["principal"] == "anonymous"
    assert client.get("/audit").status_code == 200  # one person is the admin of their own box


def test_token_lookups_are_answered_from_memory_not_the_database(
    client: httpx.Client, env: Env, admin: dict[str, str]
) -> None:
    from app.auth import get_registry

    alice = bearer(make_token(client, admin, "alice", project="alpha"))
    client.get("/jobs", headers=alice)
    reads = get_registry().reads
    for _ in range(50):
        assert client.get("/jobs", headers=alice).status_code == 200
    assert get_registry().reads == reads  # within TOKEN_CACHE_S: not one read of the tokens
    # A wrong token makes the registry look again at most once per TOKEN_RELOAD_MIN_S.
    for _ in range(20):
        assert client.get("/jobs", headers=bearer("ft_00000000_wrong")).status_code == 401
    assert get_registry().reads <= reads + 1


# ---- one project never sees another's ------------------------------------------------------------


def _alphas_things(client: httpx.Client, env: Env, alice: dict[str, str]) -> dict[str, Any]:
    """A job of project alpha with a file, step logs, events, a checkpoint on disk and a webhook
    delivery, each holding MARKER."""
    from core.config import get_settings
    from core.db import session_scope
    from core.models import Checkpoint, CheckpointStatus, JobEvent, StepLog

    rows = write_jsonl(env.datasets_dir / f"{MARKER}.jsonl", chat_rows(8))
    uploaded = client.post("/files", files={"file": (rows.name, rows.read_bytes())}, headers=alice)
    assert uploaded.status_code == 201, uploaded.text
    file_id = uploaded.json()["id"]
    spec = {
        **HUB_SPEC,
        "dataset": {"file_id": file_id},
        "webhooks": [{"url": f"http://hooks.example/{MARKER}", "events": ["status"]}],
    }
    submitted = client.post("/jobs", json=spec, headers=alice)
    assert submitted.status_code == 201, submitted.text
    job_id = submitted.json()["id"]
    folder = get_settings().checkpoints_dir(job_id) / "checkpoint-1"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(MARKER)
    digest = hashlib.sha256(MARKER.encode()).hexdigest()
    stat = (folder / "config.json").stat()
    with session_scope() as session:
        session.add(StepLog(job_id=job_id, step=1, loss=1.5))
        session.add(JobEvent(job_id=job_id, kind="checkpoint", message=f"saved {MARKER}"))
        session.add(
            Checkpoint(
                job_id=job_id,
                name="checkpoint-1",
                step=1,
                status=CheckpointStatus.ready,
                size_bytes=len(MARKER),
                files=[{"path": "config.json", "size": len(MARKER), "sha256": digest, "mtime_ns": stat.st_mtime_ns}],
            )
        )
    return {"job_id": job_id, "file_id": file_id}


def test_a_second_projects_token_finds_nothing_of_the_first_on_any_route_of_the_document(
    client: httpx.Client, env: Env, admin: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.config import get_settings

    monkeypatch.setenv("WEBHOOK_ALLOWED_HOSTS", "hooks.example")
    monkeypatch.setenv("WEBHOOK_SECRET", "whsec_c2VjcmV0")
    get_settings.cache_clear()
    alice_token = make_token(client, admin, "alice", project="alpha")
    alice = bearer(alice_token)
    bob = bearer(make_token(client, admin, "bob", project="beta"))
    alphas = _alphas_things(client, env, alice)
    job_id, file_id = alphas["job_id"], alphas["file_id"]
    assert client.get(f"/jobs/{job_id}/webhooks", headers=alice).json()["items"], "alpha's job has a delivery"
    own = write_jsonl(env.datasets_dir / "beta.jsonl", chat_rows(4)).read_bytes()
    values = {
        "job_id": str(job_id),
        "fine_tuning_job_id": f"ftjob-{job_id}",
        "name": "checkpoint-1",
        "path": "config.json",
        "tracker": "tensorboard",
        "prefix": alice_token[:11],
    }
    bodies: dict[tuple[str, str], dict[str, Any]] = {
        ("post", "/jobs"): {"json": {**HUB_SPEC, "dataset": {"file_id": file_id}}},
        ("post", "/jobs/estimate"): {"json": HUB_SPEC},
        ("post", "/files"): {"files": {"file": ("beta.jsonl", own)}},
        ("post", "/v1/files"): {"files": {"file": ("beta.jsonl", own)}, "data": {"purpose": "fine-tune"}},
        ("post", "/v1/fine_tuning/jobs"): {"json": {"model": HUB_SPEC["model"], "training_file": f"file-{file_id}"}},
        ("post", "/admin/projects"): {"json": {"name": "gamma"}},
        ("patch", "/admin/projects/{name}"): {"json": {"max_gpus": 0}},
        ("post", "/admin/tokens"): {"json": {"principal": "mallory", "role": "admin"}},
    }
    document = client.get("/openapi.json", headers=bob).json()
    swept: set[tuple[str, str]] = set()
    for template, operations in document["paths"].items():
        for method in operations:
            path = template
            for name, value in values.items():
                path = path.replace("{" + name + "}", value)
            if "{file_id}" in path:
                path = path.replace("{file_id}", f"file-{file_id}" if path.startswith("/v1") else str(file_id))
            if template == "/admin/projects/{name}":
                path = "/admin/projects/alpha"
            answer = client.request(method.upper(), path, headers=bob, **bodies.get((method, template), {}))
            swept.add((method, template))
            assert MARKER not in answer.text, (method, path, answer.text)
            if template.startswith(("/admin", "/audit", "/storage", "/metrics")):
                assert answer.status_code == 403, (method, path, answer.status_code)
            elif "{" in template:  # names one of alpha's things
                assert answer.status_code == 404, (method, path, answer.status_code, answer.text)
            elif method == "get":
                assert answer.status_code == 200, (method, path, answer.text)
                items = answer.json().get("items", answer.json().get("data", []))
                assert all(str(item.get("id")) not in (str(job_id), f"ftjob-{job_id}") for item in items), path
            else:  # a submit naming alpha's file, bob's own uploads, an estimate
                assert answer.status_code in (200, 201, 400, 422), (method, path, answer.status_code)
    every = {(m, t) for t, ops in document["paths"].items() for m in ops}
    assert swept == every and len(every) > 30
    # Outside the document: the watch page and the event stream.
    for extra in (f"/jobs/{job_id}/watch", f"/jobs/{job_id}/stream"):
        answer = client.get(extra, headers=bob)
        assert answer.status_code == 404 and MARKER not in answer.text, extra
    # Nothing of alpha's changed.
    assert client.get(f"/jobs/{job_id}", headers=alice).json()["status"] == "queued"
    assert client.get(f"/files/{file_id}", headers=alice).status_code == 200
    assert client.get(f"/jobs/{job_id}/checkpoints/checkpoint-1/files/config.json", headers=alice).text == MARKER
    assert client.get("/jobs", headers=alice).status_code == 200
    # Admins see every project's.
    assert client.get(f"/jobs/{job_id}", headers=admin).json()["project"] == "alpha"
    assert {job["id"] for job in client.get("/jobs", headers=admin).json()["items"]} >= {job_id}


def test_the_hot_path_never_serves_another_projects_record(
    client: httpx.Client, env: Env, admin: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.hotpath import HotReads
    from core.config import get_settings

    monkeypatch.setenv("RECORD_MAX_AGE_S", "60")
    get_settings.cache_clear()
    alice = bearer(make_token(client, admin, "alice", project="alpha"))
    bob = bearer(make_token(client, admin, "bob", project="beta"))
    job_id = client.post("/jobs", json=HUB_SPEC, headers=alice).json()["id"]
    assert client.get(f"/jobs/{job_id}", headers=alice).status_code == 200
    before = HotReads.served
    assert client.get(f"/jobs/{job_id}", headers=alice).status_code == 200
    assert client.get("/jobs", headers=alice).status_code == 200
    assert client.get("/jobs", headers=alice).json()["items"][0]["id"] == job_id
    assert HotReads.served - before >= 2  # alice's repeats came from memory
    assert client.get(f"/jobs/{job_id}", headers=bob).status_code == 404
    assert client.get("/jobs", headers=bob).json()["items"] == []
    assert client.get("/jobs", headers=bob).json()["items"] == []  # and again, from memory


def test_a_viewer_reads_its_projects_jobs_and_changes_nothing(
    client: httpx.Client, env: Env, admin: dict[str, str]
) -> None:
    alice = bearer(make_token(client, admin, "alice", project="alpha"))
    viewer = bearer(make_token(client, admin, "val", project="alpha", role="viewer"))
    job_id = client.post("/jobs", json=HUB_SPEC, headers=alice).json()["id"]
    assert client.get(f"/jobs/{job_id}", headers=viewer).status_code == 200
    assert client.post("/jobs/estimate", json=HUB_SPEC, headers=viewer).status_code == 200
    for method, path in (("POST", f"/jobs/{job_id}/cancel"), ("POST", "/jobs"), ("DELETE", f"/jobs/{job_id}")):
        refused = client.request(method, path, headers=viewer, json=HUB_SPEC if path == "/jobs" else None)
        assert refused.status_code == 403, (method, path)
        assert (
            refused.json()["detail"]
            == f"val is a viewer of project alpha: it may read its jobs and files, not {method} {path}"
        )
    assert client.get("/admin/tokens", headers=alice).status_code == 403


# ---- quotas and priorities -----------------------------------------------------------------------


def test_quotas_refuse_naming_the_quota_and_the_usage(
    client: httpx.Client, env: Env, admin: dict[str, str], tiny_model: Path, chat_dataset: Path
) -> None:
    from core.db import session_scope
    from core.models import Checkpoint
    from tests.conftest import job_spec

    patched = client.patch("/admin/projects/alpha", json={"max_queued_jobs": 1, "max_gpus": 1}, headers=admin)
    assert patched.status_code == 200, patched.text
    alice = bearer(make_token(client, admin, "alice", project="alpha"))
    first = client.post("/jobs", json=HUB_SPEC, headers=alice)
    assert first.status_code == 201
    second = client.post("/jobs", json=HUB_SPEC, headers=alice)
    assert (second.status_code, second.json()) == (
        429,
        {
            "error": "TooManyRequests",
            "detail": "quota max_queued_jobs: project alpha has 1 jobs queued of the 1 it may have; submit again "
            "once one has started, or cancel or pause one",
        },
    )
    too_big = client.post("/jobs", json={**HUB_SPEC, "gpus": 2}, headers=alice)
    assert too_big.status_code == 422
    assert too_big.json()["errors"] == [
        {"field": "gpus", "message": "quota max_gpus: the job asks for 2 GPUs and project alpha may hold 1 at once"}
    ]
    # Pausing frees a place in the queue; resuming needs one again.
    assert client.post(f"/jobs/{first.json()['id']}/pause", headers=alice).status_code == 200
    assert client.post("/jobs", json=HUB_SPEC, headers=alice).status_code == 201
    assert client.post(f"/jobs/{first.json()['id']}/resume", headers=alice).status_code == 429
    usage = {p["name"]: p for p in client.get("/admin/projects", headers=admin).json()["items"]}["alpha"]
    assert usage["usage"] == {"gpus": 0, "queued_jobs": 1, "checkpoint_bytes": 0}

    # Checkpoints: planned alone over the budget (422), or over it beside what is kept (429).
    assert client.patch("/admin/projects/beta", json={"max_checkpoint_bytes": 1000}, headers=admin).status_code == 200
    bob = bearer(make_token(client, admin, "bob", project="beta"))
    spec = job_spec(tiny_model, chat_dataset)
    over = client.post("/jobs", json=spec, headers=bob)
    assert over.status_code == 422, over.text
    assert over.json()["errors"][0]["message"].startswith(
        "quota max_checkpoint_bytes: the job's checkpoints are planned"
    )
    assert client.patch("/admin/projects/beta", json={"max_checkpoint_bytes": 10**9}, headers=admin).status_code == 200
    job_id = client.post("/jobs", json=spec, headers=bob).json()["id"]
    with session_scope() as session:
        session.add(Checkpoint(job_id=job_id, name="final", step=6, size_bytes=10**9, status="ready"))
    kept = client.post("/jobs", json=spec, headers=bob)
    assert kept.status_code == 429
    assert kept.json()["detail"].startswith("quota max_checkpoint_bytes: project beta's checkpoints take 0.9 GiB")


def test_priority_is_bounded_by_role(client: httpx.Client, env: Env, admin: dict[str, str]) -> None:
    alice = bearer(make_token(client, admin, "alice", project="alpha"))
    high = client.post("/jobs", json={**HUB_SPEC, "priority": 11}, headers=alice)
    assert high.status_code == 422
    assert high.json()["errors"] == [
        {
            "field": "priority",
            "message": "11 is above what a member may ask for: at most 10 (MEMBER_MAX_PRIORITY for members; admins up "
            "to 100)",
        }
    ]
    assert client.post("/jobs", json={**HUB_SPEC, "priority": 10}, headers=alice).status_code == 201
    urgent = client.post("/jobs", json={**HUB_SPEC, "priority": 90}, headers=admin)
    assert urgent.status_code == 201 and urgent.json()["spec"]["priority"] == 90
    assert "priority" not in client.post("/jobs", json=HUB_SPEC, headers=admin).json()["spec"]  # stored as before


# ---- rates and the audit -------------------------------------------------------------------------


def test_a_token_over_its_rate_gets_429_with_retry_after_counted_across_api_processes(
    client: httpx.Client, env: Env, admin: dict[str, str]
) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.ratelimit import RateLimiter, get_limiter

    token = make_token(client, admin, "busy", project="alpha", rate_limit_per_minute=3)
    for _ in range(3):
        assert client.get("/jobs", headers=bearer(token)).status_code == 200
    refused = client.get("/jobs", headers=bearer(token))
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 20  # one request every 20 s
    assert refused.json()["detail"].startswith("busy is over its rate of 3 requests a minute; retry in ")
    assert env.redis().exists(f"{env.queue_name}:ratelimit:token-{token[3:11]}")
    # Another API process (its own limiter, the same Redis) counts the same requests.
    other = RateLimiter(get_limiter().redis_url, get_limiter().key_prefix)
    import app.ratelimit as ratelimit

    ratelimit._limiters[next(iter(ratelimit._limiters))] = other
    second = TestClient(create_app())
    assert second.get("/jobs", headers=bearer(token)).status_code == 429
    assert other.redis_calls == 1
    assert client.get("/jobs", headers=admin).status_code == 200  # other tokens are not held up


def test_every_state_changing_request_is_audited_and_only_admins_read_it(
    client: httpx.Client, env: Env, admin: dict[str, str]
) -> None:
    from app import audit
    from core.db import session_scope
    from core.models import AuditEntry, utcnow

    alice_token = make_token(client, admin, "alice", project="alpha")
    alice = bearer(alice_token)
    job_id = client.post("/jobs", json=HUB_SPEC, headers=alice).json()["id"]
    assert client.post(f"/jobs/{job_id}/cancel", headers=alice).status_code == 200
    assert client.post(f"/jobs/{job_id}/cancel", headers=alice).status_code == 409
    assert client.get(f"/jobs/{job_id}", headers=alice).status_code == 200  # reads are not audited
    assert client.get("/audit", headers=alice).status_code == 403
    page = client.get("/audit", params={"principal": "alice"}, headers=admin).json()
    entries = [(e["method"], e["path"], e["status_code"], e["target"]) for e in page["items"]]
    assert entries == [
        ("POST", f"/jobs/{job_id}/cancel", 409, None),
        ("POST", f"/jobs/{job_id}/cancel", 200, None),
        ("POST", "/jobs", 201, f"job {job_id}"),
    ]
    newest = page["items"][0]
    assert (newest["principal"], newest["role"], newest["project"], newest["token_prefix"]) == (
        "alice",
        "member",
        "alpha",
        alice_token[:11],
    )
    assert newest["client"].startswith("testclient:") and newest["at"].endswith("Z")
    made = client.get("/audit", params={"principal": "root"}, headers=admin).json()["items"]
    assert made[0]["path"] == "/admin/tokens" and made[0]["target"] == f"token {alice_token[:11]} of alice"
    # Kept AUDIT_RETENTION_DAYS (90 by default).
    with session_scope() as session:
        session.add(AuditEntry(at=utcnow() - timedelta(days=91), method="POST", path="/jobs", principal="old"))
    assert audit.sweep_expired() == 1
    with Session(__import__("core.db", fromlist=["get_engine"]).get_engine()) as session:
        assert session.exec(select(AuditEntry).where(AuditEntry.principal == "old")).first() is None
