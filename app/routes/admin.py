"""/admin: projects and their quotas, tokens (made, listed by prefix, revoked); /audit; /me.

Everything under /admin and /audit is for admins (app/access.py answers 403 to the others); /me
answers any token with who it is. `finetune admin ...` is the same from a terminal."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, status
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session, col, select

from app import audit, quotas
from app.access import set_audit_target
from app.auth import digest, get_registry, new_token, shown_prefix
from app.db import SessionDep
from app.deps import IdentityDep, require_token
from app.errors import Conflict, InvalidFields, NotFound, error_responses
from core.models import ApiToken, Principal, PrincipalKind, Project, Role, utcnow
from core.spec import MAX_DB_INT, UrlInt

router = APIRouter(tags=["admin"], dependencies=[Depends(require_token)], responses=error_responses(401, 422, 503))

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, description="letters, digits, _ . @ -; at most 64")]
# A quota: null means no limit.
Quota = Annotated[int | None, Field(ge=0, le=MAX_DB_INT, strict=True)]  # strict: `false` is no quota


class Identity(BaseModel):
    """Who a token is."""

    principal: str = Field(description='the principal\'s name ("API_TOKENS #1" for the first of API_TOKENS)')
    kind: str = Field(description="user, or project (the project's own identity)")
    role: Role
    project: str
    token_prefix: str | None = Field(description="ft_<prefix>, the token's public part (null for API_TOKENS)")
    rate_limit_per_minute: int | None = Field(description="the requests a minute it may make (null: no limit)")


@router.get("/me", response_model=Identity)
def who_am_i(identity: IdentityDep) -> Identity:
    """The token's principal, role and project: what this token may see and do."""
    from core.config import get_settings

    return Identity(
        principal=identity.name,
        kind=identity.kind,
        role=identity.role,
        project=identity.project,
        token_prefix=identity.token_prefix,
        rate_limit_per_minute=(identity.rate_limit_per_minute or get_settings().rate_limit_per_minute or None)
        if identity.rate_key
        else None,
    )


# ---- projects -------------------------------------------------------------------------------------


class Quotas(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_gpus: Quota = Field(default=None, description="the most GPUs its jobs hold at once")
    max_queued_jobs: Quota = Field(default=None, description="the most of its jobs queued at once")
    max_checkpoint_bytes: Quota = Field(default=None, description="the most bytes its jobs' checkpoints take")


class ProjectCreate(Quotas):
    name: Name


class Usage(BaseModel):
    gpus: int = Field(description="GPUs its running jobs hold")
    queued_jobs: int
    checkpoint_bytes: int = Field(description="what its jobs' kept checkpoints take")


class ProjectPublic(BaseModel):
    name: str
    created_at: datetime
    max_gpus: int | None
    max_queued_jobs: int | None
    max_checkpoint_bytes: int | None
    usage: Usage


class ProjectList(BaseModel):
    items: list[ProjectPublic]


def project_public(session: Session, project: Project) -> ProjectPublic:
    assert project.id is not None
    return ProjectPublic(
        name=project.name,
        created_at=project.created_at,
        max_gpus=project.max_gpus,
        max_queued_jobs=project.max_queued_jobs,
        max_checkpoint_bytes=project.max_checkpoint_bytes,
        usage=Usage(
            gpus=quotas.gpus_in_use(session, project.id),
            queued_jobs=quotas.queued_jobs(session, project.id),
            checkpoint_bytes=quotas.checkpoint_bytes(session, project.id),
        ),
    )


def project_named(session: Session, name: str) -> Project:
    project = session.exec(select(Project).where(Project.name == name)).first()
    if project is None:
        raise NotFound(f"no project {name!r}")
    return project


ProjectName = Annotated[str, Path(pattern=NAME_PATTERN, description="the project's name")]


@router.get("/admin/projects", response_model=ProjectList)
def list_projects(session: SessionDep) -> ProjectList:
    """Every project, its quotas (null: none) and what it uses of them now."""
    projects = session.exec(select(Project).order_by(col(Project.id))).all()
    return ProjectList(items=[project_public(session, p) for p in projects])


@router.post(
    "/admin/projects",
    status_code=status.HTTP_201_CREATED,
    response_model=ProjectPublic,
    responses=error_responses(403, 409, 413),
)
def create_project(body: ProjectCreate, session: SessionDep, request: Request) -> ProjectPublic:
    """A project: what its jobs and files belong to, with its quotas."""
    if session.exec(select(Project).where(Project.name == body.name)).first() is not None:
        raise Conflict(f"project {body.name!r} exists already (PATCH /admin/projects/{body.name} changes its quotas)")
    project = Project(**body.model_dump())
    session.add(project)
    session.commit()
    session.refresh(project)
    set_audit_target(request, f"project {project.name}")
    return project_public(session, project)


@router.patch("/admin/projects/{name}", response_model=ProjectPublic, responses=error_responses(403, 404, 413))
def update_project(name: ProjectName, body: Quotas, session: SessionDep) -> ProjectPublic:
    """Change a project's quotas: the fields given (null lifts one); the others stay. Jobs queued or
    running keep going; the new quotas apply to what is submitted or started next."""
    project = project_named(session, name)
    for field in body.model_fields_set:
        setattr(project, field, getattr(body, field))
    session.add(project)
    session.commit()
    session.refresh(project)
    return project_public(session, project)


# ---- tokens ---------------------------------------------------------------------------------------


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    principal: Name = Field(description="whose token: made, with the fields below, when it does not exist yet")
    project: Name | None = Field(default=None, description="the principal's project (a new one's: default)")
    role: Role | None = Field(default=None, description="the principal's role (a new one's: member)")
    kind: PrincipalKind | None = Field(default=None, description="user, or project (a new one's: user)")
    description: str | None = Field(default=None, max_length=200, description="what the token is for")
    expires_in_days: float | None = Field(default=None, gt=0, le=36500, description="none: it never expires")
    rate_limit_per_minute: int | None = Field(
        default=None, ge=1, le=10_000_000, description="its own rate (none: RATE_LIMIT_PER_MINUTE)"
    )


class TokenPublic(BaseModel):
    prefix: str = Field(description="ft_<8 hex digits>: the token's public part, which names it")
    principal: str
    kind: str
    role: Role
    project: str
    description: str | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    rate_limit_per_minute: int | None
    state: Literal["active", "expired", "revoked"]


class TokenCreated(TokenPublic):
    token: str = Field(description="the token itself: shown this once, kept nowhere (only its SHA-256 is)")


class TokenList(BaseModel):
    items: list[TokenPublic]


def token_public(token: ApiToken, principal: Principal, project: str) -> TokenPublic:
    now = utcnow()
    state: Literal["active", "expired", "revoked"] = "active"
    if token.revoked_at is not None:
        state = "revoked"
    elif token.expires_at is not None and token.expires_at <= now:
        state = "expired"
    return TokenPublic(
        prefix=shown_prefix(token.prefix),
        principal=principal.name,
        kind=principal.kind,
        role=Role(principal.role),
        project=project,
        description=token.description,
        created_at=token.created_at,
        expires_at=token.expires_at,
        revoked_at=token.revoked_at,
        rate_limit_per_minute=token.rate_limit_per_minute,
        state=state,
    )


def _principal_for(session: Session, body: TokenCreate) -> tuple[Principal, Project]:
    principal = session.exec(select(Principal).where(Principal.name == body.principal)).first()
    if principal is None:
        project_name = body.project or "default"
        project = session.exec(select(Project).where(Project.name == project_name)).first()
        if project is None:
            raise InvalidFields(
                [
                    {
                        "field": "project",
                        "message": f"no project {project_name!r}: make it first (POST /admin/projects, "
                        f"finetune admin projects create {project_name})",
                    }
                ]
            )
        assert project.id is not None
        principal = Principal(
            name=body.principal,
            kind=body.kind or PrincipalKind.user,
            role=body.role or Role.member,
            project_id=project.id,
        )
        session.add(principal)
        session.flush()
        return principal, project
    project = session.get(Project, principal.project_id)
    assert project is not None
    differs = [
        f"{field} {have!r}"
        for field, asked, have in (
            ("project", body.project, project.name),
            ("role", body.role, principal.role),
            ("kind", body.kind, principal.kind),
        )
        if asked is not None and str(asked) != have
    ]
    if differs:
        raise Conflict(
            f"principal {principal.name!r} exists with {', '.join(differs)}; leave those out, or give its token to "
            "a principal of another name"
        )
    return principal, project


@router.post(
    "/admin/tokens",
    status_code=status.HTTP_201_CREATED,
    response_model=TokenCreated,
    responses=error_responses(403, 409, 413),
)
def create_token(body: TokenCreate, session: SessionDep, request: Request) -> TokenCreated:
    """A new token for a principal (made too when it does not exist yet). The answer holds the token
    itself, once: the server keeps only its SHA-256. The first token made closes a server that had
    none (and no API_TOKENS): from then on every request needs a token."""
    principal, project = _principal_for(session, body)
    assert principal.id is not None
    prefix, secret = new_token()
    expires_at = utcnow() + timedelta(days=body.expires_in_days) if body.expires_in_days else None
    token = ApiToken(
        principal_id=principal.id,
        prefix=prefix,
        sha256=digest(secret),
        description=body.description,
        expires_at=expires_at,
        rate_limit_per_minute=body.rate_limit_per_minute,
    )
    session.add(token)
    session.commit()
    session.refresh(token)
    get_registry().forget()  # this process knows it at its next request
    set_audit_target(request, f"token {shown_prefix(prefix)} of {principal.name}")
    return TokenCreated(**token_public(token, principal, project.name).model_dump(), token=secret)


@router.get("/admin/tokens", response_model=TokenList)
def list_tokens(
    session: SessionDep,
    principal: Annotated[str | None, Query(max_length=64, description="only this principal's")] = None,
    project: Annotated[str | None, Query(max_length=64, description="only this project's principals'")] = None,
) -> TokenList:
    """Every token by its prefix (never the token), newest first, with its principal and state."""
    query = (
        select(ApiToken, Principal, Project.name)
        .join(Principal, col(ApiToken.principal_id) == col(Principal.id))
        .join(Project, col(Principal.project_id) == col(Project.id))
        .order_by(col(ApiToken.id).desc())
    )
    if principal is not None:
        query = query.where(col(Principal.name) == principal)
    if project is not None:
        query = query.where(col(Project.name) == project)
    return TokenList(items=[token_public(t, p, name) for t, p, name in session.exec(query).all()])


TokenPrefix = Annotated[str, Path(pattern=r"^(ft_)?[0-9a-f]{8}$", description="ft_<8 hex digits>, as listed")]


@router.delete("/admin/tokens/{prefix}", response_model=TokenPublic, responses=error_responses(403, 404))
def revoke_token(prefix: TokenPrefix, session: SessionDep) -> TokenPublic:
    """Revoke a token: refused at once by this API process, by every other within TOKEN_CACHE_S.
    Revoking a revoked token changes nothing. A server whose last token is revoked stays closed."""
    row = session.exec(
        select(ApiToken, Principal, Project.name)
        .join(Principal, col(ApiToken.principal_id) == col(Principal.id))
        .join(Project, col(Principal.project_id) == col(Project.id))
        .where(col(ApiToken.prefix) == prefix.removeprefix("ft_"))
    ).first()
    if row is None:
        raise NotFound(f"no token {shown_prefix(prefix.removeprefix('ft_'))}")
    token, principal, project = row
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        session.add(token)
        session.commit()
        session.refresh(token)
    get_registry().forget()
    return token_public(token, principal, project)


# ---- the audit ------------------------------------------------------------------------------------


class AuditEntryPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: datetime
    principal: str | None
    role: str | None
    project: str | None
    token_prefix: str | None
    method: str
    path: str
    status_code: int | None = Field(description="the answer's status; null: none was sent (the client went away)")
    client: str | None = Field(description="host:port the request came from")
    target: str | None = Field(description='what it made, when the path does not say ("job 12")')
    duration_ms: float | None


class AuditPage(BaseModel):
    items: list[AuditEntryPublic]
    next_before_id: int | None = Field(description="pass as ?before_id= for the next (older) page; null at the end")


@router.get("/audit", response_model=AuditPage, responses=error_responses(403))
def read_audit(
    session: SessionDep,
    before_id: Annotated[UrlInt | None, Query(ge=1, le=MAX_DB_INT, description="next_before_id")] = None,
    limit: Annotated[UrlInt, Query(ge=1, le=1000)] = 100,
    principal: Annotated[str | None, Query(max_length=64)] = None,
    project: Annotated[str | None, Query(max_length=64)] = None,
    method: Annotated[Literal["POST", "PUT", "PATCH", "DELETE"] | None, Query()] = None,
) -> AuditPage:
    """Every request that could change state (any method but GET, HEAD and OPTIONS), newest first:
    who (principal, role, project, token prefix), what (method, path, what it made), when, from
    where, and its status. Kept AUDIT_RETENTION_DAYS."""
    rows = audit.read_entries(
        session, before_id=before_id, limit=limit + 1, principal=principal, project=project, method=method
    )
    items = [AuditEntryPublic.model_validate(row) for row in rows[:limit]]
    return AuditPage(items=items, next_before_id=items[-1].id if len(rows) > limit else None)
