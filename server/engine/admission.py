"""Admission control, the one count of requests in the system: places claimed before a
request's media are decoded, intake that stops for a drain, the liveness checks that turn
requests away when the engine is down, and the handles of the requests in flight (to end them
all at once when the engine cannot).

Both engines keep it on the caller's side (the engine process does not count again): `Engine`
and `EngineProcess` inherit it and provide `config`, `dead`, `started`, `alive`, `stalled_for`
and `num_running`.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import TYPE_CHECKING

from xllm.server.engine.events import ErrorEvent, Event

if TYPE_CHECKING:
    from xllm.server.engine.config import EngineConfig
    from xllm.server.engine.contract import EventSink


class EngineFull(Exception):
    """Queue full: the caller should answer 429 with Retry-After."""


class EngineUnavailable(Exception):
    """Stopped, draining or dead: the caller should answer 503."""


class AdmissionControl:
    config: EngineConfig
    dead: BaseException | None

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_system = 0  # places claimed and not yet given back (waiting or running)
        self._stopping = False
        self._in_flight: dict[int, EventSink] = {}  # submitted, no final event yet
        self._keys = itertools.count()  # handle keys (X-Request-ID values may repeat)

    if TYPE_CHECKING:  # provided by the engine

        @property
        def started(self) -> bool: ...
        @property
        def alive(self) -> bool: ...
        @property
        def stalled_for(self) -> float: ...
        @property
        def num_running(self) -> int: ...

    @property
    def capacity(self) -> int:
        return self.config.max_batch + self.config.max_queue

    @property
    def num_in_system(self) -> int:
        return self._in_system

    @property
    def num_waiting(self) -> int:
        return max(0, self._in_system - self.num_running)

    @property
    def wedged(self) -> bool:
        limit = self.config.stall_timeout
        return bool(limit) and self.stalled_for > limit

    def reserve(self) -> None:
        """Claim a place before the (slow) media decoding; release() if the request never comes."""
        with self._lock:
            if self._stopping:
                raise EngineUnavailable("the server is shutting down")
            # Before start() requests may queue; once started, a dead engine takes none.
            if self.dead is not None or (self.started and not self.alive):
                raise EngineUnavailable(
                    "the model worker is not responding"
                    if self.wedged
                    else "the model worker is not running"
                )
            if self._in_system >= self.capacity:
                raise EngineFull(
                    f"{self._in_system} requests are queued or running; try again shortly"
                )
            self._in_system += 1

    def release(self) -> None:
        with self._lock:
            self._in_system -= 1

    def track(self, handle: EventSink) -> int:
        """A reserved request is submitted: its handle is in flight until `settle`; its key."""
        key = next(self._keys)
        with self._lock:
            self._in_flight[key] = handle
        return key

    def handle(self, key: int) -> EventSink | None:
        return self._in_flight.get(key)

    def settle(self, key: int) -> EventSink | None:
        """The request's final event is about to be delivered: give its place back first (whoever
        sees the end also sees the place released). None if it had ended already (abandoned)."""
        with self._lock:
            handle = self._in_flight.pop(key, None)
            if handle is not None:
                self._in_system -= 1
        return handle

    def end_all(self, event: Event) -> None:
        """End every request in flight here with `event` (the engine cannot: dead or hung)."""
        with self._lock:
            handles, self._in_flight = list(self._in_flight.values()), {}
            self._in_system -= len(handles)
        for handle in handles:
            handle.push(event)

    def abandon(self, message: str) -> None:
        """For a wedged engine: it cannot be interrupted, so its requests are answered from
        outside; should it come back, the events it still sends go to requests already ended."""
        self.end_all(ErrorEvent(message, 503, "unavailable"))

    def stop_intake(self) -> None:
        with self._lock:
            self._stopping = True

    def join(self, timeout: float | None) -> bool:
        """Wait for running work to end (intake stopped first); True when it all finished."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._in_system > 0 and self.alive:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True
