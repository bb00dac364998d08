"""What the routers' replies share: the error responses they document, and SSE framing (a data
line, an engine error as the error event a stream ends with)."""

from __future__ import annotations

import json

from xllm.server.engine.events import ErrorEvent
from xllm.server.errors import error_body
from xllm.server.protocol import ErrorResponse


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI `responses` entries: each status answers with the JSON error body."""
    return {status: {"model": ErrorResponse} for status in statuses}


MEDIA_ERRORS = error_responses(400, 401, 413, 415, 422, 429, 503)  # routes that take media
TEXT_ERRORS = error_responses(400, 401, 413, 422, 429, 503)  # text-only routes
# The 200 of a route that streams with stream=true (its JSON reply is its response_model)
STREAM_REPLY = {"content": {"text/event-stream": {"schema": {"type": "string"}}}}


def sse(data: str) -> str:
    return f"data: {data}\n\n"


def sse_error(event: ErrorEvent) -> str:
    """An error mid-stream: the JSON error body as one event (then the stream ends)."""
    return sse(json.dumps(error_body(event.message, event.type, event.status)))
