"""Request dependencies shared by the routers.

The guard every /jobs and /files route runs is one plain function of the request: FastAPI's
dependency machinery costs tens of microseconds per declared parameter, which is most of what a
poller's request costs once its record comes from memory. The bearer scheme is declared in the
OpenAPI document by app.main, so /docs still offers Authorize."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError

from app.errors import Unauthorized
from core.config import Settings, get_settings


async def current_settings() -> Settings:
    # async: FastAPI runs a plain function dependency in the thread pool, a hop per request.
    return get_settings()


SettingsDep = Annotated[Settings, Depends(current_settings)]
# Routes that need a token when API_TOKENS is set (require_token guards them; app.guard refuses a
# body sent to them without one before it is read).
GUARDED_PREFIXES = ("/jobs", "/files", "/storage", "/metrics", "/v1")


def check_token(authorization: str | None, settings: Settings) -> None:
    """Bearer-token check, active only when the operator configured API_TOKENS."""
    if not settings.api_tokens:
        return
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("this server needs 'Authorization: Bearer <token>' (one of API_TOKENS)")
    # As bytes: compare_digest refuses str with non-ASCII characters, which a header may carry.
    given = token.encode()
    if not any(secrets.compare_digest(given, t.get_secret_value().encode()) for t in settings.api_tokens):
        raise Unauthorized("the bearer token is not one of this server's API_TOKENS")


async def require_token(request: Request) -> None:
    """The guard of the /jobs and /files routes: a bearer token (when API_TOKENS is set), and no
    query parameter the route does not take."""
    check_token(request.headers.get("authorization"), get_settings())
    reject_unknown_query(request)


_query_names_of: dict[int, frozenset[str]] = {}


def _query_names(dependant: Any) -> frozenset[str]:
    names = {field.alias for field in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return frozenset(names)


def reject_unknown_query(request: Request) -> None:
    """A query parameter the route does not take is a 422 naming it, not silently ignored: a typo
    such as `?limt=10` would otherwise return something other than what was asked for."""
    if not request.query_params:
        return
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    known = _query_names_of.get(id(route))
    if known is None:
        known = _query_names_of[id(route)] = _query_names(dependant)
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        takes = ", ".join(sorted(known)) or "none"
        raise RequestValidationError(
            [
                {
                    "type": "unknown_query_parameter",
                    "loc": ("query", name),
                    "input": request.query_params[name],
                    "msg": f"unknown query parameter (this route takes: {takes})",
                }
                for name in unknown
            ]
        )


async def query_guard(request: Request) -> None:
    """For the routes without a token (/healthz): the unknown-query check alone."""
    reject_unknown_query(request)
