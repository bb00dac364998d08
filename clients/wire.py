"""The wire format of the xllm server as the clients speak it, without I/O: requests built from
arguments (`build_*_request`), `text/event-stream` decoding (`SSEDecoder`, `StreamParser`) and
replies parsed into the results of `xllm.clients.types` or raised as their errors."""

from __future__ import annotations

import json
import mimetypes
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from xllm.clients.types import (
    SAMPLING_KEYS,
    ChatResult,
    MediaFile,
    Message,
    ModelInfo,
    ServerStatus,
    StreamDelta,
    Transcription,
    TranscriptSegment,
    UploadedFile,
    Usage,
    XLLMConnectionError,
    XLLMError,
)


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


class StreamParser:
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
class Request:
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
) -> Request:
    """The form fields and files of one `POST /chat` (files are read here, before any I/O);
    `file_ids` are media handles (`upload`), each bound after the files of its kind."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of 'prompt' and 'messages'")
    sampling = dict(sampling or {})
    unknown = sorted(set(sampling) - SAMPLING_KEYS)
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
    return Request("POST", "/chat", data, files or None)


def build_upload_request(item: MediaFile, purpose: str = "vision") -> Request:
    """One `POST /v1/files` (the file is read here)."""
    _, file = _media_part("file", item, 0)
    return Request("POST", "/v1/files", {"purpose": purpose}, [("file", file)])


def build_transcription_request(
    audio: MediaFile,
    *,
    language: str | None = None,
    prompt: str | None = None,
    temperature: float | None = None,
) -> Request:
    """One `POST /v1/audio/transcriptions` asking for verbose_json (the file is read here)."""
    data = {"response_format": "verbose_json"}
    given = {"language": language, "prompt": prompt, "temperature": temperature}
    data.update({key: _form_value(value) for key, value in given.items() if value is not None})
    _, file = _media_part("audio", audio, 0)
    return Request("POST", "/v1/audio/transcriptions", data, [("file", file)])


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


def error_from_response(response: httpx.Response) -> XLLMError:
    """The XLLMError for an error answer (its body must have been read)."""
    retry_after = _retry_after(response)
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()[:500] or response.reason_phrase
        return XLLMError(response.status_code, text, "error", retry_after)
    return _error_from_body(body, response.status_code, retry_after)


def parse_json(response: httpx.Response) -> Any:
    if response.is_error:
        raise error_from_response(response)
    try:
        return response.json()
    except ValueError:
        raise XLLMError(
            response.status_code, f"not JSON: {response.text[:200]!r}", "bad_response"
        ) from None


def parse_chat(response: httpx.Response) -> ChatResult:
    body = parse_json(response)
    return ChatResult(
        id=body["id"],
        model=body["model"],
        text=body["text"],
        finish_reason=body["finish_reason"],
        usage=Usage.from_json(body["usage"]),
    )


def parse_file(response: httpx.Response) -> UploadedFile:
    body = parse_json(response)
    return UploadedFile(
        id=body["id"],
        bytes=int(body["bytes"]),
        created_at=int(body["created_at"]),
        expires_at=body.get("expires_at"),
        filename=body["filename"],
        purpose=body["purpose"],
    )


def parse_transcription(response: httpx.Response) -> Transcription:
    body = parse_json(response)
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


def parse_status(response: httpx.Response) -> ServerStatus:
    try:
        status = str(response.json().get("status", ""))
    except (ValueError, AttributeError):
        status = response.reason_phrase
    return ServerStatus(response.status_code == 200, status, response.status_code)


def parse_models(response: httpx.Response) -> list[ModelInfo]:
    return [
        ModelInfo(m["id"], int(m.get("created", 0)), m.get("owned_by", ""))
        for m in parse_json(response)["data"]
    ]


@contextmanager
def transport_errors(base_url: str) -> Iterator[None]:
    """httpx's transport failures -> XLLMConnectionError (works around sync and async code)."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise XLLMConnectionError(f"timed out talking to {base_url} ({exc})", "timeout") from exc
    except httpx.TransportError as exc:
        reason = str(exc) or type(exc).__name__
        raise XLLMConnectionError(f"cannot talk to the server at {base_url}: {reason}") from exc
