"""The SSE decoder and the clients' reply handling, on canned HTTP answers (no server)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from xllm.clients import (
    AsyncXLLMClient,
    SSEDecoder,
    SSEEvent,
    StreamDelta,
    Usage,
    XLLMClient,
    XLLMError,
)
from xllm.clients.client import build_chat_request


def decode(text: str) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events = [decoder.feed(line) for line in text.splitlines()]
    return [e for e in events if e is not None]


def test_sse_basic_events_and_boundaries() -> None:
    assert decode('data: {"a": 1}\n\ndata: [DONE]\n\n') == [
        SSEEvent('{"a": 1}'),
        SSEEvent("[DONE]"),
    ]


def test_sse_multiline_data_comments_fields() -> None:
    text = (
        "\ufeff: a comment, ignored\n"
        "event: update\n"
        "id: 7\n"
        "data: first\n"
        ": another comment inside the event\n"
        "data:second (no space)\n"
        "data:  two spaces keep one\n"
        "data\n"
        "retry: 1000\n"
        "\n"
        "\n"  # extra blank lines dispatch nothing
        "data: next\n"
        "\n"
        "data: cut off at the end of the stream\n"
    )
    assert decode(text) == [
        SSEEvent("first\nsecond (no space)\n two spaces keep one\n", "update", "7"),
        SSEEvent("next", "message", "7"),  # the last event id persists; the type does not
    ]


def test_sse_comment_only_and_empty_streams() -> None:
    assert decode(": keep-alive\n\n: keep-alive\n\n") == []
    assert decode("") == []


def sse_body(*events: object) -> bytes:
    return b"".join(
        f"data: {e if isinstance(e, str) else json.dumps(e)}\r\n\r\n".encode() for e in events
    )


def canned(status: int, body: bytes, content_type: str, headers: dict | None = None):
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            status, content=body, headers={"content-type": content_type, **(headers or {})}
        )

    return seen, handler


USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
GOOD_STREAM = sse_body(
    {"id": "r1", "delta": "Hel"},
    {"id": "r1", "delta": "lo", "finish_reason": "stop", "usage": USAGE},
    "[DONE]",
)
EXPECTED = [
    StreamDelta("r1", "Hel"),
    StreamDelta("r1", "lo", "stop", Usage(3, 2, 5)),
]


def test_sync_stream_and_request_shape() -> None:
    seen, handler = canned(200, GOOD_STREAM, "text/event-stream")
    with XLLMClient("http://x", api_key="k3y", transport=httpx.MockTransport(handler)) as client:
        deltas = list(client.chat_stream("hi", images=[("a.png", b"png")], stop="[END]", seed=3))
    assert deltas == EXPECTED
    request = seen[0]
    assert request.url.path == "/chat" and request.headers["authorization"] == "Bearer k3y"
    body = request.content.decode()
    assert request.headers["content-type"].startswith("multipart/form-data")
    assert 'name="image"; filename="a.png"' in body and "image/png" in body
    assert '["[END]"]' in body and 'name="stream"\r\n\r\ntrue' in body


def test_async_stream() -> None:
    _, handler = canned(200, GOOD_STREAM, "text/event-stream")

    async def main() -> list[StreamDelta]:
        async with AsyncXLLMClient("http://x", transport=httpx.MockTransport(handler)) as client:
            return [d async for d in client.chat_stream("hi")]

    assert asyncio.run(main()) == EXPECTED


@pytest.mark.parametrize("use_async", [False, True])
def test_error_event_inside_a_stream(use_async: bool) -> None:
    body = sse_body(
        {"id": "r1", "delta": "Hel"},
        {"error": {"message": "request timed out", "type": "timeout", "code": 504}},
        "[DONE]",
    )
    _, handler = canned(200, body, "text/event-stream")
    got: list[StreamDelta] = []
    with pytest.raises(XLLMError) as info:
        run_stream(handler, got, use_async)
    assert got == [StreamDelta("r1", "Hel")]
    assert (info.value.status, info.value.type, info.value.message) == (
        504,
        "timeout",
        "request timed out",
    )


@pytest.mark.parametrize("use_async", [False, True])
def test_stream_cut_short_is_an_error(use_async: bool) -> None:
    _, handler = canned(200, sse_body({"id": "r1", "delta": "Hel"}), "text/event-stream")
    with pytest.raises(XLLMError, match="ended before"):
        run_stream(handler, [], use_async)


@pytest.mark.parametrize("use_async", [False, True])
def test_http_error_before_the_stream(use_async: bool) -> None:
    error = {"error": {"message": "queue full", "type": "rate_limit_exceeded", "code": 429}}
    _, handler = canned(429, json.dumps(error).encode(), "application/json", {"Retry-After": "3"})
    with pytest.raises(XLLMError) as info:
        run_stream(handler, [], use_async)
    assert (info.value.status, info.value.type, info.value.retry_after) == (
        429,
        "rate_limit_exceeded",
        3.0,
    )


def run_stream(handler, into: list[StreamDelta], use_async: bool) -> None:
    transport = httpx.MockTransport(handler)
    if not use_async:
        with XLLMClient("http://x", transport=transport) as client:
            into.extend(client.chat_stream("hi"))
        return

    async def main() -> None:
        async with AsyncXLLMClient("http://x", transport=transport) as client:
            async for delta in client.chat_stream("hi"):
                into.append(delta)

    asyncio.run(main())


def test_non_json_error_answer() -> None:
    _, handler = canned(502, b"<html>Bad Gateway</html>", "text/html")
    with XLLMClient("http://x", transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(XLLMError) as info:
            client.chat("hi")
        assert info.value.status == 502 and "Bad Gateway" in info.value.message
        assert not client.ready() and client.ready().http_status == 502


def test_text_only_request_is_urlencoded() -> None:
    request = build_chat_request(
        messages=[{"role": "user", "content": "hi"}], sampling={"ignore_eos": True, "top_p": None}
    )
    assert request.files is None
    assert request.data == {
        "stream": "false",
        "messages": '[{"role": "user", "content": "hi"}]',
        "ignore_eos": "true",
    }
