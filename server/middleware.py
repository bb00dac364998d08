"""ASGI middleware: request ids + access log + request counts, the streaming body limit, and the
API key check made before any body is read."""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from xllm.server.errors import error_body
from xllm.server.metrics import Metrics
from xllm.server.stages import open_stages

access_log = logging.getLogger("xllm.access")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class BodyTooLarge(HTTPException):
    """Raised from `receive` as soon as the body passes the limit (FastAPI re-raises HTTPExceptions
    from body parsing as they are, so this becomes a 413, not a generic 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes (--max-upload-mb)")


class BodyLimitMiddleware:
    """Enforce the upload limit while the body streams in: never buffer past it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _send_json(
                send, 413, error_body(BodyTooLarge(self.max_bytes).detail, "payload_too_large", 413)
            )
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def closing(message: Message) -> None:
            # Past the limit the rest of the body is unread: close the connection with the 413
            # (a kept-alive one would make the server read and discard all of it).
            if message["type"] == "http.response.start" and seen > self.max_bytes:
                message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        await self.app(scope, limited, closing)


def bearer_key_valid(authorization: str, keys: list[str]) -> bool:
    """'Bearer <key>' naming one of `keys`, compared in constant time against every key (so the
    time taken does not tell which, or whether one, matched)."""
    scheme, _, token = authorization.partition(" ")
    try:
        given = token.strip().encode("latin-1")  # headers arrive as bytes decoded as latin-1
    except UnicodeEncodeError:
        given = token.strip().encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.encode())
    return scheme.lower() == "bearer" and bool(given) and matched


def _needs_key(path: str) -> bool:
    return path.rstrip("/") == "/chat" or path.startswith("/v1/")


class ApiKeyMiddleware:
    """401 for /chat and /v1/* without a valid key: the one API key check. It runs at the
    headers, not as a route dependency, because FastAPI reads (and parses) a whole form before
    any dependency runs: an unauthenticated client could still make the server take in and
    spool uploads up to --max-upload-mb."""

    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.keys and _needs_key(scope["path"]):
            authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not bearer_key_valid(authorization, self.keys):
                body = error_body("missing or invalid API key", "authentication_error", 401)
                await _send_json(send, 401, body, [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)


class RequestContextMiddleware:
    """Accept/echo X-Request-ID, write one JSON access-log line (with the request's stage
    seconds, `stages_ms`, when it has any), count requests by route."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _SAFE_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.monotonic()
        status = 500
        stages = open_stages()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            extra = {
                "request_id": request_id,
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "duration_ms": round((time.monotonic() - start) * 1000, 1),
            }
            if stages.seconds:  # where its time went (server/stages.py)
                extra["stages_ms"] = stages.milliseconds()
            access_log.info("request", extra=extra)


async def _send_json(
    send: Send, status: int, body: dict, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
