"""The engine in its own process: the model loop gets a core and an interpreter of its own.

In one process the event loop (HTTP, SSE) and the model loop serialise on the GIL, and the
server cannot use the cores it has (docs/PERFORMANCE.md). Here the child process runs
the same `EngineLoop` as the in-process `Engine`; this side keeps the admission control (the
only count of requests in the system) and every request's handle. Each side queues its messages
and writes what has piled up as one list, from the thread that posts (`_Outbox`); a reader
thread on each side drains the pipe:

    API process (EngineProcess)                      engine process (_engine_main)
    submit ------------ ("submit", key, request) --> loop.submit()
    handle.cancel() --- ("cancel", key) -----------> that request's cancelled flag
    place given back <- ("dropped", key) ----------- the loop dropped the cancelled request
    abort_all / shutdown --------------------------> the same on the engine
    handles, metrics <- ("event", key, event) ------ the engine's events, and its observer calls
                        ("observe", name, args)      (metric samples), in order; the loop's
                                                     report ends an iteration and sends its
                                                     events as one message
    wedged / stalled_for <- a shared double: the start of the engine's current iteration

Requests are keyed by a sequence number (X-Request-ID values come from clients and may repeat).
If the child dies, every request in flight ends with an error event and `dead` is set, as when
the worker thread of an in-process `Engine` dies.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xllm.model.config import ModelConfigError
from xllm.server.engine.admission import AdmissionControl
from xllm.server.engine.config import EngineConfig
from xllm.server.engine.contract import EngineObserver
from xllm.server.engine.events import (
    EngineRequest,
    ErrorEvent,
    Event,
    FinishEvent,
    RequestHandle,
)
from xllm.server.engine.sequence import Sequence
from xllm.server.engine.worker import WORKER_FAILED, EngineLoop

log = logging.getLogger("xllm.engine")

Connection = multiprocessing.connection.Connection
OBSERVER_METHODS = frozenset(name for name in vars(EngineObserver) if not name.startswith("_"))
HEARTBEAT_INTERVAL = 0.05  # seconds between the child's heartbeat stamps


class EngineLoadError(Exception):
    """The engine process could not load the model (the message says why)."""


@dataclass
class EngineSpec:
    """What the engine process needs to load the model and run the engine (picklable)."""

    model_dir: Path
    device: str
    dtype: str
    quantize: str
    config: EngineConfig
    torch_threads: int | None  # intra-op threads on the CPU; None: torch's default
    log_format: str


class EngineProcess(AdmissionControl):
    """An `EngineLoop` in a child process, behind the engine contract (contract.py)."""

    def __init__(self, spec: EngineSpec, observer: EngineObserver | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.config = spec.config
        self.observer = observer or EngineObserver()
        self.max_model_len = 0  # known once the child has loaded the model
        self.kv_cache_bytes = 0
        self.dead: BaseException | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._outbox: _Outbox | None = None
        self._heartbeat: Any = None  # multiprocessing.Value("d"): monotonic seconds
        self._running = 0  # as of the engine's latest step report
        self._closing = False

    # --- lifecycle ---
    def start(self) -> None:
        """Start the child and wait until its model is loaded; if it is not, ModelConfigError
        (a model directory or part the user must fix) or EngineLoadError."""
        # Not fork: this process has threads (and may have touched CUDA). `xllm serve` starts the
        # fork server early, with the engine's modules imported (server/cli.py).
        context = multiprocessing.get_context("forkserver")
        self._heartbeat = context.Value("d", time.monotonic(), lock=False)
        conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=_engine_main,
            args=(self.spec, child_conn, self._heartbeat),
            name="xllm-engine",
        )
        self._process.start()
        child_conn.close()
        self._conn = conn
        self._outbox = _Outbox(conn)
        try:
            kind, payload = self._receive_until_loaded(conn)
        except EOFError:
            self._process.join(5)
            raise EngineLoadError(
                f"the engine process exited while loading the model (exit code "
                f"{self._process.exitcode})"
            ) from None
        if kind == "failed":
            self._process.join(5)
            message, config_error = payload
            raise (ModelConfigError if config_error else EngineLoadError)(message)
        self.config = payload["config"]
        self.max_model_len = payload["max_model_len"]
        self.kv_cache_bytes = payload["kv_cache_bytes"]
        threading.Thread(target=self._read, name="xllm-engine-events", daemon=True).start()

    def _receive_until_loaded(self, conn: Connection) -> tuple[str, Any]:
        """Deliver the engine's first reports (metrics) until it says "ready" or "failed"."""
        while True:
            for item in conn.recv():
                if item[0] in ("ready", "failed"):
                    return item
                self._deliver(item)

    @property
    def started(self) -> bool:
        return self._process is not None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def abort_all(self, message: str) -> None:
        self._send(("abort_all", message))

    def unpin_media(self, digests: list[str]) -> None:
        self._send(("unpin", digests))

    def shutdown(self) -> None:
        wedged = self.wedged
        self._stopping = self._closing = True
        process = self._process
        if process is None:
            return
        if not wedged:
            self._send(("shutdown",))
            process.join(10)
        if process.is_alive():  # wedged: it cannot answer, so it cannot finish either
            process.kill()
            process.join(5)

    # --- state ---
    @property
    def num_running(self) -> int:
        return self._running

    @property
    def stalled_for(self) -> float:
        """Seconds the engine has spent in its current iteration (0 when it is not running)."""
        if self._process is None or self.dead is not None or self._closing:
            return 0.0
        return max(0.0, time.monotonic() - self._heartbeat.value)

    @property
    def alive(self) -> bool:
        # No waitpid here (it runs for every request): a child that exits closes its end of the
        # pipe, and the reader thread then sets `dead`.
        return self._process is not None and self.dead is None and not self.wedged

    # --- requests ---
    def submit(self, request: EngineRequest, handle: RequestHandle) -> None:
        """Hand a reserved request to the engine process; its events arrive on `handle`."""
        key = self.track(handle)
        handle.on_cancel(lambda: self._send(("cancel", key)))
        self._send(("submit", key, request))

    def _send(self, message: tuple) -> None:
        """Send a command to the engine (one pipe write; the engine's reader thread drains the
        pipe at once, so the write does not wait on the engine's iteration)."""
        if self._outbox is not None:
            self._outbox.post(message)

    def _read(self) -> None:
        """Deliver the child's bursts of events until the pipe closes."""
        assert self._conn is not None
        try:
            while True:
                for item in self._conn.recv():
                    self._deliver(item)
        except (EOFError, OSError):
            if not self._closing:
                code = self._process.exitcode if self._process is not None else None
                self._died(RuntimeError(f"the engine process exited (exit code {code})"))

    def _deliver(self, item: tuple) -> None:
        kind = item[0]
        if kind == "observe":
            _, name, args = item
            if name == "step":
                self._running = args[0]
            if name in OBSERVER_METHODS:
                getattr(self.observer, name)(*args)
        elif kind == "event":
            _, key, event = item
            final = isinstance(event, (FinishEvent, ErrorEvent))
            handle = self.settle(key) if final else self.handle(key)
            if handle is not None:
                handle.push(event)
        elif kind == "dropped":  # cancelled: no final event comes
            self.settle(item[1])
        elif kind == "dead":
            self._died(RuntimeError(item[1]))

    def _died(self, error: BaseException) -> None:
        if self.dead is None:
            log.error("model worker died", extra={"error": str(error)})
            self.dead = error
        self.end_all(ErrorEvent(WORKER_FAILED, 500))


# --- the engine process ---
class _Outbox:
    """One direction of the pipe: messages queue until a post that wakes (or a flush) sends
    everything queued as one list, from the calling thread, so a decode step's events for every
    running sequence travel together. There is no sender thread: waking one would cost each
    message a GIL hand-over between the threads (docs/PERFORMANCE.md, "The pipe's writes"),
    while a pipe write of one list is a single system call."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()  # one writer at a time; keeps the messages in order
        self._items: list[tuple] = []

    def post(self, item: tuple, *, wake: bool = True) -> None:
        """Queue an item and, unless wake=False, send the queue now (the engine's events wait
        for the loop's report, `flush`, so a step costs one write, not one per row)."""
        with self._lock:
            self._items.append(item)
        if wake:
            self.flush()

    def flush(self) -> None:
        """Send what is queued now, from the calling thread."""
        with self._lock:
            items, self._items = self._items, []
            if not items:
                return
            with contextlib.suppress(OSError, ValueError):  # the other side is gone: its reader
                self._conn.send(items)  # reports that (EOF), so nothing waits on this send


class _ChildHandle:
    """The engine's view of a request in the child: push() forwards, cancel arrives by pipe."""

    def __init__(self, key: int, outbox: _Outbox, on_final: Callable[[int], None]) -> None:
        self.key = key
        self.cancelled = threading.Event()
        self._outbox = outbox
        self._on_final = on_final

    def push(self, event: Event) -> None:
        """From the loop thread: sent by the flush after the loop's next report, which follows
        every push."""
        if isinstance(event, (FinishEvent, ErrorEvent)):
            self._on_final(self.key)
        self._outbox.post(("event", self.key, event), wake=False)

    def dropped(self) -> None:
        """The loop dropped the cancelled request: the API side gives its place back."""
        self._on_final(self.key)
        self._outbox.post(("dropped", self.key), wake=False)


class _ChildLoop(EngineLoop):
    """The loop in the engine process: a request it ends without an event (cancelled) is
    reported, since the API side counts the request's place until it hears of its end."""

    def _ended(self, sequence: Sequence, event: FinishEvent | ErrorEvent | None) -> None:
        if event is None:
            assert isinstance(sequence.handle, _ChildHandle)
            sequence.handle.dropped()


class _ForwardingObserver(EngineObserver):
    """Queues every observer call for the API process, where the metrics live; they travel with
    the iteration's events, at the loop's report (`on_report` flushes the outbox)."""

    def __init__(self, outbox: _Outbox) -> None:
        self._outbox = outbox

    def _forward(self, name: str, *args: Any) -> None:
        self._outbox.post(("observe", name, args), wake=False)

    def queue_time(self, seconds: float) -> None:
        self._forward("queue_time", seconds)

    def first_token(self, seconds: float) -> None:
        self._forward("first_token", seconds)

    def inter_token(self, seconds: float) -> None:
        self._forward("inter_token", seconds)

    def encoder_time(self, modality: str, seconds: float) -> None:
        self._forward("encoder_time", modality, seconds)

    def request_encode(self, modality: str, seconds: float) -> None:
        self._forward("request_encode", modality, seconds)

    def request_prefill(self, seconds: float) -> None:
        self._forward("request_prefill", seconds)

    def request_decode(self, seconds: float) -> None:
        self._forward("request_decode", seconds)

    def prefill(self, positions: int) -> None:
        self._forward("prefill", positions)

    def request_done(self, seconds: float) -> None:
        self._forward("request_done", seconds)

    def tokens(self, prompt: int, generated: int) -> None:
        self._forward("tokens", prompt, generated)

    def prefix_cache(self, queried: int, hit: int) -> None:
        self._forward("prefix_cache", queried, hit)

    def step(self, running: int, waiting: int, kv_usage: float) -> None:
        self._forward("step", running, waiting, kv_usage)


def _engine_main(spec: EngineSpec, conn: Connection, heartbeat: Any) -> None:
    """Entry point of the engine process: load the model, run the engine, obey the pipe."""
    from xllm.server.logs import setup_logging

    setup_logging(spec.log_format)
    # Ctrl-C and SIGTERM reach the whole process group: the API process decides when the engine
    # stops (after draining) and tells it over the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    outbox = _Outbox(conn)
    try:
        engine = _load_engine(spec, outbox)
    except ModelConfigError as exc:  # the user's to fix, and the message says how
        log.error("model failed to load: %s", exc)
        outbox.post(("failed", (str(exc), True)))
        return
    except Exception as exc:
        log.exception("model failed to load")
        outbox.post(("failed", (str(exc), False)))
        return
    handles: dict[int, _ChildHandle] = {}
    engine.start()
    outbox.post(
        (
            "ready",
            {
                "config": engine.config,  # as the engine settled it (KV slots from GPU memory)
                "max_model_len": engine.max_model_len,
                "kv_cache_bytes": engine.kv_cache_bytes,
            },
        )
    )
    threading.Thread(target=_stamp_heartbeat, args=(engine, heartbeat, outbox), daemon=True).start()
    try:
        while _obey(conn.recv(), engine, handles, outbox):
            pass
    except (EOFError, OSError):  # the API process is gone
        pass
    engine.shutdown()
    outbox.flush()


def _obey(
    commands: list[tuple], engine: EngineLoop, handles: dict[int, _ChildHandle], outbox: _Outbox
) -> bool:
    """Apply a burst of commands from the API process; False once told to shut down."""
    for command in commands:
        kind = command[0]
        if kind == "submit":
            _, key, request = command
            handle = handles[key] = _ChildHandle(key, outbox, lambda k: handles.pop(k, None))
            engine.submit(request, handle)
        elif kind == "cancel":
            handle = handles.get(command[1])
            if handle is not None:
                handle.cancelled.set()
        elif kind == "abort_all":
            engine.abort_all(command[1])
        elif kind == "unpin":
            engine.unpin_media(command[1])
        elif kind == "shutdown":
            return False
    return True


def _load_engine(spec: EngineSpec, outbox: _Outbox) -> _ChildLoop:
    import torch

    from xllm.model.checkpoint import load_model

    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    model = load_model(
        spec.model_dir,
        device=spec.device,
        dtype=spec.dtype,
        quantize=spec.quantize,  # type: ignore[arg-type]
    )
    return _ChildLoop(model, spec.config, _ForwardingObserver(outbox), on_report=outbox.flush)


def _stamp_heartbeat(engine: EngineLoop, heartbeat: Any, outbox: _Outbox) -> None:
    """Publish the start of the engine's current iteration; report a dead engine once."""
    while True:
        heartbeat.value = time.monotonic() - engine.stalled_for
        if engine.dead is not None:
            outbox.post(("dead", f"the model worker died: {engine.dead!r}"))
            return
        time.sleep(HEARTBEAT_INTERVAL)
