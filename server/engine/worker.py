"""The engine loop: one thread owns the model and runs continuous batching.

Every iteration:
    1. take in submitted requests and drop cancelled ones (their slots free at once);
    2. admit waiting sequences into free KV slots; encode their media in one batched call per
       encoder (outputs cached by content hash), lay out and embed their prompts;
    3. run the scheduler's plan: compactions, then prefill chunks, oldest sequence first, at
       most `prefill_chunk` positions in all (those of consecutive slots in one forward): a
       burst of short prompts gets its first tokens in one iteration, and a long media prompt
       never stalls the running streams for more than a chunk;
    4. run one decode step for every sequence that is generating, each with its own sampling
       parameters, and stream each new token to its request. The step runs over the slot
       prefix [0, B) (views of the KV cache, no gather; compiled on CUDA), so running sequences
       are kept in the lowest slots (moved down when lower ones free up).
A failure inside a step fails only the requests in that step; the others keep going. The loop
stamps a heartbeat at every iteration: a step that runs past `stall_timeout` marks the engine
as wedged (not alive), so /ready says 503 and the server's watchdog exits for the supervisor.

`EngineLoop` is the loop alone (the engine process runs it, its admission kept on the API
side); `Engine` adds admission control: the engine contract, in this process.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from xllm.model.xllm import XLLM
from xllm.server.engine.admission import AdmissionControl
from xllm.server.engine.config import DEFAULT_MAX_MODEL_LEN, EngineConfig, kv_slots
from xllm.server.engine.contract import EngineObserver, EventSink
from xllm.server.engine.events import (
    EngineRequest,
    ErrorEvent,
    FinishEvent,
    PromptLogprobsEvent,
    RequestHandle,
)
from xllm.server.engine.prefix_cache import PrefixCache
from xllm.server.engine.runner import Failure, ModelRunner
from xllm.server.engine.scheduler import Scheduler
from xllm.server.engine.sequence import Sequence

log = logging.getLogger("xllm.engine")

WORKER_FAILED = "the model worker failed; the request was not completed"


class EngineLoop:
    """The model, its scheduler and the thread that runs them.

    `on_report` is called after every report of the loop's state (after the prompts an
    iteration completes, and at its end): the engine process's transport sends what the
    iteration queued then.
    """

    def __init__(
        self,
        model: XLLM,
        config: EngineConfig,
        observer: EngineObserver | None = None,
        on_report: Callable[[], None] | None = None,
    ) -> None:
        self.model = model
        self.observer = observer or EngineObserver()
        self._on_report = on_report
        wanted = config.max_model_len or min(model.max_model_len, DEFAULT_MAX_MODEL_LEN)
        self.max_model_len = min(wanted, model.max_model_len)
        self.config = config = replace(
            config, max_batch=kv_slots(model, config, self.max_model_len)
        )
        self.runner = ModelRunner(model, config, self.max_model_len, self.observer)
        prefix_cache = PrefixCache(self.max_model_len) if config.prefix_cache else None
        self.scheduler = Scheduler(
            config.max_batch, config.prefill_chunk, prefix_cache=prefix_cache
        )
        self._inbox: queue.Queue[Sequence] = queue.Queue()
        self._unpins: queue.Queue[list[str]] = queue.Queue()
        self._forks: dict[str, list[Sequence]] = {}  # followers taken in before their leader
        self._wake = threading.Event()
        self._exit = False
        self._abort_message: str | None = None
        self._thread: threading.Thread | None = None
        self.dead: BaseException | None = None
        self._heartbeat = time.monotonic()  # start of the loop's latest iteration

    # --- caller side (any thread) ---
    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        """Submitted and not yet running (`Engine`: every request in the system not running)."""
        return len(self.scheduler.waiting) + self._inbox.qsize()

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def kv_cache_bytes(self) -> int:
        return self.runner.slots.bytes

    @property
    def stalled_for(self) -> float:
        """Seconds the loop has spent in its current iteration (0 when it is not running)."""
        if self._thread is None or not self._thread.is_alive():
            return 0.0
        return time.monotonic() - self._heartbeat

    @property
    def running(self) -> bool:
        """The thread runs and has not died."""
        return self._thread is not None and self._thread.is_alive() and self.dead is None

    def submit(self, request: EngineRequest, handle: EventSink, key: int = -1) -> None:
        """Hand a request to the loop; its events arrive on `handle`."""
        self._inbox.put(Sequence(request, handle, key))
        self._wake.set()

    def start(self) -> None:
        self._heartbeat = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="xllm-engine", daemon=True)
        self._thread.start()

    def unpin_media(self, digests: list[str]) -> None:
        """Thread-safe: these encoder outputs return to the LRU (at the next iteration)."""
        self._unpins.put(list(digests))
        self._wake.set()

    def abort_all(self, message: str) -> None:
        """Thread-safe: every queued and running request ends with an error event."""
        self._abort_message = message
        self._wake.set()

    def shutdown(self) -> None:
        self._exit = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # --- loop thread ---
    def _run(self) -> None:
        try:
            while not self._exit:
                self._heartbeat = time.monotonic()
                self._take_in()
                self._unpin()
                self._drop_cancelled()
                if self._abort_message is not None:
                    self._fail_all(self._abort_message)
                    self._abort_message = None
                if not self.scheduler.running and not self.scheduler.waiting:
                    self._report()
                    self._wake.wait(timeout=0.1)
                    self._wake.clear()
                    continue
                self._admit()
                if self._prefill():
                    # The first tokens leave now, not after the decode step (in the engine
                    # process a report sends the events queued so far).
                    self._report()
                self._decode()
                self._report()
        except BaseException as exc:  # the loop must never die silently
            log.exception("model worker died")
            self.dead = exc
            self._fail_all(WORKER_FAILED)
            raise

    def _unpin(self) -> None:
        while not self._unpins.empty():
            for digest in self._unpins.get_nowait():
                self.runner.encoder_cache.unpin(digest)

    def _take_in(self) -> None:
        """Queue the submitted sequences; the followers of a group (submitted before their
        leader) wait with their leader, not on their own."""
        while True:
            try:
                sequence = self._inbox.get_nowait()
            except queue.Empty:
                return
            group = sequence.request.group
            if group is not None and sequence.request.choice > 0:
                self._forks.setdefault(group, []).append(sequence)
                continue
            if group is not None:
                sequence.followers = self._forks.pop(group, [])
                for follower in sequence.followers:
                    follower.leader = sequence
            self.scheduler.add(sequence)

    def _every_sequence(self) -> list[Sequence]:
        """Waiting (followers of waiting leaders included) and running sequences."""
        waiting = self.scheduler.waiting
        followers = [f for s in waiting for f in s.followers]
        parked = [f for group in self._forks.values() for f in group]
        return [*waiting, *followers, *parked, *self.scheduler.running]

    def _drop_cancelled(self) -> None:
        for sequence in self._every_sequence():
            if sequence.handle.cancelled.is_set():
                self._finish(sequence)

    def _finish(self, sequence: Sequence, event: FinishEvent | ErrorEvent | None = None) -> None:
        """End a sequence: with its final event, or with none (cancelled: nobody listens). A
        leader whose prompt was never complete takes its followers with it."""
        self.scheduler.finish(sequence, keep=not isinstance(event, ErrorEvent))
        self._ended(sequence, event)  # before the event: whoever sees the end sees the place free
        if event is not None:
            sequence.handle.push(event)
        for follower in list(sequence.followers):
            if event is None and not follower.handle.cancelled.is_set():
                event = ErrorEvent("the request's first choice was cancelled", 500)
            self._finish(follower, event)
        if sequence.request.group is not None:
            parked = self._forks.get(sequence.request.group, [])
            if sequence in parked:
                parked.remove(sequence)

    def _ended(self, sequence: Sequence, event: FinishEvent | ErrorEvent | None) -> None:
        """A sequence left the loop; `event`, its final one, follows (None: cancelled)."""

    def _fail(self, failure: Failure) -> None:
        if failure.sequences:
            log.log(
                logging.ERROR if failure.status >= 500 else logging.INFO,
                "requests failed",
                extra={
                    "request_ids": [s.request.request_id for s in failure.sequences],
                    "status": failure.status,
                    "error": failure.message,
                },
            )
        for sequence in failure.sequences:
            self._finish(sequence, failure.event)

    def _fail_all(self, message: str) -> None:
        self._take_in()
        self._fail(Failure(self._every_sequence(), message))

    def _admit(self) -> None:
        budget = self.runner.config.max_encoder_batch
        admitted = self.scheduler.admit(budget, lambda s: self.runner.encoder_inputs(s.request))
        if not admitted:
            return
        now = time.monotonic()
        for sequence in admitted:
            request = sequence.request
            queued = now - (request.arrival if request.submitted is None else request.submitted)
            sequence.stages["queue"] = queued
            self.observer.queue_time(queued)
        try:
            encoded = self.runner.encode([s.request for s in admitted])
        except Exception as exc:
            log.exception("media encoding failed")
            self._fail(Failure(admitted, f"media encoding failed: {exc}"))
            return
        laid_out = []
        for sequence, media in zip(admitted, encoded, strict=True):
            try:
                refused = self.runner.lay_out(sequence, media)
            except Exception as exc:
                log.exception("prompt assembly failed")
                self._fail(Failure([sequence], f"prompt assembly failed: {exc}"))
                continue
            if refused is not None:
                self._finish(sequence, refused)
                continue
            self._place(sequence)
            laid_out.append(sequence)
        done = time.monotonic()
        for sequence in laid_out:  # every one waited for the admission's whole encoding
            sequence.stages["encode"] = done - now
            sequence.laid_out_at = done
            for kind in sorted({item.kind for item in sequence.request.media}) or ["text"]:
                self.observer.request_encode(kind, done - now)

    def _place(self, sequence: Sequence) -> None:
        """Prefix reuse: the prompt's positions a slot still holds are not prefilled again."""
        if self.scheduler.prefix_cache is None:
            return
        for copy in self.scheduler.place(sequence):
            self.runner.copy(copy)
        self.observer.prefix_cache(sequence.prompt_len, sequence.cached_tokens)

    def _prefill(self) -> bool:
        """Run the scheduler's plan: its compactions, then its prefill runs, one forward each;
        the prompts they complete get their first token together. A failed forward fails only
        the requests in it. True if a prompt got its first token."""
        plan = self.scheduler.schedule()
        for sequence, old_slot in plan.moves:
            self.runner.move(sequence, old_slot, plan.exchanged.get(sequence.slot, 0))
        written, last = [], {}  # last: per completed prompt, its last position's logits
        for run in plan.prefill_runs:
            try:
                logits = self.runner.prefill(run)
            except Exception as exc:
                log.exception("prefill failed")
                self._fail(Failure([c.sequence for c in run], f"prefill failed: {exc}"))
                continue
            for row, chunk in enumerate(run):
                written.append(chunk)
                if chunk.completes_prompt:
                    last[chunk.sequence] = logits[row : row + 1]
        completed = self.scheduler.update(plan, written)
        rows = []
        for sequence in completed:
            if sequence.leader is not None:  # a follower: its leader's K/V and first logits
                self.runner.fork(sequence, sequence.leader)
                rows.append(last[sequence.leader])
                sequence.leader = None
            else:
                rows.append(last[sequence])
            if sequence.scores_prompt:
                sequence.handle.push(PromptLogprobsEvent(tuple(sequence.prompt_entries)))
            sequence.embeds = None
        if completed:
            self._sample(completed, self.runner.constrain(completed, torch.cat(rows)))
        return bool(completed)

    def _decode(self) -> None:
        batch = self.scheduler.decode_batch()
        if not batch:
            return
        try:
            logits = self.runner.decode(batch)
        except Exception as exc:
            log.exception("decode step failed")
            self._fail(Failure(batch, f"decode step failed: {exc}"))
            return
        self.scheduler.update_decoded(batch)
        self._sample(batch, logits)

    def _sample(self, batch: list[Sequence], logits: torch.Tensor) -> None:
        """Sample one token per row of logits (B, V) and stream it to its request."""
        outcome = self.runner.sample(batch, logits)
        for failure in outcome.failures:
            self._fail(failure)
        for sequence, event in outcome.events:
            if isinstance(event, FinishEvent):
                self._finish(sequence, event)
            else:
                sequence.handle.push(event)

    def _report(self) -> None:
        capacity = self.config.max_batch * self.max_model_len
        usage = self.scheduler.used_positions / capacity
        self.observer.step(self.num_running, self.num_waiting, usage)
        if self._on_report is not None:
            self._on_report()


class Engine(AdmissionControl, EngineLoop):
    """The engine in a thread of this process: the loop behind admission control."""

    def __init__(
        self, model: XLLM, config: EngineConfig, observer: EngineObserver | None = None
    ) -> None:
        AdmissionControl.__init__(self)
        EngineLoop.__init__(self, model, config, observer)

    @property
    def pid(self) -> int:
        return os.getpid()

    @property
    def alive(self) -> bool:
        return self.running and not self.wedged

    def submit(self, request: EngineRequest, handle: RequestHandle) -> None:  # type: ignore[override]
        """Hand a reserved request to the loop; its events arrive on `handle`."""
        EngineLoop.submit(self, request, handle, self.track(handle))

    def _ended(self, sequence: Sequence, event: FinishEvent | ErrorEvent | None) -> None:
        self.settle(sequence.key)

    def shutdown(self) -> None:
        self._stopping = True
        EngineLoop.shutdown(self)
