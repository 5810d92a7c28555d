"""Idempotent creates: a POST /jobs, /files, /v1/files or /v1/fine_tuning/jobs that carries an
`Idempotency-Key` header makes its job or file once. The same key and the same body, sent again
(a client retrying after a connection broke, whether or not the first request got through), answer
with what the first one made, with `Idempotent-Replayed: true`; the same key with another body is a
409 naming the key. Keys belong to the principal that sent them (two users' keys never meet) and
are kept IDEMPOTENCY_KEYS_KEPT_S (a day by default).

The key's row is written in the same transaction as the job or file it made, and the pair
(principal, key) is unique: of two requests racing with one key, one commits and the other finds
the winner's row once its own commit fails (Raced), so a key never makes two jobs."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import Header
from sqlmodel import Session, col, delete, select

from app.auth import Identity
from app.errors import Conflict
from core.config import get_settings
from core.models import IdempotencyKey, utcnow

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255

KeyHeader = Annotated[
    str | None,
    Header(
        alias=HEADER,
        min_length=1,
        max_length=MAX_KEY_LENGTH,
        pattern=r"^[\x21-\x7e]+$",
        description="any string of up to 255 visible ASCII characters, fresh for each new request (a UUID): "
        "the same key and body sent again within a day answer with what the first request made, "
        "never a second one; the same key with another body is a 409",
    ),
]


class Raced(Exception):
    """Another request with the same key committed first: read its row (find) and answer with it."""


@dataclass(frozen=True, slots=True)
class Claim:
    """A create request's key, whose it is, what it asks for (the route and a digest of its body)."""

    principal: str
    key: str
    route: str  # "POST /jobs", "POST /v1/files", ...
    resource: str  # what the route makes: "job" or "file"
    request_sha256: str

    @classmethod
    def of(cls, key: str | None, identity: Identity, route: str, resource: str, body: bytes | str) -> Claim | None:
        if key is None:
            return None
        data = body.encode() if isinstance(body, str) else body
        return cls(identity.name, key, route, resource, hashlib.sha256(data).hexdigest())


def _cutoff() -> datetime:
    return utcnow() - timedelta(seconds=get_settings().idempotency_keys_kept_s)


def find(session: Session, claim: Claim) -> int | None:
    """The id of the job or file the key made, or None when the key is new (or expired); a 409
    when it was used for another request."""
    row = session.exec(
        select(IdempotencyKey).where(
            IdempotencyKey.principal == claim.principal,
            IdempotencyKey.key == claim.key,
            col(IdempotencyKey.created_at) >= _cutoff(),
        )
    ).first()
    if row is None:
        return None
    if row.route != claim.route or row.request_sha256 != claim.request_sha256:
        what = "another body" if row.route == claim.route else f"{row.route}"
        raise Conflict(
            f"{HEADER} {claim.key!r} was used at {row.created_at.isoformat(timespec='seconds')} for {what}: "
            "a key stands for one request; send a new key for a new request"
        )
    return row.resource_id


def replayed(session: Session, claim: Claim) -> int:
    """After Raced: what the request that won the key made."""
    made = find(session, claim)
    if made is None:  # the unique failure was not the key's: nothing to answer with
        raise Conflict(f"{HEADER} {claim.key!r}: the request could not be stored; send it again")
    return made


def record(session: Session, claim: Claim, resource_id: int) -> None:
    """Keep the key with the id it made, in the caller's transaction (which commits it); keys past
    their day go, this one's old use included."""
    session.exec(delete(IdempotencyKey).where(col(IdempotencyKey.created_at) < _cutoff()))
    session.add(
        IdempotencyKey(
            principal=claim.principal,
            key=claim.key,
            route=claim.route,
            resource=claim.resource,
            request_sha256=claim.request_sha256,
            resource_id=resource_id,
        )
    )


def forget_resource(session: Session, resource: str, resource_id: int) -> None:
    """Drop the keys that made a resource being deleted (in the caller's transaction): a retry of
    its creation then makes it again instead of answering with what is gone."""
    session.exec(
        delete(IdempotencyKey).where(
            col(IdempotencyKey.resource) == resource, col(IdempotencyKey.resource_id) == resource_id
        )
    )
