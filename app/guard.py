"""What a request may cost the API before a route reads its body: an ASGI middleware ahead of
FastAPI's routing, for requests that carry a body.

- A request to a guarded route without a valid token never gets here: app/access.py answers it
  401 from its headers alone, its body never read. (FastAPI reads and parses a JSON body before a
  route's dependencies run, so app.deps.require_token alone would come after the body.)
- A body larger than its limit is answered 413 naming the limit: MAX_JSON_BODY_BYTES for JSON
  bodies, MAX_UPLOAD_BYTES for uploads (POST /files, POST /v1/files). A declared Content-Length
  is judged before a byte is read; a body without one (chunked) is counted as it arrives by
  Starlette's RequestBodyLimitMiddleware, whose 413 app.errors renders with the same words.

A refused body is left unread: a 413 says `Connection: close`, so the server reads no more of it.
Requests without a body (polls, downloads) pass untouched."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import BODY_TOO_LARGE_SCOPE_KEY, PayloadTooLarge, respond
from app.uploads import MULTIPART_OVERHEAD, too_large
from core.config import Settings, get_settings

# Upload routes: their multipart bodies stream to disk (app/uploads.py). Every other body is JSON.
UPLOAD_ROUTES = frozenset({("POST", "/files"), ("POST", "/v1/files")})


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
        limit = body_limit(scope["method"], scope["path"], settings)
        if declared is not None and declared > limit.bytes:
            await self.refuse(scope, receive, send, PayloadTooLarge(limit.declared(declared)), close=True)
            return
        scope[BODY_TOO_LARGE_SCOPE_KEY] = limit.refusal  # app.errors answers Starlette's 413 with it
        await RequestBodyLimitMiddleware(self.app, limit.bytes)(scope, receive, send)

    @staticmethod
    async def refuse(scope: Scope, receive: Receive, send: Send, exc: PayloadTooLarge, *, close: bool) -> None:
        headers = dict(exc.headers or {})
        if close:
            headers["Connection"] = "close"
        response = respond(Request(scope), exc.status_code, exc.body(), headers, param=exc.param, code=exc.code)
        await response(scope, receive, send)


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
