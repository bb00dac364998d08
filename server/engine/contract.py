"""The engine contract: what the serving layer, the app and the health routes may ask of an
engine, whether it runs in a thread of this process (`Engine`) or in a process of its own
(`EngineProcess`).

A request's life through it: `reserve()` a place (EngineFull: 429, EngineUnavailable: 503)
before its media are decoded, then `submit()` it with a handle, or `release()` the place if it
never comes; its events arrive on the handle, the last one a FinishEvent or an ErrorEvent, and
the place is given back before that last event is delivered.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from xllm.server.engine.config import EngineConfig
    from xllm.server.engine.events import EngineRequest, Event, RequestHandle


class EventSink(Protocol):
    """Where the engine sends one request's events and reads whether it was cancelled: the
    caller's `RequestHandle`, or in the engine process the pipe's stand-in for it."""

    cancelled: threading.Event

    def push(self, event: Event) -> None: ...


class EngineObserver:
    """Hooks for metrics; the default does nothing."""

    def queue_time(self, seconds: float) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def encoder_time(self, modality: str, seconds: float) -> None: ...
    def request_encode(self, modality: str, seconds: float) -> None:
        """One request's admission to its prompt laid out: its media encoded (or found in the
        encoder cache) and the prompt embedded; `modality` "text" for a request without media."""

    def request_prefill(self, seconds: float) -> None:
        """One request's prompt laid out to its first token."""

    def request_decode(self, seconds: float) -> None:
        """One request's first token to its last."""

    def prefill(self, positions: int) -> None:
        """A prefill forward computed the K/V of `positions` prompt positions."""

    def request_done(self, seconds: float) -> None: ...
    def tokens(self, prompt: int, generated: int) -> None: ...
    def prefix_cache(self, queried: int, hit: int) -> None:
        """A prompt of `queried` positions looked up in the KV cache, `hit` of them found."""

    def step(self, running: int, waiting: int, kv_usage: float) -> None: ...


class EngineClient(Protocol):
    """An engine as its callers see it; thread-safe throughout."""

    config: EngineConfig  # as the engine settled it (KV slots fitted to memory), once started
    max_model_len: int  # positions per KV slot (prompt + generated)
    dead: BaseException | None  # why the engine died, if it has

    @property
    def kv_cache_bytes(self) -> int: ...
    @property
    def pid(self) -> int | None:
        """The process the model runs in."""
        ...

    # --- state ---
    @property
    def started(self) -> bool: ...
    @property
    def alive(self) -> bool:
        """Started, not dead and not wedged."""
        ...

    @property
    def wedged(self) -> bool:
        """Alive, but one iteration has run past `config.stall_timeout` (a hang)."""
        ...

    @property
    def stalled_for(self) -> float:
        """Seconds the engine has spent in its current iteration."""
        ...

    @property
    def capacity(self) -> int: ...
    @property
    def num_in_system(self) -> int: ...
    @property
    def num_running(self) -> int: ...
    @property
    def num_waiting(self) -> int: ...

    # --- requests ---
    def reserve(self) -> None: ...
    def release(self) -> None: ...
    def submit(self, request: EngineRequest, handle: RequestHandle) -> None: ...

    # --- lifecycle ---
    def start(self) -> None: ...
    def stop_intake(self) -> None: ...
    def join(self, timeout: float | None) -> bool:
        """Wait for the requests in the system to end; True when they all did."""
        ...

    def abort_all(self, message: str) -> None:
        """Every queued and running request ends with an error event (from the engine)."""
        ...

    def unpin_media(self, digests: list[str]) -> None:
        """Media handles are gone: their encoder outputs return to the LRU cache."""
        ...

    def abandon(self, message: str) -> None:
        """For a wedged engine: end every request in flight here, without waiting for it."""
        ...

    def shutdown(self) -> None: ...
