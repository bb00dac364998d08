"""What goes into the engine (EngineRequest) and what comes out (events), free of HTTP."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from xllm.model.generate import SamplingParams
from xllm.model.prompt import Message
from xllm.model.xllm import PreparedMedia


@dataclass
class EngineRequest:
    request_id: str
    messages: list[Message]
    media: list[PreparedMedia]
    params: SamplingParams
    max_tokens_given: bool  # False: max_tokens = rest of the context, capped by the default
    arrival: float = field(default_factory=time.monotonic)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class TokenEvent:
    text: str  # may be empty (a token that completes no character yet, or held for stop strings)
    token: int


@dataclass
class FinishEvent:
    finish_reason: str  # "stop" | "length"
    text: str  # the final text delta (held text flushed at the end), possibly empty
    usage: Usage


@dataclass
class ErrorEvent:
    message: str
    status: int  # HTTP-style status for the serving layer: 400 client input, 500 engine fault
    type: str = "server_error"


Event = TokenEvent | FinishEvent | ErrorEvent


class RequestHandle:
    """The caller's side of a submitted request: an async stream of events, and cancellation."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.first_token_at: float | None = None

    def push(self, event: Event) -> None:
        """Thread-safe: called from the engine thread."""
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def next_event(self) -> Event:
        return await self._events.get()

    def cancel(self) -> None:
        self.cancelled.set()
