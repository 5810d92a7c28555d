"""Webhooks: a local receiver that checks every signature (Standard Webhooks), refuses the first
attempt and counts deliveries; the sender retries with backoff and records each outcome."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import HUB_SPEC, Env, clear_caches, job_spec, run_to_end

SECRET = "whsec_" + base64.b64encode(b"a secret of the operator").decode()


class Receiver:
    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.raw: list[tuple[dict[str, str], bytes]] = []  # headers and body of each accepted delivery
        self.refused = 0
        self.bad_signatures = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                message_id, timestamp = self.headers["webhook-id"], self.headers["webhook-timestamp"]
                key = base64.b64decode(SECRET.removeprefix("whsec_"))
                expected = base64.b64encode(
                    hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
                ).decode()
                if self.headers["webhook-signature"] != f"v1,{expected}":
                    receiver.bad_signatures += 1
                    self.send_response(401)
                elif receiver.refused == 0:  # the first attempt fails: the sender must retry
                    receiver.refused += 1
                    self.send_response(503)
                else:
                    receiver.received.append(json.loads(body))
                    receiver.raw.append((dict(self.headers), body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver(env: Env, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    monkeypatch.setenv("WEBHOOK_ALLOWED_HOSTS", "127.0.0.1")
    monkeypatch.setenv("WEBHOOK_SECRET", SECRET)
    clear_caches()
    made = Receiver()
    yield made
    made.server.shutdown()
    made.server.server_close()


def send_until_done(client: httpx.Client, job_id: int, timeout_s: float = 30) -> list[dict[str, Any]]:
    """What the API's sender loop does, run here (the test client starts no lifespan)."""
    from core.models import WebhookDelivery
    from core.webhooks import deliver_due

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        deliver_due()
        deliveries = client.get(f"/jobs/{job_id}/webhooks").json()["items"]
        if all(d["status"] in ("delivered", "failed") for d in deliveries):
            return list(deliveries)
        # The backoff after the refused attempt is 2 s: let it come due sooner.
        from sqlalchemy import update

        from core.db import session_scope
        from core.models import utcnow

        with session_scope() as session:
            session.execute(
                update(WebhookDelivery).where(WebhookDelivery.status == "pending").values(next_attempt_at=utcnow())
            )
        time.sleep(0.1)
    raise AssertionError("webhook deliveries did not finish")


@pytest.mark.slow
def test_status_checkpoint_and_progress_webhooks_are_signed_retried_and_recorded(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path, receiver: Receiver
) -> None:
    spec = {
        **job_spec(tiny_model, chat_dataset, max_steps=6, logging_steps=1, save_steps=3),
        "webhooks": [{"url": receiver.url, "events": ["status", "checkpoint", "progress"], "every_steps": 2}],
    }
    record = run_to_end(client, spec)
    assert record["status"] == "succeeded", record["error"]
    deliveries = send_until_done(client, record["id"])

    assert receiver.bad_signatures == 0 and receiver.refused == 1
    assert all(d["status"] == "delivered" for d in deliveries)
    assert deliveries[0]["attempts"] == 2 and deliveries[0]["last_status_code"] == 204
    # A retried delivery arrives after later ones: receivers order by id (or timestamp), as here.
    received = sorted(receiver.received, key=lambda body: int(body["id"].removeprefix("msg_")))
    kinds = [body["data"]["type"] for body in received]
    assert kinds.count("progress") == 3  # steps 2, 4 and 6
    assert [k for k in kinds if k in ("queued", "started", "succeeded")] == ["queued", "started", "succeeded"]
    assert kinds.count("checkpoint") == 3  # checkpoint-3, checkpoint-6 and final
    progress = [body["data"] for body in received if body["data"]["type"] == "progress"]
    assert [p["step"] for p in progress] == [2, 4, 6] and progress[-1]["total_steps"] == 6


def test_openai_event_names_send_openai_event_objects_that_the_openai_sdk_unwraps(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path, receiver: Receiver
) -> None:
    import openai
    from openai.types.webhooks import FineTuningJobCancelledWebhookEvent

    events = ["fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"]
    spec = {**job_spec(tiny_model, chat_dataset), "webhooks": [{"url": receiver.url, "events": events}]}
    job_id = client.post("/jobs", json=spec).json()["id"]
    assert client.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    deliveries = send_until_done(client, job_id)
    assert [(d["event"], d["status"]) for d in deliveries] == [("fine_tuning.job.cancelled", "delivered")]
    headers, body = receiver.raw[0]
    # A receiver written for OpenAI's fine-tuning webhooks checks and reads it with the SDK.
    with openai.OpenAI(api_key="unused", webhook_secret=SECRET) as sdk:
        event = sdk.webhooks.unwrap(body, headers)
        assert isinstance(event, FineTuningJobCancelledWebhookEvent)
        assert (event.type, event.data.id, event.id) == (
            "fine_tuning.job.cancelled",
            f"ftjob-{job_id}",
            headers["webhook-id"],
        )
        with pytest.raises(openai.InvalidWebhookSignatureError):
            sdk.webhooks.unwrap(body.replace(b"cancelled", b"succeeded"), headers)


def test_a_webhook_to_a_host_the_operator_did_not_allow_is_refused_at_submit(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path, receiver: Receiver
) -> None:
    spec = {**job_spec(tiny_model, chat_dataset), "webhooks": [{"url": "http://169.254.169.254/latest"}]}
    response = client.post("/jobs", json=spec)
    assert response.status_code == 422
    assert response.json()["errors"] == [
        {
            "field": "webhooks.0.url",
            "message": "this server does not send webhooks to 'http://169.254.169.254/latest': its host is not "
            "in the operator's WEBHOOK_ALLOWED_HOSTS",
        }
    ]


def test_a_webhook_url_that_does_not_parse_is_a_422_not_a_500(
    client: httpx.Client, env: Env, receiver: Receiver
) -> None:
    spec = {**HUB_SPEC, "webhooks": [{"url": "http://[::1/hook"}]}
    response = client.post("/jobs", json=spec)
    assert response.status_code == 422 and response.json()["errors"][0]["field"] == "webhooks.0.url"


def test_a_live_claim_is_not_taken_by_another_sender_and_an_expired_one_is(
    client: httpx.Client, env: Env, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two senders (two API processes) at once: the one sending holds its claim; only a claim
    older than WEBHOOK_CLAIM_LEASE_S is taken back, and then the first sender's late outcome does
    not overwrite the second's."""
    from sqlalchemy import update

    from core.db import session_scope
    from core.models import Job, JobStatus, WebhookDelivery, utcnow
    from core.webhooks import _claim, _record, deliver_due

    with session_scope() as session:
        job = Job(spec={"model": "org/m", "dataset": {"source": "org/d"}}, status=JobStatus.running)
        session.add(job)
        session.flush()
        assert job.id is not None
        job_id = job.id
        session.add(WebhookDelivery(job_id=job_id, url=receiver.url, event="progress", payload={"step": 1}))
    delivery_id = client.get(f"/jobs/{job_id}/webhooks").json()["items"][0]["id"]

    first = _claim(delivery_id, "host-a:1")
    assert first is not None and first.status == "sending" and first.attempts == 1
    assert _claim(delivery_id, "host-b:2") is None and deliver_due() == 0  # the claim is live

    with session_scope() as session:  # host-a stalls past its lease
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id)  # type: ignore[arg-type]
            .values(claimed_at=utcnow() - timedelta(seconds=120))
        )
    receiver.refused = 1  # the receiver accepts at once
    assert deliver_due() == 1
    first.status, first.last_error = "pending", "host-a's answer, far too late"
    _record(first)  # its claim was taken back: nothing is written

    [delivery] = client.get(f"/jobs/{job_id}/webhooks").json()["items"]
    assert (delivery["status"], delivery["attempts"], delivery["last_error"]) == ("delivered", 2, None)
    assert delivery["claimed_by"] not in ("host-a:1", "host-b:2")
    assert [body["data"] for body in receiver.received] == [{"step": 1}]
