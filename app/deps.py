"""Request dependencies shared by the routers."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.config import Settings, get_settings
from app.errors import Unauthorized


async def current_settings() -> Settings:
    # async: FastAPI runs a plain function dependency in the thread pool, a hop per request.
    return get_settings()


SettingsDep = Annotated[Settings, Depends(current_settings)]

# Declares the bearer scheme in the OpenAPI document, so /docs offers "Authorize" and sends the
# token with every call it makes. auto_error=False: whether a token is needed is decided below.
bearer = HTTPBearer(auto_error=False, scheme_name="bearer",
                    description="one of the server's API_TOKENS (needed only when the operator sets some)")


async def require_token(settings: SettingsDep,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)] = None) -> None:
    """Bearer-token check, active only when the operator configured API_TOKENS."""
    if not settings.api_tokens:
        return
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise Unauthorized("this server needs 'Authorization: Bearer <token>' (one of API_TOKENS)")
    token = credentials.credentials
    # As bytes: compare_digest refuses str with non-ASCII characters, which a header may carry.
    given = token.encode()
    if not any(secrets.compare_digest(given, t.get_secret_value().encode()) for t in settings.api_tokens):
        raise Unauthorized("the bearer token is not one of this server's API_TOKENS")


def _query_names(dependant: Any) -> set[str]:
    names = {field.alias for field in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


async def reject_unknown_query(request: Request) -> None:
    """A query parameter the route does not take is a 422 naming it, not silently ignored: a typo
    such as `?limt=10` would otherwise return something other than what was asked for."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    if dependant is None or not request.query_params:
        return
    known = _query_names(dependant)
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        takes = ", ".join(sorted(known)) or "none"
        raise RequestValidationError([
            {"type": "unknown_query_parameter", "loc": ("query", name), "input": request.query_params[name],
             "msg": f"unknown query parameter (this route takes: {takes})"} for name in unknown])
