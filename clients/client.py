"""Typed Python clients for the xllm server's `/chat` API: `XLLMClient` (sync) and
`AsyncXLLMClient` (asyncio), both over httpx.

    with XLLMClient("http://127.0.0.1:8000") as client:
        print(client.chat("What is in the image?", images=["cat.png"]).text)
        cat = client.upload("cat.png")  # once; later turns send its id, not its bytes
        print(client.chat("And its colour?", file_ids=[cat.id]).text)
        for part in client.chat_stream("Tell me a story", max_tokens=64):
            print(part.delta, end="", flush=True)

    async with AsyncXLLMClient() as client:
        result = await client.chat("Hello")
        async for part in client.chat_stream("Hello"):
            ...

The two clients share everything but the I/O: the request is built by `build_chat_request`, replies
are parsed by the `_parse_*` functions, and streams are decoded line by line by `SSEDecoder` and
`_StreamParser`. Failures raise `XLLMError` (an HTTP error answer, or an error event inside a
stream) or its subclass `XLLMConnectionError` (server unreachable, timeout, connection lost).
"""

from __future__ import annotations

import json
import mimetypes
import os
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypedDict, TypeVar

import httpx

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncXLLMClient",
    "ChatResult",
    "MediaFile",
    "Message",
    "ModelInfo",
    "SSEDecoder",
    "SSEEvent",
    "Sampling",
    "ServerStatus",
    "StreamDelta",
    "TranscriptSegment",
    "Transcription",
    "UploadedFile",
    "Usage",
    "XLLMClient",
    "XLLMConnectionError",
    "XLLMError",
    "build_chat_request",
    "build_transcription_request",
    "build_upload_request",
]

#: Generation can take a while: generous read timeout, short connect timeout.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)

#: A media item: a file path, raw bytes, or (filename, bytes).
MediaFile = str | os.PathLike[str] | bytes | tuple[str, bytes]
#: One conversation turn: {"role": "system" | "user" | "assistant", "content": "..."}.
Message = Mapping[str, str]


class Sampling(TypedDict, total=False):
    """Sampling options of `/chat`; left out = the model's defaults."""

    max_tokens: int
    min_tokens: int
    ignore_eos: bool
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int
    stop: str | Sequence[str]
    # structured output, as in /v1/chat/completions: {"type": "json_object"} or {"type":
    # "json_schema", "json_schema": {"name": ..., "schema": {...}}}; the text is that JSON
    response_format: Mapping[str, Any]


_SAMPLING_KEYS = frozenset(Sampling.__annotations__)


# --- results ---
@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0  # prompt tokens whose K/V the server reused (earlier turns)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Usage:
        details = data.get("prompt_tokens_details") or {}
        return cls(
            prompt_tokens=int(data["prompt_tokens"]),
            completion_tokens=int(data["completion_tokens"]),
            total_tokens=int(data["total_tokens"]),
            cached_tokens=int(details.get("cached_tokens") or 0),
        )


@dataclass(frozen=True)
class ChatResult:
    """A complete `/chat` reply."""

    id: str
    model: str
    text: str
    finish_reason: Literal["stop", "length"]
    usage: Usage


@dataclass(frozen=True)
class StreamDelta:
    """One event of a streamed reply; the last one carries `finish_reason` and `usage`."""

    id: str
    delta: str
    finish_reason: Literal["stop", "length"] | None = None
    usage: Usage | None = None


@dataclass(frozen=True)
class TranscriptSegment:
    """An utterance of a transcribed recording: when it sounds (seconds) and its text."""

    id: int
    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Transcription:
    """A `/v1/audio/transcriptions` reply: the whole text and its segments."""

    text: str
    duration: float  # seconds of audio
    segments: tuple[TranscriptSegment, ...]


@dataclass(frozen=True)
class UploadedFile:
    """A media handle (`POST /v1/files`): pass its `id` in `file_ids` instead of the bytes."""

    id: str
    bytes: int
    created_at: int
    expires_at: int | None
    filename: str
    purpose: str


@dataclass(frozen=True)
class ModelInfo:
    id: str
    created: int
    owned_by: str


@dataclass(frozen=True)
class ServerStatus:
    """The answer of `/health` or `/ready`; truthy when the probe passed (HTTP 200)."""

    ok: bool
    status: str  # "ok", "ready", "loading", "draining", ...
    http_status: int

    def __bool__(self) -> bool:
        return self.ok


class XLLMError(Exception):
    """An error answer from the server (HTTP status >= 400, or an error event inside a stream).

    `status` is the HTTP status (for a stream error event: its `code`), or None where no answer
    came back at all (`XLLMConnectionError`) or the stream broke off. `retry_after` is the
    Retry-After header in seconds (429 and 503 answers), else None.
    """

    def __init__(
        self,
        status: int | None,
        message: str,
        type: str = "error",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = f"{self.status} " if self.status is not None else ""
        return f"{where}{self.type}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, message={self.message!r}, "
            f"type={self.type!r}, retry_after={self.retry_after!r})"
        )


class XLLMConnectionError(XLLMError):
    """The server could not be reached, timed out, or dropped the connection."""

    def __init__(self, message: str, type: str = "connection_error") -> None:
        super().__init__(None, message, type)


# --- server-sent events ---
@dataclass(frozen=True)
class SSEEvent:
    data: str
    event: str = "message"
    id: str | None = None


class SSEDecoder:
    """Incremental decoder of a `text/event-stream` (WHATWG HTML, "server-sent events").

    Feed it the stream's lines without their line ending; `feed` returns an event when a blank
    line ends one. Handles multi-line `data:` (joined with "\\n"), `:` comments, `event:`/`id:`
    fields, one optional space after the colon, and a leading BOM. An event left without its
    closing blank line when the stream ends is dropped, as the spec says.
    """

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._started = False

    def feed(self, line: str) -> SSEEvent | None:
        if not self._started:
            self._started = True
            line = line.removeprefix("\ufeff")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None  # "retry" and unknown fields are ignored

    def _dispatch(self) -> SSEEvent | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return SSEEvent("\n".join(data), event or "message", self._id)


class _StreamParser:
    """The lines of a streamed `/chat` reply -> StreamDeltas; raises XLLMError on an error event."""

    def __init__(self) -> None:
        self._sse = SSEDecoder()
        self.done = False  # [DONE] seen
        self.finished = False  # the event with finish_reason seen

    def feed(self, line: str) -> tuple[StreamDelta, ...]:
        event = self._sse.feed(line)
        if event is None or self.done:
            return ()
        if event.data.strip() == "[DONE]":
            self.done = True
            return ()
        payload = _event_payload(event.data)
        if "error" in payload:
            raise _error_from_body(payload, None, None)
        delta = _parse_delta(payload)
        self.finished |= delta.finish_reason is not None
        return (delta,)

    def end(self) -> None:
        """At the end of the stream: a stream cut short (no [DONE], no finish) is an error."""
        if not (self.done or self.finished):
            raise XLLMError(None, "the stream ended before the reply was complete", "incomplete")


def _event_payload(data: str) -> dict[str, Any]:
    try:
        payload = json.loads(data)
    except json.JSONDecodeError:
        payload = None
    if not isinstance(payload, dict):
        raise XLLMError(None, f"bad stream event: {data[:200]!r}", "bad_response")
    return payload


# --- requests ---
@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    data: dict[str, str | list[str]] | None = None
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None

    def httpx_kwargs(self) -> dict[str, Any]:
        return {"method": self.method, "url": self.path, "data": self.data, "files": self.files}


def _form_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _media_part(kind: str, item: MediaFile, index: int) -> tuple[str, tuple[str, bytes, str]]:
    if isinstance(item, bytes | bytearray | memoryview):
        name, data = f"{kind}{index}", bytes(item)
    elif isinstance(item, tuple):
        name, data = item
        data = bytes(data)
    else:
        path = Path(item)
        name, data = path.name, path.read_bytes()
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return kind, (name, data, content_type)


def build_chat_request(
    prompt: str | None = None,
    messages: Sequence[Message] | None = None,
    images: Sequence[MediaFile] = (),
    audios: Sequence[MediaFile] = (),
    videos: Sequence[MediaFile] = (),
    *,
    file_ids: Sequence[str] = (),
    stream: bool = False,
    sampling: Mapping[str, Any] | None = None,
) -> _Request:
    """The form fields and files of one `POST /chat` (files are read here, before any I/O);
    `file_ids` are media handles (`upload`), each bound after the files of its kind."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of 'prompt' and 'messages'")
    sampling = dict(sampling or {})
    unknown = sorted(set(sampling) - _SAMPLING_KEYS)
    if unknown:
        raise TypeError(f"unknown sampling option(s): {', '.join(unknown)}")
    data: dict[str, str | list[str]] = {"stream": _form_value(stream)}
    if file_ids:
        data["file_id"] = list(file_ids)
    if prompt is not None:
        data["prompt"] = prompt
    else:
        data["messages"] = json.dumps([dict(m) for m in messages or ()], ensure_ascii=False)
    stop = sampling.pop("stop", None)
    if stop:  # always as one JSON list: the server reads a lone value starting with "[" as JSON
        stops = [stop] if isinstance(stop, str) else list(stop)
        data["stop"] = json.dumps(stops, ensure_ascii=False)
    data.update({key: _form_value(value) for key, value in sampling.items() if value is not None})
    files = [
        _media_part(kind, item, index)
        for kind, items in (("image", images), ("audio", audios), ("video", videos))
        for index, item in enumerate(items)
    ]
    return _Request("POST", "/chat", data, files or None)


def build_upload_request(item: MediaFile, purpose: str = "vision") -> _Request:
    """One `POST /v1/files` (the file is read here)."""
    _, file = _media_part("file", item, 0)
    return _Request("POST", "/v1/files", {"purpose": purpose}, [("file", file)])


def build_transcription_request(
    audio: MediaFile,
    *,
    language: str | None = None,
    prompt: str | None = None,
    temperature: float | None = None,
) -> _Request:
    """One `POST /v1/audio/transcriptions` asking for verbose_json (the file is read here)."""
    data = {"response_format": "verbose_json"}
    given = {"language": language, "prompt": prompt, "temperature": temperature}
    data.update({key: _form_value(value) for key, value in given.items() if value is not None})
    _, file = _media_part("audio", audio, 0)
    return _Request("POST", "/v1/audio/transcriptions", data, [("file", file)])


# --- replies ---
def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: rare, and not worth a date parser here


def _error_from_body(body: Any, status: int | None, retry_after: float | None) -> XLLMError:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = error.get("code")
        return XLLMError(
            status if status is not None else (code if isinstance(code, int) else None),
            str(error.get("message", "")),
            str(error.get("type") or "error"),
            retry_after,
        )
    if isinstance(body, dict) and "detail" in body:  # a plain FastAPI/Starlette error
        return XLLMError(status, str(body["detail"]), "error", retry_after)
    return XLLMError(status, str(body)[:500], "error", retry_after)


def _error_from_response(response: httpx.Response) -> XLLMError:
    """The XLLMError for an error answer (its body must have been read)."""
    retry_after = _retry_after(response)
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()[:500] or response.reason_phrase
        return XLLMError(response.status_code, text, "error", retry_after)
    return _error_from_body(body, response.status_code, retry_after)


def _json(response: httpx.Response) -> Any:
    if response.is_error:
        raise _error_from_response(response)
    try:
        return response.json()
    except ValueError:
        raise XLLMError(
            response.status_code, f"not JSON: {response.text[:200]!r}", "bad_response"
        ) from None


def _parse_chat(response: httpx.Response) -> ChatResult:
    body = _json(response)
    return ChatResult(
        id=body["id"],
        model=body["model"],
        text=body["text"],
        finish_reason=body["finish_reason"],
        usage=Usage.from_json(body["usage"]),
    )


def _parse_file(response: httpx.Response) -> UploadedFile:
    body = _json(response)
    return UploadedFile(
        id=body["id"],
        bytes=int(body["bytes"]),
        created_at=int(body["created_at"]),
        expires_at=body.get("expires_at"),
        filename=body["filename"],
        purpose=body["purpose"],
    )


def _parse_transcription(response: httpx.Response) -> Transcription:
    body = _json(response)
    segments = tuple(
        TranscriptSegment(int(s["id"]), float(s["start"]), float(s["end"]), s["text"])
        for s in body["segments"]
    )
    return Transcription(body["text"], float(body["duration"]), segments)


def _parse_delta(body: Mapping[str, Any]) -> StreamDelta:
    usage = body.get("usage")
    return StreamDelta(
        id=body.get("id", ""),
        delta=body.get("delta", ""),
        finish_reason=body.get("finish_reason"),
        usage=Usage.from_json(usage) if usage else None,
    )


def _parse_status(response: httpx.Response) -> ServerStatus:
    try:
        status = str(response.json().get("status", ""))
    except (ValueError, AttributeError):
        status = response.reason_phrase
    return ServerStatus(response.status_code == 200, status, response.status_code)


def _parse_models(response: httpx.Response) -> list[ModelInfo]:
    return [
        ModelInfo(m["id"], int(m.get("created", 0)), m.get("owned_by", ""))
        for m in _json(response)["data"]
    ]


@contextmanager
def _transport_errors(base_url: str) -> Iterator[None]:
    """httpx's transport failures -> XLLMConnectionError (works around sync and async code)."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise XLLMConnectionError(f"timed out talking to {base_url} ({exc})", "timeout") from exc
    except httpx.TransportError as exc:
        reason = str(exc) or type(exc).__name__
        raise XLLMConnectionError(f"cannot talk to the server at {base_url}: {reason}") from exc


# --- the clients ---
ChatT = TypeVar("ChatT")
StreamT = TypeVar("StreamT")
TranscriptionT = TypeVar("TranscriptionT")
FileT = TypeVar("FileT")
DoneT = TypeVar("DoneT")


class _ClientBase(Generic[ChatT, StreamT, TranscriptionT, FileT, DoneT]):
    """The constructor and the public chat methods, once: they build the request; subclasses do
    the I/O with their `_HTTP` (httpx.Client or httpx.AsyncClient).

    `transport` (an httpx transport of the matching kind) is for tests and special setups.
    """

    _HTTP: ClassVar[type[httpx.Client] | type[httpx.AsyncClient]]

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        *,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = self._HTTP(
            base_url=self.base_url,
            headers=headers,
            timeout=timeout,
            transport=transport,  # type: ignore[arg-type]
        )

    def chat(
        self,
        prompt: str | None = None,
        messages: Sequence[Message] | None = None,
        images: Sequence[MediaFile] = (),
        audios: Sequence[MediaFile] = (),
        videos: Sequence[MediaFile] = (),
        file_ids: Sequence[str] = (),
        **sampling: Unpack[Sampling],
    ) -> ChatT:
        """One complete reply. Give `prompt` (one user turn) or `messages` (the conversation).
        `<image>`, `<audio>`, `<video>` in the text bind, in order, to the files of that kind
        (`file_ids`, handles from `upload`, after the files given here)."""
        return self._chat(
            build_chat_request(
                prompt, messages, images, audios, videos, file_ids=file_ids, sampling=sampling
            )
        )

    def chat_stream(
        self,
        prompt: str | None = None,
        messages: Sequence[Message] | None = None,
        images: Sequence[MediaFile] = (),
        audios: Sequence[MediaFile] = (),
        videos: Sequence[MediaFile] = (),
        file_ids: Sequence[str] = (),
        **sampling: Unpack[Sampling],
    ) -> StreamT:
        """The reply as it is generated: StreamDeltas, the last with finish_reason and usage.
        Media files are read at the call; the request is sent when iteration starts."""
        request = build_chat_request(
            prompt,
            messages,
            images,
            audios,
            videos,
            file_ids=file_ids,
            stream=True,
            sampling=sampling,
        )
        return self._chat_stream(request)

    def transcribe(
        self,
        audio: MediaFile,
        *,
        language: str | None = None,
        prompt: str | None = None,
        temperature: float | None = None,
    ) -> TranscriptionT:
        """Speech of any length to text (`/v1/audio/transcriptions`), with its utterance
        segments and their times."""
        return self._transcribe(
            build_transcription_request(
                audio, language=language, prompt=prompt, temperature=temperature
            )
        )

    def upload(self, file: MediaFile, purpose: str = "vision") -> FileT:
        """Upload an image, audio or video once (`POST /v1/files`); later requests name it by
        `id` (`file_ids=`) and the server decodes and encodes it once."""
        return self._upload(build_upload_request(file, purpose))

    def delete_file(self, file_id: str) -> DoneT:
        """Delete a handle (`DELETE /v1/files/{id}`); requests naming it fail from then on."""
        return self._done(_Request("DELETE", f"/v1/files/{file_id}"))

    def _chat(self, request: _Request) -> ChatT:
        raise NotImplementedError

    def _upload(self, request: _Request) -> FileT:
        raise NotImplementedError

    def _done(self, request: _Request) -> DoneT:
        raise NotImplementedError

    def _transcribe(self, request: _Request) -> TranscriptionT:
        raise NotImplementedError

    def _chat_stream(self, request: _Request) -> StreamT:
        raise NotImplementedError


class XLLMClient(_ClientBase[ChatResult, Iterator[StreamDelta], Transcription, UploadedFile, None]):
    """Synchronous client (httpx.Client); use as a context manager or call `close()`."""

    _HTTP = httpx.Client
    _http: httpx.Client

    def __enter__(self) -> XLLMClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def health(self) -> ServerStatus:
        """`/health`: truthy while the server process lives."""
        return _parse_status(self._send(_Request("GET", "/health")))

    def ready(self) -> ServerStatus:
        """`/ready`: truthy once the model is loaded; else `.status` says why not."""
        return _parse_status(self._send(_Request("GET", "/ready")))

    def models(self) -> list[ModelInfo]:
        return _parse_models(self._send(_Request("GET", "/v1/models")))

    def _send(self, request: _Request) -> httpx.Response:
        with _transport_errors(self.base_url):
            return self._http.request(**request.httpx_kwargs())

    def _chat(self, request: _Request) -> ChatResult:
        return _parse_chat(self._send(request))

    def _upload(self, request: _Request) -> UploadedFile:
        return _parse_file(self._send(request))

    def _done(self, request: _Request) -> None:
        _json(self._send(request))

    def _transcribe(self, request: _Request) -> Transcription:
        return _parse_transcription(self._send(request))

    def _chat_stream(self, request: _Request) -> Iterator[StreamDelta]:
        parser = _StreamParser()
        with _transport_errors(self.base_url), self._http.stream(**request.httpx_kwargs()) as reply:
            if reply.is_error:
                reply.read()
                raise _error_from_response(reply)
            for line in reply.iter_lines():
                yield from parser.feed(line)
        parser.end()


class AsyncXLLMClient(
    _ClientBase[
        Coroutine[Any, Any, ChatResult],
        AsyncIterator[StreamDelta],
        Coroutine[Any, Any, Transcription],
        Coroutine[Any, Any, UploadedFile],
        Coroutine[Any, Any, None],
    ]
):
    """Asynchronous client (httpx.AsyncClient); `async with` it or `await aclose()`.

    `chat` is awaited (`await client.chat(...)`); `chat_stream` is iterated with `async for`.
    """

    _HTTP = httpx.AsyncClient
    _http: httpx.AsyncClient

    async def __aenter__(self) -> AsyncXLLMClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def health(self) -> ServerStatus:
        return _parse_status(await self._send(_Request("GET", "/health")))

    async def ready(self) -> ServerStatus:
        return _parse_status(await self._send(_Request("GET", "/ready")))

    async def models(self) -> list[ModelInfo]:
        return _parse_models(await self._send(_Request("GET", "/v1/models")))

    async def _send(self, request: _Request) -> httpx.Response:
        with _transport_errors(self.base_url):
            return await self._http.request(**request.httpx_kwargs())

    async def _chat(self, request: _Request) -> ChatResult:
        return _parse_chat(await self._send(request))

    async def _upload(self, request: _Request) -> UploadedFile:
        return _parse_file(await self._send(request))

    async def _done(self, request: _Request) -> None:
        _json(await self._send(request))

    async def _transcribe(self, request: _Request) -> Transcription:
        return _parse_transcription(await self._send(request))

    async def _chat_stream(self, request: _Request) -> AsyncIterator[StreamDelta]:
        parser = _StreamParser()
        with _transport_errors(self.base_url):
            async with self._http.stream(**request.httpx_kwargs()) as reply:
                if reply.is_error:
                    await reply.aread()
                    raise _error_from_response(reply)
                async for line in reply.aiter_lines():
                    for delta in parser.feed(line):
                        yield delta
        parser.end()
