"""Errors carrying the HTTP status they map to, and the JSON error body every failure uses."""

from __future__ import annotations

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
