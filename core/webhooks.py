"""Webhooks: a job's events POSTed to the URLs its spec names, signed as Standard Webhooks do.

Deliveries are rows (core.models.WebhookDelivery), queued in the same transaction as the event
they carry, by whichever process records it; the API's sender (deliver_due, run by a loop in
every API process) POSTs them, retries failures with backoff, and records each outcome. A
trainer only ever writes a row: a slow or dead receiver never holds up training.

Delivery is at least once. A sender claims one delivery at a time, just before it POSTs it
(`sending`, with the claim's time and the sender's host and pid), and records the outcome right
after; a claim older than WEBHOOK_CLAIM_LEASE_S that is still `sending` was left by a sender that
died mid-send, and any sender takes it back and sends it again. A receiver may therefore get a
message twice and drops repeats by its `webhook-id`, as Standard Webhooks asks.

Signature (https://www.standardwebhooks.com): headers `webhook-id`, `webhook-timestamp` (Unix
seconds) and `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, keyed
with WEBHOOK_SECRET (`whsec_` then base64, or any other string used as it is)."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import logging
import os
import socket
import ssl
import time
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import ColumnElement, and_, or_, update
from sqlmodel import Session, col, select

from core.config import get_settings
from core.contract import EventKind
from core.models import Job, WebhookDelivery, utcnow

logger = logging.getLogger(__name__)

# Which event kinds each webhook event name covers ("progress" is queued by the trainer).
CATEGORIES: dict[str, frozenset[str]] = {
    "status": frozenset(
        {
            EventKind.queued,
            EventKind.started,
            EventKind.paused,
            EventKind.requeued,
            EventKind.retried,
            EventKind.succeeded,
            EventKind.failed,
            EventKind.cancelled,
        }
    ),
    "checkpoint": frozenset({EventKind.checkpoint, EventKind.checkpoint_corrupt}),
    "eval": frozenset({EventKind.evaluated}),
    # OpenAI's fine-tuning webhook events: the body is OpenAI's event object (openai_body).
    "fine_tuning.job.succeeded": frozenset({EventKind.succeeded}),
    "fine_tuning.job.failed": frozenset({EventKind.failed}),
    "fine_tuning.job.cancelled": frozenset({EventKind.cancelled}),
}
OPENAI_EVENT_PREFIX = "fine_tuning.job."
MAX_ATTEMPTS = 8
BACKOFF_MAX_S = 3600.0
TIMEOUT_S = 5.0


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The delivering process's one TLS context (httpx's default: its CA bundle, verified): a
    client builds one otherwise, 60 ms of CPU each time deliveries are due."""
    return httpx.create_ssl_context()


# Deliveries looked up per pass; each is claimed only when its turn comes.
CLAIM_BATCH = 20


def host_allowed(url: str) -> bool:
    try:
        host = (urlsplit(url).hostname or "").lower()
    except ValueError:  # not a URL (an unclosed IPv6 bracket, say): allowed nowhere
        return False
    return bool(host) and host in {h.lower() for h in get_settings().webhook_allowed_hosts}


def _targets(job: Job, event: str) -> list[dict[str, Any]]:
    hooks = (job.spec or {}).get("webhooks") or []
    return [hook for hook in hooks if event in hook.get("events", ())]


def queue_event(*, session: Session, job_id: int, kind: str, message: str) -> None:
    """Rows for the job's webhooks that want this kind of event (in the caller's transaction)."""
    wanted = [name for name, kinds in CATEGORIES.items() if kind in kinds]
    if not wanted:
        return
    job = session.get(Job, job_id)
    if job is None or not (job.spec or {}).get("webhooks"):
        return
    payload = {"type": kind, "job_id": job_id, "status": str(job.status), "message": message}
    for name in wanted:
        openai = name.startswith(OPENAI_EVENT_PREFIX)
        for hook in _targets(job, name):
            session.add(
                WebhookDelivery(
                    job_id=job_id,
                    url=hook["url"],
                    event=name if openai else kind,
                    payload={"job_id": job_id} if openai else payload,
                )
            )


def queue_progress(*, session: Session, job: Job, step: int, metrics: dict[str, Any]) -> None:
    """Progress rows for the webhooks whose `every_steps` this step reaches (the trainer calls it
    at each logged step)."""
    for hook in _targets(job, "progress"):
        if step % int(hook.get("every_steps", 100)) == 0:
            payload = {
                "type": "progress",
                "job_id": job.id,
                "step": step,
                "total_steps": job.total_steps,
                "loss": metrics.get("loss"),
                "tokens_per_second": metrics.get("tokens_per_second"),
            }
            session.add(WebhookDelivery(job_id=job.id or 0, url=hook["url"], event="progress", payload=payload))


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_") else secret.encode()


def sign(secret: str, delivery_id: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(_key(secret), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def sender_name() -> str:
    """Who claims a delivery: this host and process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _claimable(now: datetime) -> ColumnElement[bool]:
    """Due pending deliveries, and those a sender claimed longer than the lease ago and never
    finished (it died mid-send)."""
    stale = now - timedelta(seconds=get_settings().webhook_claim_lease_s)
    return or_(
        and_(col(WebhookDelivery.status) == "pending", col(WebhookDelivery.next_attempt_at) <= now),
        and_(col(WebhookDelivery.status) == "sending", col(WebhookDelivery.claimed_at) < stale),
    )


def _claim(delivery_id: int, sender: str) -> WebhookDelivery | None:
    """Claim one delivery for this sender, just before sending it (a conditional update: only
    one of several senders wins); None when another sender has it."""
    from core.db import session_scope

    with session_scope() as session:
        now = utcnow()
        before = session.get(WebhookDelivery, delivery_id)
        if before is None:
            return None
        was = (before.status, before.claimed_by, before.claimed_at)
        won = session.execute(
            update(WebhookDelivery)
            .where(col(WebhookDelivery.id) == delivery_id, _claimable(now))
            .values(status="sending", attempts=WebhookDelivery.attempts + 1, claimed_at=now, claimed_by=sender)
        )
        if won.rowcount != 1:  # type: ignore[attr-defined]
            return None
        if was[0] == "sending":
            logger.warning(
                "webhook %s: taking back the claim %s made at %s and never finished (it died mid-send?)",
                delivery_id,
                was[1],
                was[2],
            )
        session.commit()
        delivery = session.get(WebhookDelivery, delivery_id, populate_existing=True)
        if delivery is not None:
            session.expunge(delivery)
        return delivery


def _record(delivery: WebhookDelivery) -> None:
    """The send's outcome, written only while the claim is still this sender's: one that took
    longer than the lease has been taken back, and the sender that took it records its own."""
    from core.db import session_scope

    with session_scope() as session:
        session.execute(
            update(WebhookDelivery)
            .where(
                col(WebhookDelivery.id) == delivery.id,
                col(WebhookDelivery.status) == "sending",
                col(WebhookDelivery.claimed_by) == delivery.claimed_by,
                col(WebhookDelivery.claimed_at) == delivery.claimed_at,
            )
            .values(
                status=delivery.status,
                next_attempt_at=delivery.next_attempt_at,
                last_status_code=delivery.last_status_code,
                last_error=delivery.last_error,
            )
        )


def deliver_due(limit: int = CLAIM_BATCH) -> int:
    """Send what is due, claiming each delivery only as its turn comes and recording its outcome
    at once, so a sender that dies holds at most the one it was sending; returns how many were
    attempted. Blocking: the API runs it in a thread."""
    from core.db import session_scope

    settings = get_settings()
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else ""
    with session_scope() as session:
        due = session.exec(
            select(WebhookDelivery.id).where(_claimable(utcnow())).order_by(col(WebhookDelivery.id)).limit(limit)
        ).all()
    if not due:
        return 0
    sender, attempted = sender_name(), 0
    with httpx.Client(timeout=TIMEOUT_S, follow_redirects=False, verify=tls_context()) as http:
        for delivery_id in due:
            assert delivery_id is not None
            delivery = _claim(delivery_id, sender)
            if delivery is None:
                continue
            _send(http, delivery, secret)
            _record(delivery)
            attempted += 1
    return attempted


def openai_body(delivery: WebhookDelivery) -> dict[str, Any]:
    """OpenAI's webhook event object (what `openai.OpenAI().webhooks.unwrap` reads): the job as its
    /v1 id."""
    return {
        "id": f"msg_{delivery.id}",
        "object": "event",
        "created_at": int(delivery.created_at.timestamp()),
        "type": delivery.event,
        "data": {"id": f"ftjob-{delivery.payload.get('job_id')}"},
    }


def _send(http: httpx.Client, delivery: WebhookDelivery, secret: str) -> None:
    message = (
        openai_body(delivery)
        if delivery.event.startswith(OPENAI_EVENT_PREFIX)
        else {"id": f"msg_{delivery.id}", "timestamp": delivery.created_at.isoformat(), "data": delivery.payload}
    )
    body = json.dumps(message, separators=(",", ":")).encode()
    if not host_allowed(delivery.url) or not secret:
        delivery.status, delivery.last_error = "failed", "not sent: the host is not in WEBHOOK_ALLOWED_HOSTS"
        if not secret:
            delivery.last_error = "not sent: WEBHOOK_SECRET is not set"
        return
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "webhook-id": f"msg_{delivery.id}",
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, f"msg_{delivery.id}", timestamp, body),
    }
    try:
        response = http.post(delivery.url, content=body, headers=headers)
        delivery.last_status_code, delivery.last_error = response.status_code, None
        ok = 200 <= response.status_code < 300
    except httpx.HTTPError as exc:
        delivery.last_status_code, delivery.last_error, ok = None, f"{type(exc).__name__}: {exc}"[:500], False
    if ok:
        delivery.status = "delivered"
    elif delivery.attempts >= MAX_ATTEMPTS:
        delivery.status = "failed"
    else:
        delivery.status = "pending"
        delivery.next_attempt_at = utcnow() + timedelta(seconds=min(2.0**delivery.attempts, BACKOFF_MAX_S))
    logger.info("webhook %s to %s: %s", delivery.id, delivery.url, delivery.status)
