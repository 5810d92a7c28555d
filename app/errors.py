"""Errors the API answers with, rendered by one handler as {"error": ..., "detail": ...}."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class AppError(Exception):
    status_code = 400

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers

    @property
    def name(self) -> str:
        return type(self).__name__


class NotFound(AppError):
    status_code = 404


class Conflict(AppError):
    status_code = 409


class Unauthorized(AppError):
    status_code = 401


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


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def _app_error(_request: Request, exc: AppError) -> JSONResponse:
        return JSONResponse({"error": exc.name, "detail": exc.detail}, status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = validation_errors(exc)
        summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return JSONResponse(
            {"error": "ValidationError", "detail": summary, "errors": errors}, status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        names = {404: "NotFound", 405: "MethodNotAllowed", 401: "Unauthorized"}
        return JSONResponse(
            {"error": names.get(exc.status_code, "HTTPError"), "detail": str(exc.detail)},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )
