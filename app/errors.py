"""Errors the API answers with, rendered by one handler as {"error": ..., "detail": ...}; under
/v1 (the OpenAI-compatible view, app/routes/openai_v1.py) the same errors in OpenAI's shape,
{"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from core.diskspace import is_disk_full_error

logger = logging.getLogger(__name__)


# ---- the bodies, as the OpenAPI document declares them -----------------------------------------


class ErrorBody(BaseModel):
    """Every error the API answers with."""

    error: str = Field(description="a stable name: NotFound, Conflict, Unauthorized, ValidationError, ...")
    detail: str = Field(description="what was wrong, in words")


class FieldError(BaseModel):
    field: str = Field(description="the field's path in the request, e.g. hyperparameters.learning_rate")
    message: str


class ValidationErrorBody(ErrorBody):
    """A 422 for a request that does not validate: every bad field, by name."""

    errors: list[FieldError] = Field(default_factory=list)


ERROR_DESCRIPTIONS = {
    400: "a malformed Range header",
    401: "the server needs a token (API_TOKENS, or one an admin made) and the request has no valid "
    "'Authorization: Bearer <token>'",
    403: "the token's role does not allow this request (a viewer's change, an admin route)",
    404: "no such job, checkpoint, file or route (another project's job or file reads as none)",
    405: "the path exists but not with this method (the Allow header lists those it has)",
    409: "the request conflicts with the job's or file's state, or reuses an Idempotency-Key for another request",
    413: "the body is larger than this server's limit: MAX_JSON_BODY_BYTES for JSON, MAX_UPLOAD_BYTES for uploads",
    416: "the Range starts past the end of the file (Content-Range gives its size)",
    422: "a request that does not validate, or a job this server cannot run (the detail says why)",
    429: "the token is over its request rate (Retry-After says when to try again), or the project is at one "
    "of its quotas (the detail names it and the usage)",
    503: "the job database cannot be read or written right now (retry later)",
    507: "the disk under DATA_DIR is full, or storing the upload would eat into MIN_FREE_DISK_BYTES",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses, with the bodies the handlers below send."""
    return {
        code: {"model": ValidationErrorBody if code == 422 else ErrorBody, "description": ERROR_DESCRIPTIONS[code]}
        for code in codes
    }


# ---- the OpenAI-compatible view's errors (/v1) ------------------------------------------------

OPENAI_PREFIX = "/v1"
OPENAI_ERROR_DESCRIPTIONS = {
    **ERROR_DESCRIPTIONS,
    400: "a request this server cannot carry out as asked (an OpenAI model name, a method or purpose it lacks)",
}


class OpenAICode(StrEnum):
    """`error.code` of the /v1 routes' own refusals; other errors carry the native error's name,
    snake-cased (not_found, conflict, validation_error, invalid_dataset, ...)."""

    invalid_api_key = "invalid_api_key"
    invalid_file_id = "invalid_file_id"
    file_not_found = "file_not_found"
    model_not_supported = "model_not_supported"
    unsupported_method = "unsupported_method"
    unsupported_purpose = "unsupported_purpose"
    unsupported_parameter = "unsupported_parameter"
    missing_required_parameter = "missing_required_parameter"
    conflicting_parameters = "conflicting_parameters"


class OpenAIErrorDetail(BaseModel):
    message: str = Field(description="what was wrong, in words")
    type: str = Field(description="invalid_request_error, or server_error for a 5xx")
    param: str | None = Field(description="the request's field or parameter that was wrong, when one was")
    code: str | None = Field(description="a stable word: not_found, conflict, validation_error, invalid_api_key, ...")


class OpenAIErrorBody(BaseModel):
    """Every error a /v1 route answers with, in OpenAI's shape (the openai SDK reads it)."""

    error: OpenAIErrorDetail


def openai_error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses of a /v1 route."""
    return {code: {"model": OpenAIErrorBody, "description": OPENAI_ERROR_DESCRIPTIONS[code]} for code in codes}


def is_openai_path(path: str) -> bool:
    return path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/")


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(name))


def openai_error(status_code: int, body: dict[str, Any], *, param: str | None = None, code: str | None = None) -> Any:
    """A native error body ({"error": name, "detail": ..., "errors": [...]}) in OpenAI's shape."""
    errors = body.get("errors") or []
    if param is None and errors:
        param = str(errors[0]["field"])
    if code is None:
        code = OpenAICode.invalid_api_key if status_code == 401 else _snake(str(body.get("error", "error")))
    return {
        "error": {
            "message": str(body.get("detail", "")),
            "type": "server_error" if status_code >= 500 else "invalid_request_error",
            "param": param,
            "code": code,
        }
    }


class AppError(Exception):
    status_code = 400

    def __init__(
        self,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers
        # Shown by the /v1 routes' errors only: the request's field that was wrong, and a word
        # other than the error's snake-cased name.
        self.param = param
        self.code = code

    @property
    def name(self) -> str:
        return type(self).__name__

    def body(self) -> dict[str, Any]:
        return {"error": self.name, "detail": self.detail}


class NotFound(AppError):
    status_code = 404


class Conflict(AppError):
    status_code = 409


class BadRequest(AppError):
    """A request that asks for what this server does not do (the /v1 routes: an OpenAI model
    name, a fine-tuning method or file purpose other than supervised and fine-tune)."""

    status_code = 400


class Forbidden(AppError):
    """A request the caller's role does not allow (a viewer's change, a member's admin call). Never for
    another project's job or file: those are a 404, as if they did not exist."""

    status_code = 403


class TooManyRequests(AppError):
    """A token over its request rate (Retry-After says when to try again), or a project at one of
    its quotas (the detail names the quota and the usage)."""

    status_code = 429


class Unauthorized(AppError):
    status_code = 401

    def __init__(self, detail: str) -> None:
        # RFC 6750: say which scheme the server wants.
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="finetune"'})


class DoesNotFit(AppError):
    """A valid spec that this host cannot run (GPU memory or disk); the detail has the figures."""

    status_code = 422


class CannotPlan(AppError):
    status_code = 422


class PayloadTooLarge(AppError):
    status_code = 413


class InvalidFile(AppError):
    """An upload that is not a dataset the trainer can read (format, rows, extension)."""

    status_code = 422


class BadRange(AppError):
    """A Range header that cannot be parsed."""

    status_code = 400


class RangeNotSatisfiable(AppError):
    """A Range that starts past the end of the file; Content-Range gives its size."""

    status_code = 416


class InvalidDataset(AppError):
    """A job whose dataset was read before queuing and cannot train: no row format fits, too many
    malformed rows (listed with their row numbers), options that do not suit the rows."""

    status_code = 422


class InvalidSpec(AppError):
    """A spec that validates but names something that does not exist (an unknown file id)."""

    status_code = 422


class InvalidFields(AppError):
    """Fields of a request that have the right shape but cannot be used on this server (a local
    path outside the allowed roots, say): the same 422 body as a request that does not validate."""

    status_code = 422

    def __init__(self, errors: list[dict[str, str]]) -> None:
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))
        self.errors = errors

    @property
    def name(self) -> str:
        return "ValidationError"

    def body(self) -> dict[str, Any]:
        return {**super().body(), "errors": self.errors}


class MethodNotAllowed(AppError):
    status_code = 405


class DatabaseUnavailable(AppError):
    """The job database refused a read or write (locked for too long, restarting, disk full)."""

    status_code = 503


class StorageUnavailable(AppError):
    """The shared store (STORAGE_URL) did not answer through every retry."""

    status_code = 503


class InsufficientStorage(AppError):
    """The disk under DATA_DIR is full (an upload could not be written)."""

    status_code = 507


def _field_path(loc: tuple[Any, ...]) -> str:
    # FastAPI prefixes "body"/"query"/"path"; people think in the spec's own field names.
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] or parts
    return ".".join(parts) or "body"


def validation_errors(exc: RequestValidationError) -> list[dict[str, str]]:
    errors = []
    for err in exc.errors():
        message = str(err.get("msg", "invalid value"))
        # pydantic prefixes messages of our own validators with "Value error, ".
        message = message.removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            message = "unknown field (not part of the job spec)"
        elif err.get("type") == "json_invalid":
            # Its location is ("body", <character offset>): name the body, and the offset in words.
            offset = err.get("loc", ("body", None))[-1]
            where = f" at character {offset}" if isinstance(offset, int) else ""
            message = f"the body is not valid JSON{where}: {err.get('ctx', {}).get('error', message)}"
            errors.append({"field": "body", "message": message})
            continue
        errors.append({"field": _field_path(tuple(err.get("loc", ()))), "message": message})
    return errors


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
# What FastAPI (0.165) raises, as a 400, for a JSON body it cannot decode (the cause is chained).
FASTAPI_BODY_PARSE_ERROR = "There was an error parsing the body"
# Refusals of a body partly read at most (too large; an upload the disk cannot take): the answer
# closes the connection, so that the server reads no more of it.
BODY_LEFT_UNREAD = frozenset({413, 507})
# Set by app.guard: the words for a body that outgrows its limit as it streams in.
BODY_TOO_LARGE_SCOPE_KEY = "finetune.body_too_large"
# An error body never grows with the request: a message keeps at most this many characters, and at
# most this many fields are listed (a 1 MB body of bad values would otherwise be answered with
# several MB naming each one).
MESSAGE_MAX_CHARS = 2000
FIELDS_LISTED_MAX = 50


def bounded(text: str) -> str:
    if len(text) <= MESSAGE_MAX_CHARS:
        return text
    return f"{text[:MESSAGE_MAX_CHARS]}... (cut: {len(text):,} characters in all)"


def bounded_body(body: dict[str, Any]) -> dict[str, Any]:
    """The body with its detail and field messages cut to size."""
    body = {**body, "detail": bounded(str(body.get("detail", "")))}
    errors = body.get("errors")
    if errors:
        listed = [{**e, "message": bounded(str(e["message"]))} for e in errors[:FIELDS_LISTED_MAX]]
        if len(errors) > FIELDS_LISTED_MAX:
            left = len(errors) - FIELDS_LISTED_MAX
            listed.append({"field": "body", "message": f"and {left} more problem(s) not listed"})
        body["errors"] = listed
    return body


def body_parse_problem(cause: BaseException | None) -> str:
    """Why FastAPI could not parse a JSON body, in words."""
    if isinstance(cause, RecursionError):
        return (
            "the body could not be read as JSON: it nests arrays or objects deeper than the parser allows "
            "(a job spec needs a few levels)"
        )
    if isinstance(cause, UnicodeDecodeError):
        return "the body could not be read as JSON (it is not UTF-8 text)"
    if cause is None:
        return "the body could not be read as JSON"
    return f"the body could not be read as JSON ({type(cause).__name__})"


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this request's path."""
    return [
        method
        for method in HTTP_METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL for route in request.app.router.routes
        )
    ]


def respond(
    request: Request,
    status_code: int,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    *,
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    """The error as the native routes send it, or under /v1 in OpenAI's shape. A /v1 client error
    says `x-should-retry: false`: the openai SDK would otherwise retry a 409 (it is not transient
    here: the job's state does not allow the request)."""
    body = bounded_body(body)
    if status_code in BODY_LEFT_UNREAD:
        headers = {**(headers or {}), "Connection": "close"}
    if not is_openai_path(request.url.path):
        return JSONResponse(body, status_code=status_code, headers=headers)
    headers = dict(headers or {})
    if status_code < 500:
        headers["x-should-retry"] = "false"
    return JSONResponse(
        openai_error(status_code, body, param=param, code=code), status_code=status_code, headers=headers
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def _app_error(request: Request, exc: AppError) -> JSONResponse:
        return respond(request, exc.status_code, exc.body(), exc.headers, param=exc.param, code=exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = validation_errors(exc)
        summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return respond(request, 422, {"error": "ValidationError", "detail": summary, "errors": errors})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        names = {404: "NotFound", 405: "MethodNotAllowed", 401: "Unauthorized", 413: "PayloadTooLarge"}
        detail = str(exc.detail)
        if exc.status_code == 400 and detail == FASTAPI_BODY_PARSE_ERROR:
            # A body that is not text, or nests too deeply to parse: the same 422 as invalid JSON.
            message = body_parse_problem(exc.__cause__)
            return respond(
                request,
                422,
                {
                    "error": "ValidationError",
                    "detail": f"body: {message}",
                    "errors": [{"field": "body", "message": message}],
                },
            )
        if exc.status_code == 404 and detail == "Not Found":  # no route matched
            detail = f"no route {request.method} {request.url.path} (the routes are listed at /docs)"
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 413:
            # Starlette's body limit (app.guard), reached as a body without Content-Length streamed
            # in: name the limit.
            detail = str(request.scope.get(BODY_TOO_LARGE_SCOPE_KEY) or "the request body is too large")
        if exc.status_code == 405:
            # Starlette names the methods of the first route that matched the path; a path served
            # by several routes (GET and DELETE /files/{id}) takes the methods of them all.
            headers["Allow"] = ", ".join(allowed_methods(request)) or headers.get("Allow", "")
            detail = f"{request.url.path} does not take {request.method}; it takes {headers['Allow']}"
        return respond(
            request,
            exc.status_code,
            {"error": names.get(exc.status_code, "HTTPError"), "detail": detail},
            headers or None,
        )

    @app.exception_handler(OperationalError)
    async def _database(request: Request, exc: OperationalError) -> JSONResponse:
        return database_unavailable(request, exc)


def database_unavailable(request: Request, exc: OperationalError) -> JSONResponse:
    """A database that cannot answer now is not the client's fault, nor a bug to hide behind a
    500: say so, and that a retry may work."""
    logger.warning("database error: %s", exc)
    if is_disk_full_error(exc):
        detail = "the job database cannot be written: the disk under DATA_DIR is full; retry once space is freed"
    else:
        detail = f"the job database cannot answer right now ({type(exc.orig).__name__}); retry shortly"
    return respond(request, 503, {"error": "DatabaseUnavailable", "detail": detail}, {"Retry-After": "5"})
