"""Who answers the questions: a model directory loaded in this process, or a running server.

Both decode greedily (temperature 0) and take the same queries: a conversation (role, text)
whose `<image>`/`<audio>`/`<video>` placeholders bind, in order, to the query's media files
(media with no placeholder go before the last user turn's text, as everywhere in xllm).

`RemoteBackend` speaks the OpenAI API (`POST /v1/chat/completions`) with content parts: images
as `image_url` data URIs, audio as `input_audio` {data, format}, videos as `video_url` data URIs.
Any OpenAI-compatible server that accepts those parts can be evaluated; busy answers (429, 503)
and dropped connections are retried.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import mimetypes
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from xllm.model.evaluation.judge import chat_completions_url

AUDIO_FORMATS = {".wav": "wav", ".mp3": "mp3", ".flac": "flac", ".ogg": "ogg", ".oga": "ogg"}


@dataclass(frozen=True)
class Query:
    turns: tuple[tuple[str, str], ...]  # ends with a user turn
    media: tuple[tuple[str, Path], ...] = ()  # (kind, path), in the order placeholders bind
    # "transcriptions": the one audio item through a server's /v1/audio/transcriptions (which
    # asks the ASR instruction itself, segment by segment) instead of chat completions
    endpoint: Literal["chat", "transcriptions"] = "chat"


@dataclass
class Answer:
    text: str | None
    error: str | None = None


class BackendError(RuntimeError):
    """The backend cannot answer at all (server down, key refused): stop the run."""


@dataclass
class Backend:
    name: str  # what the report calls the target: a model directory or a URL
    info: dict[str, Any] = field(default_factory=dict)

    def answer_all(
        self,
        queries: Sequence[Query],
        max_tokens: int,
        on_done: Callable[[], None] | None = None,
    ) -> list[Answer]:
        raise NotImplementedError


class LocalBackend(Backend):
    """A model directory, loaded once; one query at a time."""

    def __init__(self, model_dir: Path, device: str = "auto", quantize: str = "none") -> None:
        from xllm.model.checkpoint import load_model

        super().__init__(str(model_dir), {"model": str(model_dir), "mode": "in-process"})
        self.model = load_model(model_dir, device=device, quantize=quantize)  # type: ignore[arg-type]

    def answer_all(self, queries, max_tokens, on_done=None):
        from xllm.model.media import MediaError
        from xllm.model.prompt import PromptError

        answers = []
        for query in queries:
            try:
                answers.append(Answer(self.answer(query, max_tokens)))
            except (MediaError, PromptError, ValueError, OSError) as exc:
                answers.append(Answer(None, f"{type(exc).__name__}: {exc}"))
            if on_done:
                on_done()
        return answers

    def answer(self, query: Query, max_tokens: int) -> str:
        """The model's greedy reply to the query's media and turns."""
        import torch

        if query.endpoint != "chat":
            raise ValueError(f"/v1/audio/{query.endpoint} needs a server (--url)")

        from xllm.model.generate import generate
        from xllm.model.sampling import SamplingParams

        model = self.model
        prepared = [model.preparer.prepare_file(path, kind) for kind, path in query.media]
        with torch.inference_mode():
            prompt = model.prompt_embeddings(query.turns, prepared)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        return "".join(d.text for d in generate(model.llm, model.tokenizer, prompt.embeds, params))


def _data_uri(path: Path, default_type: str) -> str:
    content_type = mimetypes.guess_type(path.name)[0] or default_type
    return f"data:{content_type};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _audio_part(path: Path) -> dict[str, Any]:
    """input_audio takes wav, mp3, flac, ogg: other containers are decoded and sent as WAV."""
    fmt = AUDIO_FORMATS.get(path.suffix.lower())
    if fmt is not None:
        data = path.read_bytes()
    else:
        import soundfile as sf

        from xllm.model.media import load_media_file

        samples = load_media_file(path, "audio")
        buffer = io.BytesIO()
        sf.write(buffer, samples, 16000, format="WAV", subtype="PCM_16")
        data, fmt = buffer.getvalue(), "wav"
    return {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(data).decode("ascii"), "format": fmt},
    }


def media_part(kind: str, path: Path) -> dict[str, Any]:
    if kind == "image":
        return {"type": "image_url", "image_url": {"url": _data_uri(path, "image/png")}}
    if kind == "video":
        return {"type": "video_url", "video_url": {"url": _data_uri(path, "video/mp4")}}
    return _audio_part(path)


def openai_messages(query: Query) -> list[dict[str, Any]]:
    """The query as OpenAI messages: each media item becomes a content part where its
    placeholder was (or, unplaced, before the last user turn's text), so the server binds it
    exactly as the in-process path does."""
    from xllm.model.prompt import MediaRef, bind_media

    kinds = [kind for kind, _ in query.media]
    messages = []
    for message in bind_media(list(query.turns), kinds):  # type: ignore[arg-type]
        if not any(isinstance(part, MediaRef) for part in message.parts):
            messages.append({"role": message.role, "content": "".join(message.parts)})  # type: ignore[arg-type]
            continue
        parts: list[dict[str, Any]] = []
        for part in message.parts:
            if isinstance(part, MediaRef):
                parts.append(media_part(part.kind, query.media[part.index][1]))
            else:
                parts.append({"type": "text", "text": part})
        messages.append({"role": message.role, "content": parts})
    return messages


class RemoteBackend(Backend):
    """A server's OpenAI-compatible endpoint; `concurrency` requests in flight."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        concurrency: int = 4,
        timeout: float = 600.0,
        retries: int = 5,
        backoff: float = 1.0,
        model_name: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.endpoint = chat_completions_url(url)
        self.base = self.endpoint.removesuffix("/chat/completions")
        super().__init__(url, {"url": url, "mode": "openai-api"})
        self.api_key = api_key
        self.concurrency = max(1, concurrency)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.transport = transport
        self.model_name = model_name or self._served_model()
        if self.model_name:
            self.info["served_model"] = self.model_name

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _served_model(self) -> str | None:
        """The first id of GET /v1/models (OpenAI servers want a `model`), or None."""
        try:
            reply = httpx.get(f"{self.base}/models", headers=self._headers(), timeout=30)
        except httpx.HTTPError as exc:
            raise BackendError(f"cannot reach the server at {self.base}: {exc}") from None
        if reply.status_code == 401:
            raise BackendError(f"the server at {self.base} refused the API key (401)")
        try:
            return str(reply.json()["data"][0]["id"]) if reply.status_code == 200 else None
        except (ValueError, KeyError, IndexError, TypeError):
            return None

    def answer_all(self, queries, max_tokens, on_done=None):
        return asyncio.run(self._answer_all(list(queries), max_tokens, on_done))

    def transcribe(self, audio: bytes, response_format: str) -> str:
        """The body of one greedy /v1/audio/transcriptions reply; ValueError for an error
        answer, BackendError when the server cannot be reached."""
        form = {"model": self.model_name or "", "response_format": response_format}
        url = f"{self.base}/audio/transcriptions"
        try:
            reply = httpx.post(
                url,
                data={**form, "temperature": "0"},
                files={"file": ("long.wav", audio)},
                headers=self._headers(),
                timeout=self.timeout,
            )
        except httpx.HTTPError as exc:
            raise BackendError(f"cannot reach the server at {url}: {exc}") from None
        if reply.status_code != 200:
            raise ValueError(f"HTTP {reply.status_code}: {reply.text[:300]}")
        return reply.text

    async def _answer_all(self, queries, max_tokens, on_done):
        gate = asyncio.Semaphore(self.concurrency)
        async with httpx.AsyncClient(
            headers=self._headers(), timeout=self.timeout, transport=self.transport
        ) as http:

            async def one(query: Query) -> Answer:
                async with gate:
                    answer = await self._answer(http, query, max_tokens)
                if on_done:
                    on_done()
                return answer

            return await asyncio.gather(*(one(q) for q in queries))

    def _request(self, query: Query, max_tokens: int) -> tuple[str, dict[str, Any]]:
        """The URL and httpx arguments of the query's POST (files are read here)."""
        if query.endpoint == "transcriptions":
            if [kind for kind, _ in query.media] != ["audio"]:
                raise ValueError("a transcription takes exactly one audio item")
            path = query.media[0][1]
            form = {"model": self.model_name or "", "response_format": "json", "temperature": "0"}
            files = {"file": (path.name, path.read_bytes())}
            return f"{self.base}/audio/transcriptions", {"data": form, "files": files}
        body: dict[str, Any] = {
            "messages": openai_messages(query),
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        if self.model_name:
            body["model"] = self.model_name
        return self.endpoint, {"json": body}

    async def _answer(self, http: httpx.AsyncClient, query: Query, max_tokens: int) -> Answer:
        try:
            url, request = self._request(query, max_tokens)
        except (OSError, ValueError) as exc:
            return Answer(None, f"{type(exc).__name__}: {exc}")
        error = ""
        for attempt in range(self.retries + 1):
            delay = self.backoff * 2**attempt * random.uniform(0.5, 1.0)
            try:
                reply = await http.post(url, **request)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            else:
                if reply.status_code == 200:
                    try:
                        body = reply.json()
                        if query.endpoint == "transcriptions":
                            return Answer(str(body["text"]))
                        return Answer(str(body["choices"][0]["message"]["content"] or ""))
                    except (ValueError, KeyError, IndexError, TypeError):
                        return Answer(None, f"bad reply: {reply.text[:200]!r}")
                error = f"HTTP {reply.status_code}: {reply.text[:300]}"
                if reply.status_code == 401:
                    raise BackendError(f"the server refused the API key: {error}")
                if reply.status_code not in (408, 429) and reply.status_code < 500:
                    return Answer(None, error)  # this row's fault (bad media, too large)
                with contextlib.suppress(KeyError, ValueError):
                    delay = float(reply.headers["retry-after"])
            if attempt < self.retries:
                await asyncio.sleep(min(delay, 60.0))
        if error.startswith(("ConnectError", "ConnectTimeout")):
            raise BackendError(f"cannot reach the server at {self.endpoint}: {error}")
        return Answer(None, f"gave up after {self.retries + 1} attempts: {error}")
