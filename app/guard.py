"""What a request may cost the API before a route reads its body: an ASGI middleware ahead of
FastAPI's routing, for requests that carry a body.

- With API_TOKENS set, a request to a guarded route without a valid token is answered 401 from
  its headers alone, its body never read. (FastAPI reads and parses a JSON body before a route's
  dependencies run, so app.deps.require_token alone would come after the body.)
- A body larger than its limit is answered 413 naming the limit: MAX_JSON_BODY_BYTES for JSON
  bodies, MAX_UPLOAD_BYTES for uploads (POST /files, POST /v1/files). A declared Content-Length
  is judged before a byte is read; a body without one (chunked) is counted as it arrives by
  Starlette's RequestBodyLimitMiddleware, whose 413 app.errors renders with the same words.

A refused body is left unread: a 413, and a 401 whose body may be larger than what uvicorn has
already taken off the socket, say `Connection: close`, so the server reads no more of it.
Requests without a body (polls, downloads) pass untouched."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from app.deps import GUARDED_PREFIXES, check_token
from app.errors import BODY_TOO_LARGE_SCOPE_KEY, PayloadTooLarge, Unauthorized, respond
from app.uploads import MULTIPART_OVERHEAD, too_large
from core.config import Settings, get_settings

# Upload routes: their multipart bodies stream to disk (app/uploads.py). Every other body is JSON.
UPLOAD_ROUTES = frozenset({("POST", "/files"), ("POST", "/v1/files")})
# What uvicorn reads of a body before the app asks for it (its flow control's HIGH_WATER_LIMIT):
# a refused body up to this size is off the socket already, and the connection can be kept.
READ_AHEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class BodyLimit:
    bytes: int
    refusal: str  # the 413's words

    def declared(self, declared: int) -> str:
        return f"{self.refusal}; the request declares {declared:,} bytes"


def body_limit(method: str, path: str, settings: Settings) -> BodyLimit:
    if (method, path.rstrip("/") or "/") in UPLOAD_ROUTES:
        # Room for the multipart framing; the file part itself is held to MAX_UPLOAD_BYTES as it
        # streams in (app/uploads.py).
        return BodyLimit(settings.max_upload_bytes + MULTIPART_OVERHEAD, too_large(settings.max_upload_bytes))
    limit = settings.max_json_body_bytes
    return BodyLimit(
        limit,
        f"the request body is larger than this server's limit for JSON bodies, {limit:,} bytes (MAX_JSON_BODY_BYTES)",
    )


class RequestGuard:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared, chunked = _body_headers(scope)
        if not chunked and not declared:
            await self.app(scope, receive, send)
            return
        settings = get_settings()
        # Unread beyond what uvicorn took ahead: a refusal closes the connection rather than read it.
        unread = chunked or (declared or 0) > READ_AHEAD_BYTES
        if settings.api_tokens and scope["path"].startswith(GUARDED_PREFIXES):
            try:
                check_token(_header(scope, b"authorization"), settings)
            except Unauthorized as exc:
                await self.refuse(scope, receive, send, exc, close=unread)
                return
        limit = body_limit(scope["method"], scope["path"], settings)
        if declared is not None and declared > limit.bytes:
            await self.refuse(scope, receive, send, PayloadTooLarge(limit.declared(declared)), close=True)
            return
        scope[BODY_TOO_LARGE_SCOPE_KEY] = limit.refusal  # app.errors answers Starlette's 413 with it
        await RequestBodyLimitMiddleware(self.app, limit.bytes)(scope, receive, send)

    @staticmethod
    async def refuse(
        scope: Scope, receive: Receive, send: Send, exc: Unauthorized | PayloadTooLarge, *, close: bool
    ) -> None:
        headers = dict(exc.headers or {})
        if close:
            headers["Connection"] = "close"
        response = respond(Request(scope), exc.status_code, exc.body(), headers, param=exc.param, code=exc.code)
        await response(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _body_headers(scope: Scope) -> tuple[int | None, bool]:
    """(the declared Content-Length, or None; whether the body is chunked)."""
    declared: int | None = None
    chunked = False
    for key, value in scope["headers"]:
        if key == b"content-length" and value.isdigit():
            declared = int(value)
        elif key == b"transfer-encoding":
            chunked = True
    return declared, chunked
