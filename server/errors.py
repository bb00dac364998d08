"""Errors carrying the HTTP status they map to, the JSON error body every failure uses, and the
app's handlers that turn every exception into that body."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("xllm.server")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_parameter",
    429: "rate_limit_exceeded",
    499: "cancelled",
    500: "server_error",
    503: "unavailable",
    504: "timeout",
}


class ServingError(Exception):
    """A request that cannot be served, with the status the HTTP layer answers."""

    def __init__(
        self,
        message: str,
        status: int,
        type: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error")
        self.retry_after = retry_after


def error_body(message: str, type: str, code: int) -> dict:
    """`{"error": {"message", "type", "code"}}`: the same shape for every error, OpenAI-like."""
    return {"error": {"message": message, "type": type, "code": code}}


class ClientDisconnected(Exception):
    """The client went away before a non-streaming reply was ready (see deps.until_disconnected)."""


def _error(
    status: int, message: str, headers: dict[str, str] | None = None, type: str | None = None
) -> JSONResponse:
    body = error_body(message, type or ERROR_TYPES.get(status, "error"), status)
    return JSONResponse(body, status_code=status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServingError)
    async def serving_error(request: Request, exc: ServingError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        return _error(exc.status, exc.message, headers, exc.type)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), dict(exc.headers or {}) or None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        # A body that is not JSON at all is malformed (400); well-formed but wrong values are 422.
        status = 400 if any(e.get("type") == "json_invalid" for e in errors) else 422
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in errors[:5]
        )
        return _error(status, problems or "invalid request")

    @app.exception_handler(ClientDisconnected)
    async def disconnected(request: Request, exc: ClientDisconnected) -> JSONResponse:
        return _error(499, "client disconnected")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception(
            "unhandled error", extra={"request_id": getattr(request.state, "request_id", None)}
        )
        return _error(500, "internal server error")
