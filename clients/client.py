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

The two clients share everything but the I/O: requests are built, replies parsed and streams
decoded by `xllm.clients.wire`; what they return and raise is in `xllm.clients.types`. Failures
raise `XLLMError` (an HTTP error answer, or an error event inside a stream) or its subclass
`XLLMConnectionError` (server unreachable, timeout, connection lost).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import httpx

from xllm.clients.types import (
    ChatResult,
    MediaFile,
    Message,
    ModelInfo,
    Sampling,
    ServerStatus,
    StreamDelta,
    Transcription,
    TranscriptSegment,
    UploadedFile,
    Usage,
    XLLMConnectionError,
    XLLMError,
)
from xllm.clients.wire import (
    Request,
    SSEDecoder,
    SSEEvent,
    StreamParser,
    build_chat_request,
    build_transcription_request,
    build_upload_request,
    error_from_response,
    parse_chat,
    parse_file,
    parse_json,
    parse_models,
    parse_status,
    parse_transcription,
    transport_errors,
)

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
        return self._done(Request("DELETE", f"/v1/files/{file_id}"))

    def _chat(self, request: Request) -> ChatT:
        raise NotImplementedError

    def _upload(self, request: Request) -> FileT:
        raise NotImplementedError

    def _done(self, request: Request) -> DoneT:
        raise NotImplementedError

    def _transcribe(self, request: Request) -> TranscriptionT:
        raise NotImplementedError

    def _chat_stream(self, request: Request) -> StreamT:
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
        return parse_status(self._send(Request("GET", "/health")))

    def ready(self) -> ServerStatus:
        """`/ready`: truthy once the model is loaded; else `.status` says why not."""
        return parse_status(self._send(Request("GET", "/ready")))

    def models(self) -> list[ModelInfo]:
        return parse_models(self._send(Request("GET", "/v1/models")))

    def _send(self, request: Request) -> httpx.Response:
        with transport_errors(self.base_url):
            return self._http.request(**request.httpx_kwargs())

    def _chat(self, request: Request) -> ChatResult:
        return parse_chat(self._send(request))

    def _upload(self, request: Request) -> UploadedFile:
        return parse_file(self._send(request))

    def _done(self, request: Request) -> None:
        parse_json(self._send(request))

    def _transcribe(self, request: Request) -> Transcription:
        return parse_transcription(self._send(request))

    def _chat_stream(self, request: Request) -> Iterator[StreamDelta]:
        parser = StreamParser()
        with transport_errors(self.base_url), self._http.stream(**request.httpx_kwargs()) as reply:
            if reply.is_error:
                reply.read()
                raise error_from_response(reply)
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
        return parse_status(await self._send(Request("GET", "/health")))

    async def ready(self) -> ServerStatus:
        return parse_status(await self._send(Request("GET", "/ready")))

    async def models(self) -> list[ModelInfo]:
        return parse_models(await self._send(Request("GET", "/v1/models")))

    async def _send(self, request: Request) -> httpx.Response:
        with transport_errors(self.base_url):
            return await self._http.request(**request.httpx_kwargs())

    async def _chat(self, request: Request) -> ChatResult:
        return parse_chat(await self._send(request))

    async def _upload(self, request: Request) -> UploadedFile:
        return parse_file(await self._send(request))

    async def _done(self, request: Request) -> None:
        parse_json(await self._send(request))

    async def _transcribe(self, request: Request) -> Transcription:
        return parse_transcription(await self._send(request))

    async def _chat_stream(self, request: Request) -> AsyncIterator[StreamDelta]:
        parser = StreamParser()
        with transport_errors(self.base_url):
            async with self._http.stream(**request.httpx_kwargs()) as reply:
                if reply.is_error:
                    await reply.aread()
                    raise error_from_response(reply)
                async for line in reply.aiter_lines():
                    for delta in parser.feed(line):
                        yield delta
        parser.end()
