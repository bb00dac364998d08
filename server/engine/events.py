"""What goes into the engine (EngineRequest) and what comes out (events), free of HTTP."""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

from xllm.model.prompt import Message
from xllm.model.sampling import SamplingParams
from xllm.model.xllm import PreparedMedia


@dataclass
class EngineRequest:
    request_id: str
    messages: list[Message]
    media: list[PreparedMedia]
    params: SamplingParams
    # False: max_tokens is the default (--default-max-tokens, else the model's), capped by the
    # context
    max_tokens_given: bool
    arrival: float = field(default_factory=time.monotonic)
    prompt: str | None = None  # raw text, no chat template (/v1/completions); messages unused
    # k: the prompt tokens' own logprobs (k alternatives each), in a PromptLogprobsEvent first
    prompt_logprobs: int | None = None
    # The n choices of one prompt (OpenAI's `n`) are n requests of one group: choice 0 prefills
    # the prompt once, the others copy its K/V into their own slots and sample on their own.
    # They are submitted together, choice 0 last.
    group: str | None = None
    choice: int = 0
    # structured outputs: the grammar (model/grammar.py) every choice's text must match
    grammar: str | None = None
    # OpenAI's tool definitions, laid out by a chat template that renders tools; with
    # tools_in_prompt the request needs that (tool_choice "auto": the model must see them)
    tools: tuple[dict, ...] = ()
    tools_in_prompt: bool = False
    # digests of media whose encoder outputs stay until released (media handles' encodings)
    pinned: tuple[str, ...] = ()
    # when it was handed to the engine, its media prepared (None: at arrival); its queue wait
    # is measured from here
    submitted: float | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt positions whose K/V were reused, not computed (prefix reuse)
    # prompt positions filled by media embeddings, by the kind of their span ("image", "audio",
    # "video"; a video's sound track counts as audio)
    media_tokens: dict[str, int] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        """The usage of two requests together (the choices of one reply)."""
        media = dict(self.media_tokens)
        for kind, count in other.media_tokens.items():
            media[kind] = media.get(kind, 0) + count
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.cached_tokens + other.cached_tokens,
            media,
        )


class TokenLogprobs(NamedTuple):
    """A generated token's logprob and its most likely alternatives', for a request that asked
    (params.logprobs). Tuples of bytes and floats: it crosses the engine process's pipe."""

    token: bytes  # the token's bytes (see TokenBytes)
    logprob: float | None  # None: a prompt's first token (nothing before it scores it)
    top: tuple[tuple[bytes, float], ...]  # (bytes, logprob), most likely first


@dataclass
class TokenEvent:
    text: str  # may be empty (a token that completes no character yet, or held for stop strings)
    token: int
    logprobs: TokenLogprobs | None = None  # only when the request asked


@dataclass
class FinishEvent:
    finish_reason: str  # "stop" | "length"
    text: str  # the final text delta (held text flushed at the end), possibly empty
    usage: Usage
    logprobs: TokenLogprobs | None = None  # the last token's, when the request asked
    token: int | None = None  # the last token (an EOS too)
    # seconds of the request's stages in the engine: queue, encode, prefill, first_token, decode
    stages: dict[str, float] = field(default_factory=dict)


@dataclass
class PromptLogprobsEvent:
    """The prompt tokens' logprobs (one per prompt token), before the first token's event; only
    for a request with prompt_logprobs."""

    entries: tuple[TokenLogprobs, ...]


@dataclass
class ErrorEvent:
    message: str
    status: int  # HTTP-style status for the serving layer: 400 client input, 500 engine fault
    type: str = "server_error"


Event = TokenEvent | FinishEvent | ErrorEvent | PromptLogprobsEvent


class LoopMailbox:
    """Delivers events from the engine thread to one event loop, one wake-up per burst.

    A decode step produces one event per running sequence; waking the loop once per event
    (call_soon_threadsafe each) would cost the engine thread dearly (docs/PERFORMANCE.md).
    Events posted while a delivery is pending join it instead.
    """

    _by_loop: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopMailbox]] = (
        weakref.WeakKeyDictionary()
    )
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[Event], Event]] = []

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> LoopMailbox:
        with cls._registry_lock:
            mailbox = cls._by_loop.get(loop)
            if mailbox is None:
                mailbox = cls._by_loop[loop] = cls(loop)
            return mailbox

    def post(self, queue: asyncio.Queue[Event], event: Event) -> None:
        """Thread-safe."""
        with self._lock:
            first = not self._pending
            self._pending.append((queue, event))
        if first:
            self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        for queue, event in batch:
            queue.put_nowait(event)


class RequestHandle:
    """The caller's side of a submitted request: an async stream of events, and cancellation."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self._mailbox = LoopMailbox.of(loop)
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()
        self._cancel_callbacks: list[Callable[[], None]] = []

    def push(self, event: Event) -> None:
        """Thread-safe: called from the engine thread."""
        self._mailbox.post(self._events, event)

    async def next_event(self) -> Event:
        return await self._events.get()

    def ready_events(self) -> list[Event]:
        """The events already delivered and not yet taken (without waiting)."""
        ready = []
        while not self._events.empty():
            ready.append(self._events.get_nowait())
        return ready

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Call `callback` (once) when the request is cancelled: an engine elsewhere hears of it."""
        self._cancel_callbacks.append(callback)

    def cancel(self) -> None:
        if self.cancelled.is_set():
            return
        self.cancelled.set()
        for callback in self._cancel_callbacks:
            callback()
