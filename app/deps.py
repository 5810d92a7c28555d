"""Request dependencies shared by the routers.

The guard every /jobs and /files route runs is one plain function of the request: FastAPI's
dependency machinery costs tens of microseconds per declared parameter, which is most of what a
poller's request costs once its record comes from memory. The token itself is checked before
(app/access.py), which leaves the identity in the request's scope. The bearer scheme is declared
in the OpenAPI document by app.main, so /docs still offers Authorize."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError

from app.auth import Identity, identity_of
from core.config import Settings, get_settings


async def current_settings() -> Settings:
    # async: FastAPI runs a plain function dependency in the thread pool, a hop per request.
    return get_settings()


SettingsDep = Annotated[Settings, Depends(current_settings)]


async def require_token(request: Request) -> None:
    """The guard of the /jobs and /files routes: an identity (app/access.py found it, or refused
    the request), and no query parameter the route does not take."""
    identity_of(request.scope)
    reject_unknown_query(request)


async def current_identity(request: Request) -> Identity:
    return identity_of(request.scope)


# Who is asking (app/auth.py): routes pass it to the service functions, which show each identity
# only its own project's jobs and files (an admin's: all).
IdentityDep = Annotated[Identity, Depends(current_identity)]


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
    # name[key] is a pair of `name` (GET /v1/fine_tuning/jobs?metadata[team]=nlp: the openai SDK's dict).
    unknown = sorted(
        name for name in set(request.query_params) - known if name.split("[", 1)[0] not in known or "[" not in name
    )
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
