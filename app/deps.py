"""Request dependencies shared by the routers."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header

from app.config import Settings, get_settings
from app.errors import Unauthorized

SettingsDep = Annotated[Settings, Depends(get_settings)]


def require_token(settings: SettingsDep, authorization: Annotated[str | None, Header()] = None) -> None:
    """Bearer-token check, active only when the operator configured API_TOKENS."""
    if not settings.api_tokens:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("this server needs 'Authorization: Bearer <token>' (one of API_TOKENS)")
    if not any(secrets.compare_digest(token, t.get_secret_value()) for t in settings.api_tokens):
        raise Unauthorized("the bearer token is not one of this server's API_TOKENS")
