"""What the xllm clients return and raise, and the types of what they take: results of `/chat`,
its stream, transcriptions and media handles; `XLLMError` and `XLLMConnectionError`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

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


SAMPLING_KEYS = frozenset(Sampling.__annotations__)


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
