"""The serving layer: requests in protocol form -> engine requests -> event streams. No HTTP here.

It checks what can be checked before the model sees a request (parameters, media counts,
placeholders), decodes and preprocesses media in a thread pool (never on the event loop or the
model thread), claims a place in the engine (or says why not: full, draining), and waits for the
first event so that errors found by the engine before any token (an over-long prompt) still
become a proper status code.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, cast

from xllm.model.config import Modality
from xllm.model.media import (
    MediaError,
    MediaLimits,
    sniff_kind,
)
from xllm.model.preprocess import MediaPreparer, PreparedMedia
from xllm.model.prompt import PromptError, bind_media
from xllm.model.sampling import SamplingParams, choice_seed, sampling_params
from xllm.server.engine.admission import EngineFull, EngineUnavailable
from xllm.server.engine.contract import EngineClient
from xllm.server.engine.events import (
    EngineRequest,
    ErrorEvent,
    Event,
    FinishEvent,
    PromptLogprobsEvent,
    RequestHandle,
    TokenLogprobs,
    Usage,
)
from xllm.server.errors import ServingError
from xllm.server.files import FileLimits, FileStore, StoredFile
from xllm.server.metrics import Metrics
from xllm.server.protocol import ChatCompletionRequest, CompletionRequest
from xllm.server.remote_media import RemoteMediaFetcher, data_uri_bytes, decode_base64
from xllm.server.stages import add_engine_stages, add_media_stages, add_stage
from xllm.server.structured import ToolPlan, call_text, response_format_grammar, tool_plan

log = logging.getLogger("xllm.serving")


@dataclass
class MediaInput:
    kind: Modality
    data: bytes
    prepared: PreparedMedia | None = None  # already prepared (a segment of a longer recording)
    pinned: bool = False  # a media handle's: its encoder output stays while the handle lives


@dataclass
class ChatInput:
    turns: list[tuple[str, str]]  # (role, text with optional <image>/<audio>/<video> placeholders)
    media: list[MediaInput]
    overrides: dict[str, Any] = field(default_factory=dict)  # sampling fields the client set
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    prompt: str | None = None  # raw text instead of turns: no chat template (/v1/completions)
    n: int = 1  # choices (OpenAI's n): one prefill, n slots
    grammar: str | None = None  # structured outputs: what the text must match (model/grammar.py)
    tools: ToolPlan | None = None  # how to read the text as a tool call
    tool_definitions: tuple[dict, ...] = ()  # for a chat template that renders tools


@dataclass
class ServingLimits:
    media: MediaLimits
    max_media_per_request: int = 16
    request_timeout: float | None = None


@dataclass
class Completion:
    text: str
    finish_reason: str
    usage: Usage
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token, if asked
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per prompt token


class Generation:
    """A running request: iterate its events (the first is already known), or cancel it."""

    def __init__(
        self, handle: RequestHandle, first: Event, deadline: float | None, timeout: float | None
    ):
        self.handle = handle
        self._first: Event | None = first
        self._deadline = deadline
        self._timeout = timeout
        self.done = isinstance(first, FinishEvent | ErrorEvent)

    @property
    def request_id(self) -> str:
        return self.handle.request_id

    async def event_batches(self) -> AsyncIterator[list[Event]]:
        """The events as they come, several at once when several are already waiting: a stream
        that fell behind catches up with one write instead of one per token."""
        if self._first is not None:
            first, self._first = self._first, None
            if isinstance(first, FinishEvent):
                add_engine_stages(first.stages)
            yield [first]
        while not self.done:
            batch = [await _next_event(self.handle, self._deadline, self._timeout)]
            batch += self.handle.ready_events()
            self.done = isinstance(batch[-1], FinishEvent | ErrorEvent)  # always the last
            if isinstance(batch[-1], FinishEvent):
                add_engine_stages(batch[-1].stages)
            yield batch

    async def events(self) -> AsyncIterator[Event]:
        async for batch in self.event_batches():
            for event in batch:
                yield event

    async def collect(self) -> Completion:
        parts, logprobs, prompt_logprobs = [], [], []
        async for event in self.events():
            if isinstance(event, ErrorEvent):
                raise ServingError(event.message, event.status, event.type)
            if isinstance(event, PromptLogprobsEvent):
                prompt_logprobs = list(event.entries)
                continue
            parts.append(event.text)
            if event.logprobs is not None:
                logprobs.append(event.logprobs)
            if isinstance(event, FinishEvent):
                text = "".join(parts)
                return Completion(text, event.finish_reason, event.usage, logprobs, prompt_logprobs)
        raise ServingError("the request ended without an answer", 500)

    def cancel(self) -> None:
        if not self.done:
            self.handle.cancel()
            self.done = True


async def _next_event(
    handle: RequestHandle, deadline: float | None, timeout: float | None
) -> Event:
    if deadline is None:
        return await handle.next_event()
    try:
        return await asyncio.wait_for(handle.next_event(), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        handle.cancel()
        return ErrorEvent(
            f"the request timed out after {timeout:g} s (--request-timeout)", 504, "timeout"
        )


# Text is tokenized on the model worker's thread, so an oversized prompt would stall every running
# stream while it is tokenized (a 40 MB prompt: ~2 minutes) only to be refused as too long. No
# real prompt averages more than this many characters per token: beyond it, refuse at once.
MAX_CHARS_PER_TOKEN = 32
# Stop strings are matched against every new token of the request, on the worker's thread too.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1000

SAMPLING_FIELDS = (
    "max_tokens",
    "min_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "ignore_eos",
    "logprobs",
)


async def merged_event_batches(
    generations: list[Generation],
) -> AsyncIterator[tuple[int, list[Event]]]:
    """(index, events) of several generations (one per choice) as each produces them; ends
    when all have ended. Leaving early (or an error) cancels the ones still running."""
    queue: asyncio.Queue[tuple[int, list[Event] | None]] = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async for batch in generation.event_batches():
                await queue.put((index, batch))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    try:
        running = len(tasks)
        while running:
            index, batch = await queue.get()
            if batch is None:
                running -= 1
            else:
                yield index, batch
    finally:
        for task in tasks:
            task.cancel()
        for generation in generations:
            generation.cancel()


class ChatService:
    def __init__(
        self,
        preparer: MediaPreparer,
        engine: EngineClient,
        limits: ServingLimits,
        executor: ThreadPoolExecutor,
        fetcher: RemoteMediaFetcher,
        model_name: str,
        metrics: Metrics,
        files: FileStore | None = None,
    ) -> None:
        self.preparer = preparer
        self.engine = engine
        self.limits = limits
        self.executor = executor
        self.fetcher = fetcher
        self.model_name = model_name
        self.metrics = metrics
        self.files = files if files is not None else FileStore(FileLimits())

    # --- media handles (/v1/files) ---
    async def create_file(self, owner: str, filename: str, purpose: str, data: bytes) -> StoredFile:
        """Upload once: the kind sniffed from the bytes, the media decoded and preprocessed now
        (a bad file fails its upload, not a later request), within the owner's quota."""
        sniffed = sniff_kind(data)
        if sniffed is None:
            raise ServingError(
                "the file is not an image, audio or video this server recognises", 415
            )
        kind = cast(Modality, sniffed)
        try:
            self.preparer.check_kind(kind)
        except ValueError as exc:
            raise ServingError(str(exc), 400) from None
        self.files.check_quota(owner, len(data))
        (prepared,) = await self._prepare_media([MediaInput(kind, data)])
        add = self.files.add
        return await asyncio.to_thread(add, owner, filename, purpose, kind, data, prepared)

    async def file_media(self, owner: str, file_id: str) -> MediaInput:
        """A handle as a request's media item (404 for one the owner does not hold): prepared
        at upload, or at its first use after a restart."""
        stored = self.files.get(owner, file_id)
        if stored.prepared is None:
            data = await asyncio.to_thread(self.files.data, stored)
            (stored.prepared,) = await self._prepare_media([MediaInput(stored.kind, data)])
        return MediaInput(stored.kind, b"", prepared=stored.prepared, pinned=True)

    # --- /chat and /v1/chat/completions share this ---
    async def complete(self, chat: ChatInput) -> Completion:
        """The whole reply of a non-streaming request (cancelled if the caller goes away)."""
        generation = await self.start(chat)
        try:
            return await generation.collect()
        finally:
            generation.cancel()

    async def start_all(self, chats: list[ChatInput]) -> list[Generation]:
        """Start several requests (the choices of one reply, each input's n in a row); if one
        is refused, none runs."""
        started = await asyncio.gather(
            *(self.start_choices(c) for c in chats), return_exceptions=True
        )
        failed = [r for r in started if isinstance(r, BaseException)]
        if failed:
            for result in started:
                if not isinstance(result, BaseException):
                    for generation in result:
                        generation.cancel()
            raise failed[0]
        return [generation for result in started for generation in result]  # type: ignore[union-attr]

    async def start(self, chat: ChatInput) -> Generation:
        """Start one request (n = 1)."""
        (generation,) = await self.start_choices(chat)
        return generation

    async def start_choices(self, chat: ChatInput) -> list[Generation]:
        """Start the chat.n choices of one request: its media decoded once, n places claimed
        (all or none), its prompt prefilled once for all of them (EngineRequest.group)."""
        params, max_tokens_given = self._params(chat.overrides)
        self._check_choices(chat.n)
        if chat.grammar is not None and params.min_tokens:
            raise ServingError("min_tokens cannot be combined with response_format or tools", 400)
        self._check_media_count(sum(not item.pinned for item in chat.media))  # handles: free
        texts = chat.turns if chat.prompt is None else [("user", chat.prompt)]
        self._check_prompt_size(texts)
        for _, text in texts:
            try:
                text.encode()
            except UnicodeEncodeError:  # JSON "\ud800": the tokenizer would fail in the worker
                raise ServingError(
                    "message text is not valid Unicode (a lone surrogate)", 400
                ) from None
        try:
            messages = (
                []
                if chat.prompt is not None
                else bind_media(chat.turns, [m.kind for m in chat.media])
            )
        except PromptError as exc:
            raise ServingError(str(exc), 400) from None
        for item in chat.media:  # before a place is taken or a byte decoded
            try:
                self.preparer.check_kind(item.kind)
            except ValueError as exc:
                raise ServingError(str(exc), 400) from None
        self._reserve(chat.n)
        arrival = time.monotonic()
        timeout = self.limits.request_timeout
        deadline = arrival + timeout if timeout else None
        try:
            # The deadline covers media decoding too (a pathological file must not hold the
            # request past --request-timeout; its decoding thread finishes on its own).
            prepared = await asyncio.wait_for(self._prepare_media(chat.media), timeout)
        except TimeoutError:
            self._release(chat.n)
            raise ServingError(
                f"the request timed out after {timeout:g} s (--request-timeout) while its "
                "media were being decoded",
                504,
                "timeout",
            ) from None
        except BaseException:
            self._release(chat.n)
            raise
        if chat.media:  # its media's decoding and preprocessing, waits for a thread included
            waited = time.monotonic() - arrival
            add_stage("media_prepare", waited)
            self.metrics.media_prepared({item.kind for item in chat.media}, waited)
        pinned = tuple(p.digest for p, m in zip(prepared, chat.media, strict=True) if m.pinned)
        group = uuid.uuid4().hex if chat.n > 1 else None
        handles = []
        for choice in reversed(range(chat.n)):  # the followers first: choice 0 prefills
            request_id = f"{chat.request_id}-{choice}" if choice else chat.request_id
            handle = RequestHandle(request_id, asyncio.get_running_loop())
            request = EngineRequest(
                request_id,
                messages,
                prepared,
                replace(params, seed=choice_seed(params.seed, choice)),
                max_tokens_given,
                arrival,
                chat.prompt,
                group=group,
                choice=choice,
                grammar=chat.grammar,
                tools=chat.tool_definitions,
                tools_in_prompt=chat.tools is not None and chat.tools.auto,
                pinned=pinned,
            )
            if (
                chat.prompt is not None
                and chat.overrides.get("echo")
                and params.logprobs is not None
            ):
                request.prompt_logprobs = params.logprobs
            request.submitted = time.monotonic()
            self.engine.submit(request, handle)
            handles.insert(0, handle)
        generations = []
        try:
            for handle in handles:
                first = await _next_event(handle, deadline, timeout)
                if isinstance(first, ErrorEvent):
                    raise ServingError(first.message, first.status, first.type)
                generations.append(Generation(handle, first, deadline, timeout))
        except BaseException:  # refused, or the client left while waiting: no slot may leak
            for handle in handles:
                handle.cancel()
            raise
        return generations

    def _check_choices(self, n: int) -> None:
        slots = self.engine.config.max_batch
        if n > slots:
            raise ServingError(
                f"n={n} choices need {n} KV slots at once; this server has {slots} (--max-batch)",
                400,
            )

    def _reserve(self, count: int) -> None:
        """Claim `count` places in the engine, all or none."""
        for taken in range(count):
            try:
                self.engine.reserve()
            except (EngineFull, EngineUnavailable) as exc:
                self._release(taken)
                if isinstance(exc, EngineFull):
                    raise ServingError(str(exc), 429, retry_after=self._retry_after()) from None
                raise ServingError(str(exc), 503, retry_after=5) from None

    def _release(self, count: int) -> None:
        for _ in range(count):
            self.engine.release()

    def _check_prompt_size(self, turns: list[tuple[str, str]]) -> None:
        context = self.engine.max_model_len
        chars = sum(len(text) for _, text in turns)
        if len(turns) > context or chars > MAX_CHARS_PER_TOKEN * context:
            raise ServingError(
                f"the prompt has {len(turns)} messages and {chars} characters: far more than "
                f"the model's context of {context} tokens can hold (at most "
                f"{MAX_CHARS_PER_TOKEN * context} characters are accepted)",
                400,
            )

    def _check_media_count(self, count: int) -> None:
        if count > self.limits.max_media_per_request:
            raise ServingError(
                f"{count} media items in one request; the limit is "
                f"{self.limits.max_media_per_request} (--max-media-per-request)",
                413,
            )

    def _params(self, overrides: dict[str, Any]) -> tuple[SamplingParams, bool]:
        given = {k: v for k, v in overrides.items() if k in SAMPLING_FIELDS and v is not None}
        if "stop" in given:
            given["stop"] = tuple(given["stop"])
            stops = given["stop"]
            if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stops):
                raise ServingError(
                    f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} "
                    f"characters each (got {len(stops)}, the longest "
                    f"{max(map(len, stops), default=0)} characters)",
                    422,
                )
        seed = given.get("seed")
        if seed is not None and not -(2**63) <= seed < 2**64:  # what torch.Generator takes
            raise ServingError("seed must be between -2**63 and 2**64 - 1", 422)
        try:
            # max_tokens left open is settled by the engine once the prompt length is known.
            params = sampling_params(self.preparer.config.sampling, **given)
        except ValueError as exc:
            raise ServingError(str(exc), 422) from None
        return params, "max_tokens" in given

    def _retry_after(self) -> int:
        return max(1, min(30, self.engine.num_waiting // max(1, self.engine.config.max_batch) + 1))

    async def _prepare_media(self, media: list[MediaInput]) -> list[PreparedMedia]:
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(self.executor, self._decode_one, item) for item in media]
        try:
            prepared = list(await asyncio.gather(*jobs))
        except MediaError as exc:
            raise ServingError(exc.message, exc.status) from None
        add_media_stages([p for p, item in zip(prepared, media, strict=True) if not item.prepared])
        return prepared

    def _decode_one(self, item: MediaInput) -> PreparedMedia:
        if item.prepared is not None:
            return item.prepared
        prepared = self.preparer.prepare_bytes(item.kind, item.data, self.limits.media)
        self.metrics.media_stages(item.kind, prepared.decode_seconds, prepared.preprocess_seconds)
        return prepared

    # --- OpenAI request -> ChatInput ---
    async def from_openai(
        self, request: ChatCompletionRequest, request_id: str, owner: str = ""
    ) -> ChatInput:
        """An OpenAI request as a ChatInput; `owner` (see files.owner_of) resolves its media
        handles."""
        tools = tool_plan(request.tools, request.tool_choice, request.response_format)
        grammar = tools.grammar if tools else response_format_grammar(request.response_format)
        if request.top_logprobs is not None and not request.logprobs:
            raise ServingError("'top_logprobs' needs 'logprobs': true", 400)
        # Counted before any URL is fetched or data URI decoded; media handles do not count
        # (decoded at their upload, and bounded by their quota).
        self._check_media_count(
            sum(
                part.type not in ("text", "file")
                for message in request.messages
                if isinstance(message.content, list)
                for part in message.content
            )
        )
        turns: list[tuple[str, str]] = []
        media: list[MediaInput] = []
        for message in request.messages:
            role = {"developer": "system", "tool": "observation"}.get(message.role, message.role)
            # an assistant's earlier calls follow its text, as GLM-4 writes them
            calls = [
                call_text(c.function.name, c.function.arguments) for c in message.tool_calls or []
            ]
            if message.content is None or isinstance(message.content, str):
                turns.append((role, "\n".join([message.content or "", *calls]).strip("\n")))
                continue
            text = ""
            for part in message.content:
                if part.type == "text":
                    text += part.text
                    continue
                if part.type == "file":
                    item = await self.file_media(owner, part.file.file_id)
                    media.append(item)
                    text += f"<{item.kind}>"
                    continue
                if part.type == "image_url":
                    kind, data = "image", await self._media_url(part.image_url.url, "image")
                elif part.type == "video_url":
                    kind, data = "video", await self._media_url(part.video_url.url, "video")
                else:
                    kind, data = "audio", decode_base64(part.input_audio.data, "input_audio.data")
                media.append(MediaInput(kind, data))
                text += f"<{kind}>"
            turns.append((role, "\n".join([text, *calls]).strip("\n")))
        overrides = {
            name: getattr(request, name) for name in SAMPLING_FIELDS if name != "max_tokens"
        }
        overrides["max_tokens"] = request.max_completion_tokens or request.max_tokens
        if isinstance(request.stop, str):
            overrides["stop"] = [request.stop]
        overrides["logprobs"] = (request.top_logprobs or 0) if request.logprobs else None
        definitions = tuple(t.model_dump(exclude_none=True) for t in request.tools or ())
        return ChatInput(
            turns,
            media,
            overrides,
            request_id,
            n=request.n or 1,
            grammar=grammar,
            tools=tools,
            tool_definitions=definitions if tools else (),
        )

    # --- OpenAI legacy completion request -> one ChatInput per prompt ---
    def from_completion(self, request: CompletionRequest, request_id: str) -> list[ChatInput]:
        _refuse_unsupported(
            {
                "best_of": request.best_of not in (None, 1),
                "logit_bias": bool(request.logit_bias),
                "suffix": request.suffix is not None,
            }
        )
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if not prompts:
            raise ServingError("'prompt' is an empty list", 400)
        overrides = {name: getattr(request, name) for name in SAMPLING_FIELDS}
        overrides["echo"] = request.echo  # with logprobs: the prompt's own logprobs too
        if isinstance(request.stop, str):
            overrides["stop"] = [request.stop]
        return [
            ChatInput(
                [],
                [],
                dict(overrides),
                f"{request_id}-p{i}" if i else request_id,
                prompt,
                n=request.n or 1,
            )
            for i, prompt in enumerate(prompts)
        ]

    async def _media_url(self, url: str, kind: str) -> bytes:
        if url.startswith("data:"):
            return data_uri_bytes(url, kind)
        if url.startswith(("http://", "https://")):
            start = time.monotonic()
            data = await self.fetcher.fetch(url)
            elapsed = time.monotonic() - start
            self.metrics.media_fetch.labels(modality=kind).observe(elapsed)
            add_stage(f"{kind}_fetch", elapsed)
            return data
        scheme = url.split(":", 1)[0] if ":" in url else url[:16]
        raise ServingError(f"unsupported {kind} URL scheme '{scheme}': use a data URI", 400)


def _refuse_unsupported(used: dict[str, bool]) -> None:
    for name, is_used in used.items():
        if is_used:
            raise ServingError(f"'{name}' is not supported by this server", 400)
