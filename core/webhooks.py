"""Webhooks: a job's events POSTed to the URLs its spec names, signed as Standard Webhooks do.

Deliveries are rows (core.models.WebhookDelivery), queued in the same transaction as the event
they carry, by whichever process records it; the API's sender (deliver_due, run by a loop in
every API process) POSTs them, retries failures with backoff, and records each outcome. A
trainer only ever writes a row: a slow or dead receiver never holds up training.

Signature (https://www.standardwebhooks.com): headers `webhook-id`, `webhook-timestamp` (Unix
seconds) and `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, keyed
with WEBHOOK_SECRET (`whsec_` then base64, or any other string used as it is)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import update
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
    "checkpoint": frozenset({EventKind.checkpoint}),
    "eval": frozenset({EventKind.evaluated}),
}
MAX_ATTEMPTS = 8
BACKOFF_MAX_S = 3600.0
TIMEOUT_S = 5.0


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
        for hook in _targets(job, name):
            session.add(WebhookDelivery(job_id=job_id, url=hook["url"], event=kind, payload=payload))


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


def _claim(session: Session, limit: int) -> list[WebhookDelivery]:
    """Due pending deliveries, each claimed by one sender (a conditional update: several API
    processes run senders)."""
    due = session.exec(
        select(WebhookDelivery)
        .where(WebhookDelivery.status == "pending", col(WebhookDelivery.next_attempt_at) <= utcnow())
        .order_by(col(WebhookDelivery.id))
        .limit(limit)
    ).all()
    claimed = []
    for delivery in due:
        won = session.execute(
            update(WebhookDelivery)
            .where(col(WebhookDelivery.id) == delivery.id, col(WebhookDelivery.status) == "pending")
            .values(status="sending", attempts=WebhookDelivery.attempts + 1)
        )
        if won.rowcount == 1:  # type: ignore[attr-defined]
            claimed.append(delivery)
    session.commit()
    for delivery in claimed:
        session.refresh(delivery)
    return claimed


def deliver_due(limit: int = 50) -> int:
    """Send what is due; returns how many were attempted. Blocking: the API runs it in a thread."""
    from core.db import session_scope

    settings = get_settings()
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else ""
    with session_scope() as session:
        claimed = _claim(session, limit)
        if not claimed:
            return 0
        with httpx.Client(timeout=TIMEOUT_S, follow_redirects=False) as http:
            for delivery in claimed:
                _send(http, delivery, secret)
                session.add(delivery)
    return len(claimed)


def _send(http: httpx.Client, delivery: WebhookDelivery, secret: str) -> None:
    body = json.dumps(
        {"id": f"msg_{delivery.id}", "timestamp": delivery.created_at.isoformat(), "data": delivery.payload},
        separators=(",", ":"),
    ).encode()
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
