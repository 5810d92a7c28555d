"""Who is asking: bearer tokens, the principals they speak for, and the projects they act in.

A token made by an admin (`finetune admin tokens create`, POST /admin/tokens) reads
`ft_<prefix>_<secret>`: the prefix (8 hex digits) is its public name, shown in lists and in the
audit; the secret is 32 random bytes. The database keeps the prefix and the SHA-256 of the whole
token, never the token. SHA-256 and not a password hash (scrypt, PBKDF2, argon2): a slow hash makes
guessing a low-entropy password expensive, but a token carries 256 random bits, which no guessing
reaches however fast the hash; a slow one would only cost every request milliseconds. GitHub and
PyPI keep their tokens this way.

The tokens of API_TOKENS keep working as they did, as admins of the default project. With neither
API_TOKENS nor any token ever made, the server is open as before (a one-person box): every request
acts as an admin. The first token made closes it.

Lookups are answered from memory (TokenRegistry): every token's digest and identity, read in one
query, read again when older than TOKEN_CACHE_S (a revocation or an expiry reaches every API
process within it; the process that revokes knows at once) and, for a token it does not know, at
most once per TOKEN_RELOAD_MIN_S (a token made through another API process works within it; a
flood of wrong tokens costs the database one read a second)."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from app.errors import Forbidden, Unauthorized
from core.config import Settings, get_settings
from core.db import get_engine
from core.models import DEFAULT_PROJECT_ID, DEFAULT_PROJECT_NAME, ApiToken, Principal, Project, Role

TOKEN_PREFIX = "ft_"
PREFIX_HEX_DIGITS = 8
SECRET_BYTES = 32
# A token the registry does not know makes it read the tokens again at most this often.
TOKEN_RELOAD_MIN_S = 1.0
# Where the middleware (app/access.py) leaves the identity for the routes.
IDENTITY_SCOPE_KEY = "finetune.identity"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a request speaks for."""

    name: str  # the principal's name; "API_TOKENS #1" for the first of API_TOKENS; "anonymous" on an open server
    role: Role
    project_id: int
    project: str
    kind: str = "user"
    token_prefix: str | None = None
    # The key its requests are counted under (None: not limited), and its own limit a minute
    # (None: RATE_LIMIT_PER_MINUTE).
    rate_key: str | None = None
    rate_limit_per_minute: int | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == Role.admin

    def sees(self, project_id: int) -> bool:
        """Whether this identity may see what belongs to that project: its own, or all for an admin."""
        return self.is_admin or project_id == self.project_id

    @property
    def scope(self) -> int | None:
        """The project a list is limited to; None: every project (an admin)."""
        return None if self.is_admin else self.project_id


ANONYMOUS = Identity(name="anonymous", role=Role.admin, project_id=DEFAULT_PROJECT_ID, project=DEFAULT_PROJECT_NAME)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> tuple[str, str]:
    """(prefix, token): a fresh token and its public prefix."""
    prefix = secrets.token_hex(PREFIX_HEX_DIGITS // 2)
    return prefix, f"{TOKEN_PREFIX}{prefix}_{secrets.token_urlsafe(SECRET_BYTES)}"


def shown_prefix(prefix: str) -> str:
    """How a token is named where its secret must not appear: ft_<prefix>."""
    return f"{TOKEN_PREFIX}{prefix}"


@dataclass(frozen=True, slots=True)
class _Known:
    identity: Identity
    expires_at: float | None  # Unix time
    revoked: bool


@dataclass
class _Snapshot:
    known: dict[str, _Known] = field(default_factory=dict)
    # Whether any token was ever made (revoked ones included): the server is then closed, whatever
    # happens to them later (revoking the last token must not open it to everyone).
    any_made: bool = False
    read_at: float = float("-inf")


def _api_tokens(settings: Settings) -> dict[str, _Known]:
    known = {}
    for number, secret in enumerate(settings.api_tokens, start=1):
        name = f"API_TOKENS #{number}"
        identity = Identity(
            name=name,
            role=Role.admin,
            project_id=DEFAULT_PROJECT_ID,
            project=DEFAULT_PROJECT_NAME,
            rate_key=f"api-tokens-{number}",
        )
        known[digest(secret.get_secret_value())] = _Known(identity, None, False)
    return known


def read_tokens() -> _Snapshot:
    """Every token ever made, with its principal and project (blocking: run it in a thread)."""
    started = time.monotonic()
    query = (
        select(ApiToken, Principal, Project.name)
        .join(Principal, col(ApiToken.principal_id) == col(Principal.id))
        .join(Project, col(Principal.project_id) == col(Project.id))
    )
    known = {}
    with Session(get_engine()) as session:
        for token, principal, project_name in session.exec(query).all():
            identity = Identity(
                name=principal.name,
                role=Role(principal.role),
                project_id=principal.project_id,
                project=project_name,
                kind=principal.kind,
                token_prefix=shown_prefix(token.prefix),
                rate_key=f"token-{token.prefix}",
                rate_limit_per_minute=token.rate_limit_per_minute,
            )
            expires = token.expires_at.timestamp() if token.expires_at is not None else None
            known[token.sha256] = _Known(identity, expires, token.revoked_at is not None)
    return _Snapshot(known, bool(known), started)


class TokenRegistry:
    """This process's copy of the tokens (one per database and API_TOKENS)."""

    def __init__(self, settings: Settings) -> None:
        self.cache_s = settings.token_cache_s
        self.api_tokens = _api_tokens(settings)
        self.snapshot = _Snapshot()
        self._reading: asyncio.Task[None] | None = None
        self.reads = 0  # database reads (tests watch it)

    @property
    def fresh(self) -> bool:
        return time.monotonic() - self.snapshot.read_at <= self.cache_s

    def closed(self) -> bool | None:
        """Whether requests need a token; None: not known without reading the database."""
        if self.api_tokens or self.snapshot.any_made:
            return True
        return False if self.fresh else None

    def forget(self) -> None:
        """Read the tokens again at the next request (this process made or revoked one)."""
        self.snapshot = _Snapshot(self.snapshot.known, self.snapshot.any_made)

    def load_now(self) -> None:
        """Read the tokens here and now (blocking; for code outside the event loop)."""
        self.reads += 1
        self.snapshot = read_tokens()

    def _start_read(self) -> asyncio.Task[None]:
        """The read of the tokens under way, or a new one (one read shared by every request)."""
        task = self._reading
        if task is None or task.done():
            from app.db import run_db

            async def read() -> None:
                self.reads += 1
                snapshot = await run_db(read_tokens)
                if snapshot.read_at >= self.snapshot.read_at:
                    self.snapshot = snapshot

            task = self._reading = asyncio.get_running_loop().create_task(read())
            task.add_done_callback(lambda done: done.cancelled() or done.exception())
        return task

    async def refresh(self, *, unless_younger_than_s: float | None = None) -> None:
        """Read the tokens again, and wait for it."""
        if unless_younger_than_s is not None and time.monotonic() - self.snapshot.read_at < unless_younger_than_s:
            return
        await asyncio.shield(self._start_read())

    def cached(self, authorization: str | None) -> Identity | None:
        """The identity from memory alone; None when that cannot say (the caller then asks
        authenticate(), which may read the database). Raises Unauthorized for a token known to be
        wrong, revoked or expired."""
        if not self.fresh:
            return None
        closed = self.closed()
        if not closed:
            return ANONYMOUS
        hashed = digest(bearer(authorization))
        known = self.api_tokens.get(hashed) or self.snapshot.known.get(hashed)
        if known is None:
            return None
        return _valid(known)

    async def authenticate(self, authorization: str | None) -> Identity:
        """The request's identity; Unauthorized without a valid token where one is needed."""
        if self.api_tokens and authorization:
            # One of API_TOKENS needs no database (a one-person setup keeps working while it is away).
            _scheme, _, token = authorization.partition(" ")
            known = self.api_tokens.get(digest(token.strip()))
            if known is not None and _scheme.lower() == "bearer":
                return known.identity
        age = time.monotonic() - self.snapshot.read_at
        if age > self.cache_s:
            await self.refresh()
        elif age > self.cache_s / 2:
            # Read again in the background while the copy is still served: requests seldom wait.
            self._start_read()
        identity = self.cached(authorization)
        if identity is not None:
            return identity
        # A token this process has not seen: perhaps made through another API process just now.
        await self.refresh(unless_younger_than_s=TOKEN_RELOAD_MIN_S)
        identity = self.cached(authorization)
        if identity is None:
            raise Unauthorized(
                "the bearer token is not one this server accepts (one of API_TOKENS, or a token an admin made "
                "with `finetune admin tokens create`)"
            )
        return identity


def bearer(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized(
            "this server needs 'Authorization: Bearer <token>' (one of API_TOKENS, or a token an admin made "
            "with `finetune admin tokens create`)"
        )
    return token


def _valid(known: _Known) -> Identity:
    if known.revoked:
        raise Unauthorized(f"the bearer token {known.identity.token_prefix} was revoked; ask an admin for a new one")
    if known.expires_at is not None and known.expires_at <= time.time():
        when = datetime.fromtimestamp(known.expires_at).astimezone().isoformat(timespec="seconds")
        raise Unauthorized(
            f"the bearer token {known.identity.token_prefix} expired at {when}; ask an admin for a new one"
        )
    return known.identity


_registries: dict[tuple[Any, ...], TokenRegistry] = {}


def get_registry() -> TokenRegistry:
    """This process's registry for the configured database and API_TOKENS (tests switch both)."""
    settings = get_settings()
    key = (settings.sqlalchemy_url, tuple(t.get_secret_value() for t in settings.api_tokens), settings.token_cache_s)
    registry = _registries.get(key)
    if registry is None:
        _registries.clear()
        registry = _registries[key] = TokenRegistry(settings)
    return registry


def identity_of(scope: Any) -> Identity:
    """The identity the middleware found for this request (app/access.py)."""
    identity = scope.get(IDENTITY_SCOPE_KEY)
    if identity is None:  # a route reached without the middleware: nothing is known of the caller
        raise Unauthorized("the request was not authenticated")
    assert isinstance(identity, Identity)
    return identity


def require_admin(identity: Identity, what: str) -> None:
    if not identity.is_admin:
        raise Forbidden(f"{what} is for admins; {identity.name} is a {identity.role} of project {identity.project}")
