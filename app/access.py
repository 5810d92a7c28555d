"""Who may make a request, before anything else reads it: an ASGI middleware ahead of the hot
reads and FastAPI, for the guarded routes (/jobs, /files, /v1, /storage, /metrics, /admin, /watch,
/audit, /me).

In this order, each from memory or one round trip:
1. the token (app/auth.py): 401 without a valid one where the server needs one, answered from the
   headers before a byte of a body is read (a body larger than what uvicorn read ahead is left
   unread, the connection closed);
2. the role: 403 for a viewer's change (anything but GET and HEAD, and POST /jobs/estimate, which
   changes nothing) and for a non-admin's admin route (/admin, /audit, /storage, /metrics);
3. the token's request rate (app/ratelimit.py): 429 with Retry-After;
4. the audit: a request that may change state (any method but GET, HEAD, OPTIONS) is recorded
   with who made it, from where, and its status, written before its answer goes out.

The identity goes into the request's scope for the routes (app.auth.identity_of)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from sqlalchemy.exc import OperationalError
from starlette.requests import Request

from app.auth import IDENTITY_SCOPE_KEY, Identity, get_registry
from app.db import run_db
from app.errors import AppError, Forbidden, TooManyRequests, Unauthorized, database_unavailable, respond
from app.ratelimit import get_limiter, retry_after_header
from core.config import get_settings
from core.db import session_scope
from core.models import AuditEntry, Role

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Routes that need a token when the server has any (API_TOKENS, or one made by an admin).
GUARDED_PREFIXES = ("/jobs", "/files", "/storage", "/metrics", "/v1", "/admin", "/audit", "/me", "/watch")
ADMIN_PREFIXES = ("/admin", "/audit", "/storage", "/metrics")
READS = frozenset({"GET", "HEAD", "OPTIONS"})
# Requests that read although they are POSTs: a viewer may make them, and they are not audited.
READS_BY_POST = frozenset({"/jobs/estimate"})
# What uvicorn reads of a body before the app asks for it (its flow control's HIGH_WATER_LIMIT):
# a refused body up to this size is off the socket already, and the connection can be kept.
READ_AHEAD_BYTES = 64 * 1024
# Set by a route to name what it made, when the path does not: "job 12", "file 3".
AUDIT_TARGET_SCOPE_KEY = "finetune.audit_target"


def guarded(path: str) -> bool:
    return path.startswith(GUARDED_PREFIXES)


def changes_state(method: str, path: str) -> bool:
    return method not in READS and path.rstrip("/") not in READS_BY_POST


def role_refusal(identity: Identity, method: str, path: str) -> Forbidden | None:
    if path.startswith(ADMIN_PREFIXES) and not identity.is_admin:
        return Forbidden(f"{path} is for admins; {identity.name} is a {identity.role} of project {identity.project}")
    if identity.role == Role.viewer and changes_state(method, path):
        return Forbidden(
            f"{identity.name} is a viewer of project {identity.project}: it may read its jobs and files, "
            f"not {method} {path}"
        )
    return None


def set_audit_target(request: Request, target: str) -> None:
    request.scope[AUDIT_TARGET_SCOPE_KEY] = target


def record(entry: AuditEntry) -> None:
    """Write one audit entry (blocking)."""
    with session_scope() as session:
        session.add(entry)


def _client(scope: Scope) -> str | None:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else None


def _body_unread(scope: Scope) -> bool:
    """Whether refusing this request leaves part of its body on the socket (then: close it)."""
    for key, value in scope["headers"]:
        if key == b"transfer-encoding":
            return True
        if key == b"content-length" and value.isdigit() and int(value) > READ_AHEAD_BYTES:
            return True
    return False


class Access:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not guarded(scope["path"]):
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        audited = changes_state(method, path)
        try:
            identity = await get_registry().authenticate(_authorization(scope))
        except Unauthorized as exc:
            if audited:
                logger.info("refused %s %s from %s: %s", method, path, _client(scope), exc.detail)
            await refuse(scope, receive, send, exc, close=_body_unread(scope))
            return
        except OperationalError as exc:  # the tokens could not be read
            await database_unavailable(Request(scope), exc)(scope, receive, send)
            return
        scope[IDENTITY_SCOPE_KEY] = identity
        started = time.monotonic()
        refusal: AppError | None = role_refusal(identity, method, path)
        if refusal is None and identity.rate_key is not None:
            per_minute = identity.rate_limit_per_minute or get_settings().rate_limit_per_minute
            if per_minute:
                wait_s = await get_limiter().admit(identity.rate_key, per_minute)
                if wait_s is not None:
                    # Not audited: a client over its rate would fill the audit with its refusals.
                    over = TooManyRequests(
                        f"{identity.name} is over its rate of {per_minute} requests a minute; retry in {wait_s:.1f} s",
                        headers={"Retry-After": retry_after_header(wait_s)},
                    )
                    await refuse(scope, receive, send, over, close=_body_unread(scope))
                    return
        if not audited:
            if refusal is not None:
                await refuse(scope, receive, send, refusal, close=False)
                return
            await self.app(scope, receive, send)
            return
        entry = AuditEntry(
            principal=identity.name,
            role=str(identity.role),
            project=identity.project,
            token_prefix=identity.token_prefix,
            method=method,
            path=path,
            client=_client(scope),
        )
        written = False

        async def write(status_code: int | None) -> None:
            nonlocal written
            if written:
                return
            written = True
            entry.status_code = status_code
            entry.target = scope.get(AUDIT_TARGET_SCOPE_KEY)
            entry.duration_ms = round((time.monotonic() - started) * 1000, 3)
            try:
                await run_db(record, entry)
            except Exception as exc:  # the request has happened: say so in the log at least
                logger.error("audit entry not written (%s): %s %s by %s", exc, method, path, identity.name)

        async def audited_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                await write(int(message["status"]))
            await send(message)

        try:
            if refusal is not None:
                await refuse(scope, receive, audited_send, refusal, close=_body_unread(scope))
            else:
                await self.app(scope, receive, audited_send)
        except Exception:
            await write(500)  # what the server's error handler answers next
            raise
        finally:
            await write(None)  # no answer was sent: the client went away, or the app failed


def _authorization(scope: Scope) -> str | None:
    for key, value in scope["headers"]:
        if key == b"authorization":
            return str(value.decode("latin-1"))
    return None


async def refuse(scope: Scope, receive: Receive, send: Send, exc: AppError, *, close: bool) -> None:
    headers = dict(exc.headers or {})
    if close:
        headers["Connection"] = "close"
    response = respond(Request(scope), exc.status_code, exc.body(), headers, param=exc.param, code=exc.code)
    await response(scope, receive, send)
