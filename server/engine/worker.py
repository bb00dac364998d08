"""The model worker: one thread owns the model and runs continuous batching.

Every iteration:
    1. take in submitted requests and drop cancelled ones (their slots free at once);
    2. admit waiting requests into free KV slots; encode their media in one batched call per
       encoder (outputs cached by content hash), lay out and embed their prompts;
    3. run prefill chunks, oldest request first, at most `prefill_chunk` positions in all (those
       of consecutive slots in one forward): a burst of short prompts gets its first tokens in
       one iteration, and a long media prompt never stalls the running streams for more than a
       chunk;
    4. run one decode step for every sequence that is generating, each with its own sampling
       parameters, and stream each new token to its request. The step runs over the slot
       prefix [0, B) (views of the KV cache, no gather; compiled on CUDA), so running sequences
       are kept in the lowest slots (moved down when lower ones free up and nobody waits).
A failure inside a step fails only the requests in that step; the others keep going. The worker
stamps a heartbeat at every iteration: a step that runs past `stall_timeout` marks the worker as
wedged (not alive), so /ready says 503 and the server's watchdog exits for the supervisor.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from xllm.model.detokenize import IncrementalDetokenizer, SequenceState, TokenBytes, eos_token_ids
from xllm.model.generate import CompileOptions, SlotDecoder, prefill_rows
from xllm.model.kv_cache import SlotKVCache, kv_bytes_per_position
from xllm.model.prompt import PromptLayout
from xllm.model.sampling import Sampled, SampledLogprobs, make_generator, prompt_logprobs, sample
from xllm.model.xllm import XLLM, EncodedMedia
from xllm.server.engine.encoder_cache import EncoderCache
from xllm.server.engine.events import (
    EngineRequest,
    ErrorEvent,
    FinishEvent,
    PromptLogprobsEvent,
    RequestHandle,
    TokenEvent,
    TokenLogprobs,
    Usage,
)
from xllm.server.engine.scheduler import Phase, Scheduled, Scheduler

log = logging.getLogger("xllm.engine")


DEFAULT_MAX_MODEL_LEN = 8192


@dataclass
class EngineConfig:
    max_batch: int = 32  # sequences decoding together (= KV slots)
    max_queue: int = 64  # requests waiting beyond those
    # Positions per slot; default: the model's context, capped at DEFAULT_MAX_MODEL_LEN because
    # slots are preallocated (GLM-4-9B's 128k context x 32 slots would be ~170 GB of KV cache).
    max_model_len: int | None = None
    prefill_chunk: int = 512
    default_max_tokens: int = 512
    encoder_cache_mb: int = 256
    stall_timeout: float | None = None  # seconds one iteration may take before "wedged"; None: off
    # torch.compile the decode step (static shapes per batch and kv-length bucket; CUDA graphs
    # on CUDA); None: on for CUDA, off for the CPU (inductor's compile time is not repaid there)
    compile: bool | None = None
    compile_backend: str = "inductor"  # tests check the bucketing with "aot_eager"
    # On CUDA: the share of the GPU's memory this server may use (weights, activations and KV
    # cache, like vLLM); the KV slots are sized from it, at most max_batch. None: max_batch slots.
    gpu_memory_utilization: float | None = None
    # Bytes the KV cache may take; the slots (at most max_batch) are sized from it. None: on the
    # CPU, CPU_KV_SHARE of the memory available at start-up; on CUDA, max_batch slots (or
    # gpu_memory_utilization's share).
    kv_cache_memory_bytes: int | None = None


# A CPU server's default KV budget, as a share of MemAvailable: weights, activations, media and
# the API process live in the rest.
CPU_KV_SHARE = 0.25


def available_memory_bytes() -> int:
    """MemAvailable of /proc/meminfo (Linux); elsewhere the physical memory as os.sysconf has it."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def slots_for_budget(budget_bytes: int, slot_bytes: int, what: str) -> int:
    """Whole KV slots in `budget_bytes`; ValueError naming `what` set the budget when none fits."""
    slots = max(budget_bytes, 0) // slot_bytes
    if slots < 1:
        raise ValueError(
            f"{what} leaves {budget_bytes / 2**30:.2f} GiB for the KV cache, less than one slot "
            f"({slot_bytes / 2**30:.2f} GiB): give it more memory or lower max_model_len"
        )
    return slots


# Outside the KV cache: the CUDA context's workspaces, cuBLAS and CUDA-graph pools (estimate).
WORKSPACE_RESERVE_BYTES = 512 * 2**20


def slots_for_memory(
    *, free_bytes: int, total_bytes: int, utilization: float, slot_bytes: int, reserve_bytes: int
) -> int:
    """KV slots that fit this server's share of the GPU (vLLM's --gpu-memory-utilization).

    The share is utilization x total memory; what is in use already (the loaded model, other
    processes: total - free) and the activation reserve come off it; whole slots fill the rest.
    Raises ValueError when not even one slot fits.
    """
    budget = int(utilization * total_bytes) - (total_bytes - free_bytes) - reserve_bytes
    return slots_for_budget(budget, slot_bytes, f"gpu_memory_utilization {utilization:g}")


def activation_reserve_bytes(llm: torch.nn.Module, prefill_chunk: int, max_batch: int) -> int:
    """Peak memory besides weights and KV cache, roughly: one prefill chunk's hidden and MLP
    tensors and the decode step's float32 logits with their copies in sampling."""
    config = llm.config.get_text_config()  # type: ignore[operator]
    chunk = prefill_chunk * (4 * config.hidden_size + 3 * config.intermediate_size) * 4
    logits = 4 * max_batch * config.vocab_size * 4
    return chunk + logits + WORKSPACE_RESERVE_BYTES


class EngineFull(Exception):
    """Queue full: the caller should answer 429 with Retry-After."""


class EngineUnavailable(Exception):
    """Stopped, draining or dead: the caller should answer 503."""


class EngineObserver:
    """Hooks for metrics; the default does nothing."""

    def queue_time(self, seconds: float) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def encoder_time(self, modality: str, seconds: float) -> None: ...
    def request_done(self, seconds: float) -> None: ...
    def tokens(self, prompt: int, generated: int) -> None: ...
    def step(self, running: int, waiting: int, kv_usage: float) -> None: ...


@dataclass
class Job:
    """Per-request state inside the worker."""

    request: EngineRequest
    handle: RequestHandle
    state: SequenceState | None = None
    embeds: torch.Tensor | None = None  # (L, H) prompt embeddings until prefill is done
    generator: torch.Generator | None = None
    next_token: int | None = None  # sampled, not yet written into the cache
    last_token_at: float = 0.0
    # request.prompt_logprobs only: the prompt's ids and its tokens' logprobs so far
    prompt_ids: list[int] | None = None
    prompt_entries: list[TokenLogprobs] = field(default_factory=list)


class AdmissionControl:
    """The caller's side shared by the in-process engine and the engine process: places (queued
    or running requests) claimed before a request's media are decoded, intake that stops for a
    drain, and the liveness checks that turn requests away (503) when the engine is down.

    Subclasses provide `config`, `dead`, `started`, `alive`, `stalled_for` and `num_running`, and
    give a place back (`_in_system -= 1` under `_lock`) when a request ends.
    """

    config: EngineConfig
    dead: BaseException | None

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_system = 0  # places claimed and not yet given back (waiting or running)
        self._stopping = False

    @property
    def started(self) -> bool:
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        raise NotImplementedError

    @property
    def stalled_for(self) -> float:
        raise NotImplementedError

    @property
    def num_running(self) -> int:
        raise NotImplementedError

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
        """The engine lives but one iteration has run past `stall_timeout` (a hang)."""
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


class Engine(AdmissionControl):
    def __init__(
        self, model: XLLM, config: EngineConfig, observer: EngineObserver | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.observer = observer or EngineObserver()
        wanted = config.max_model_len or min(model.max_model_len, DEFAULT_MAX_MODEL_LEN)
        self.max_model_len = min(wanted, model.max_model_len)
        self.config = config = replace(config, max_batch=self._num_slots(config))
        self.cache = SlotKVCache.for_model(
            model.llm, config.max_batch, self.max_model_len, model.device
        )
        self.decoder = SlotDecoder(model.llm, self.cache, self._compile_options(config))
        self.scheduler: Scheduler[Job] = Scheduler(config.max_batch, config.prefill_chunk)
        self.encoder_cache = EncoderCache(config.encoder_cache_mb * 2**20)
        self.eos = eos_token_ids(model.llm, model.tokenizer)
        self.token_bytes = TokenBytes(model.tokenizer)  # for logprobs
        self._inbox: queue.Queue[Job] = queue.Queue()
        self._wake = threading.Event()
        self._exit = False
        self._abort_message: str | None = None
        self._thread: threading.Thread | None = None
        self.dead: BaseException | None = None
        self._heartbeat = time.monotonic()  # start of the worker's latest iteration
        self._live: set[RequestHandle] = set()  # submitted and not yet finished (see abandon)
        self.fault_injector: Callable[[str], None] | None = None  # tests: raise inside a step

    def _num_slots(self, config: EngineConfig) -> int:
        """max_batch, or fewer where the KV budget (bytes, CPU memory, a GPU share) holds fewer."""
        llm = self.model.llm
        slot_bytes = kv_bytes_per_position(llm) * self.max_model_len
        on_cuda = self.model.device.type == "cuda"
        if config.kv_cache_memory_bytes is not None or not on_cuda:
            if config.gpu_memory_utilization is not None and not on_cuda:
                log.info("gpu_memory_utilization does not apply on the CPU")
            if config.kv_cache_memory_bytes is not None:
                budget, what = config.kv_cache_memory_bytes, "kv_cache_memory"
            else:
                available = available_memory_bytes()
                budget = int(CPU_KV_SHARE * available)
                what = f"{CPU_KV_SHARE:.0%} of the {available / 2**30:.1f} GiB of memory available"
            fit = slots_for_budget(budget, slot_bytes, what)
            slots = min(fit, config.max_batch)
            log.info(
                "KV cache sized from memory",
                extra={
                    "slots": slots,
                    "max_batch": config.max_batch,
                    "max_model_len": self.max_model_len,
                    "kv_cache_mb": round(slots * slot_bytes / 2**20, 1),
                    "budget_mb": round(budget / 2**20, 1),
                },
            )
            return slots
        if config.gpu_memory_utilization is None:
            return config.max_batch
        torch.cuda.empty_cache()  # blocks the allocator caches count as used otherwise
        free, total = torch.cuda.mem_get_info(self.model.device)
        fit = slots_for_memory(
            free_bytes=free,
            total_bytes=total,
            utilization=config.gpu_memory_utilization,
            slot_bytes=slot_bytes,
            reserve_bytes=activation_reserve_bytes(llm, config.prefill_chunk, config.max_batch),
        )
        log.info(
            "KV cache sized from GPU memory",
            extra={"slots_that_fit": fit, "max_batch": config.max_batch, "free_bytes": free},
        )
        return min(fit, config.max_batch)

    def _compile_options(self, config: EngineConfig) -> CompileOptions | None:
        device = self.model.device
        if not (device.type == "cuda" if config.compile is None else config.compile):
            return None
        return replace(CompileOptions.for_device(device), backend=config.compile_backend)

    # --- caller side (any thread) ---
    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def kv_cache_bytes(self) -> int:
        return self.cache.bytes

    @property
    def stalled_for(self) -> float:
        """Seconds the worker has spent in its current iteration (0 when it is not running)."""
        if self._thread is None or not self._thread.is_alive():
            return 0.0
        return time.monotonic() - self._heartbeat

    @property
    def alive(self) -> bool:
        return (
            self._thread is not None
            and self._thread.is_alive()
            and self.dead is None
            and not self.wedged
        )

    def submit(self, request: EngineRequest, handle: RequestHandle) -> None:
        """Hand a reserved request to the worker; its events arrive on `handle`."""
        with self._lock:
            self._live.add(handle)
        self._inbox.put(Job(request, handle))
        self._wake.set()

    def start(self) -> None:
        self._heartbeat = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="xllm-engine", daemon=True)
        self._thread.start()

    def abort_all(self, message: str) -> None:
        """Thread-safe: every queued and running request ends with an error event."""
        self._abort_message = message
        self._wake.set()

    def abandon(self, message: str) -> None:
        """Any thread, for a wedged worker: end every in-flight request with an error event.

        The worker cannot be interrupted, so its requests are answered from outside; should it
        come back, the events it still sends go to requests that have already ended.
        """
        with self._lock:
            handles, self._live = list(self._live), set()
        for handle in handles:
            handle.push(ErrorEvent(message, 503, "unavailable"))

    def shutdown(self) -> None:
        self._stopping = True
        self._exit = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # --- worker thread ---
    def _run(self) -> None:
        try:
            while not self._exit:
                self._heartbeat = time.monotonic()
                self._take_in()
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
                self._compact()
                if self._prefill():
                    # The first tokens leave now, not after the decode step (in the engine
                    # process a report sends the events queued so far).
                    self._report()
                self._decode_step()
                self._report()
        except BaseException as exc:  # the worker must never die silently
            log.exception("model worker died")
            self.dead = exc
            self._fail_all("the model worker failed; the request was not completed")
            raise

    def _take_in(self) -> None:
        while True:
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                return
            self.scheduler.add(job)

    def _drop_cancelled(self) -> None:
        for entry in [*self.scheduler.waiting, *self.scheduler.running]:
            if entry.item.handle.cancelled.is_set():
                self._finish(entry)

    def _finish(self, entry: Scheduled[Job], event: FinishEvent | ErrorEvent | None = None) -> None:
        self.scheduler.finish(entry)
        with self._lock:  # before the event: whoever sees the end also sees the place released
            self._in_system -= 1
            self._live.discard(entry.item.handle)
        if event is not None:
            entry.item.handle.push(event)

    def _fail(self, entries: list[Scheduled[Job]], message: str, status: int = 500) -> None:
        if entries:
            log.log(
                logging.ERROR if status >= 500 else logging.INFO,
                "requests failed",
                extra={
                    "request_ids": [e.item.request.request_id for e in entries],
                    "status": status,
                    "error": message,
                },
            )
        for entry in entries:
            self._finish(
                entry,
                ErrorEvent(
                    message, status, "server_error" if status >= 500 else "invalid_request_error"
                ),
            )

    def _fail_all(self, message: str) -> None:
        self._take_in()
        self._fail([*self.scheduler.waiting, *self.scheduler.running], message)

    def _inject(self, where: str) -> None:
        if self.fault_injector is not None:
            self.fault_injector(where)

    def _admit(self) -> None:
        admitted = self.scheduler.admit()
        if not admitted:
            return
        now = time.monotonic()
        for entry in admitted:
            self.observer.queue_time(now - entry.item.request.arrival)
        try:
            self._inject("encode")
            encoded = self._encode([e.item.request for e in admitted])
        except Exception as exc:
            log.exception("media encoding failed")
            self._fail(admitted, f"media encoding failed: {exc}")
            return
        for entry, media in zip(admitted, encoded, strict=True):
            try:
                self._lay_out(entry, media)
            except Exception as exc:
                log.exception("prompt assembly failed")
                self._fail([entry], f"prompt assembly failed: {exc}")

    @torch.inference_mode()
    def _encode(self, requests: list[EngineRequest]) -> list[list[EncodedMedia]]:
        """Encode every media item of the admitted requests, batched, through the cache."""
        items = [item for request in requests for item in request.media]
        results: dict[str, EncodedMedia] = {}
        todo = []
        for item in items:
            cached = self.encoder_cache.get(item.digest)
            if cached is not None:
                results[item.digest] = cached
            elif item.digest not in {t.digest for t in todo}:
                todo.append(item)
        if todo:
            start = time.monotonic()
            for item, encoded in zip(todo, self.model.encode(todo), strict=True):
                results[item.digest] = encoded
                self.encoder_cache.put(item.digest, encoded)
            elapsed = time.monotonic() - start
            for kind in {item.kind for item in todo}:
                self.observer.encoder_time(kind, elapsed)
        return [[results[item.digest] for item in request.media] for request in requests]

    @torch.inference_mode()
    def _lay_out(self, entry: Scheduled[Job], media: list[EncodedMedia]) -> None:
        job = entry.item
        request = job.request
        if request.prompt is not None:
            ids = self.model.tokenizer(request.prompt)["input_ids"]
            layout = PromptLayout(token_ids=list(ids))
        else:
            layout = self.model.layout(request.messages, media)
        prompt_len = len(layout)
        params = request.params
        room = self.max_model_len - prompt_len
        if prompt_len == 0:
            self._finish(entry, ErrorEvent("the prompt is empty", 400, "invalid_request_error"))
            return
        if not request.max_tokens_given:
            params.max_tokens = min(self.config.default_max_tokens, room)
        if room < 1 or params.max_tokens > room:
            self._finish(
                entry,
                ErrorEvent(
                    f"the prompt has {prompt_len} tokens and max_tokens is {params.max_tokens}: "
                    f"together {prompt_len + params.max_tokens}, more than the model's context of "
                    f"{self.max_model_len} tokens",
                    400,
                    "invalid_request_error",
                ),
            )
            return
        params.min_tokens = min(params.min_tokens, params.max_tokens)
        job.embeds = self.model.embed(layout, media)
        job.state = SequenceState(
            params,
            self.eos,
            IncrementalDetokenizer(self.model.tokenizer),
            strip_leading_newline=request.prompt is None,
        )
        job.generator = make_generator(params.seed)
        if request.prompt_logprobs is not None:
            job.prompt_ids = layout.token_ids
            job.prompt_entries = [TokenLogprobs(self.token_bytes(layout.token_ids[0]), None, ())]
        entry.prompt_len = prompt_len
        self.observer.tokens(prompt_len, 0)

    def _compact(self) -> None:
        """Keep the running sequences in the lowest slots: the decode batch is that prefix."""
        for entry, old_slot in self.scheduler.compact():
            self.cache.move(old_slot, entry.slot, entry.length)

    def _prefill(self) -> bool:
        """Run this iteration's prefill chunks, those of consecutive slots in one forward (a
        burst of admitted prompts holds consecutive slots); the prompts they complete get their
        first token together. A failed forward fails only the requests in it. True if a prompt
        got its first token."""
        completed, rows = [], []
        for run in _consecutive_slots(self.scheduler.next_prefills()):
            pieces = []
            for entry, start, end in run:
                assert entry.item.embeds is not None
                pieces.append((entry.item.embeds[start:end], start))
            scored = run[0][0].item.prompt_ids is not None  # then alone in its run
            try:
                self._inject("prefill")
                first_slot = run[0][0].slot
                if scored:
                    every = prefill_rows(self.model.llm, self.cache, first_slot, pieces, True)
                    logits = self._score_prompt(*run[0], every[0])
                else:
                    logits = prefill_rows(self.model.llm, self.cache, first_slot, pieces)
            except Exception as exc:
                log.exception("prefill failed")
                self._fail([entry for entry, _, _ in run], f"prefill failed: {exc}")
                continue
            for row, (entry, _, end) in enumerate(run):
                entry.prefilled = entry.length = end
                if end < entry.prompt_len:
                    continue
                if entry.item.prompt_ids is not None:
                    entry.item.handle.push(PromptLogprobsEvent(tuple(entry.item.prompt_entries)))
                entry.item.embeds = None
                entry.phase = Phase.DECODE
                completed.append(entry)
                rows.append(logits[row : row + 1])
        if completed:
            self._sample(completed, torch.cat(rows))
        return bool(completed)

    def _score_prompt(
        self, entry: Scheduled[Job], start: int, end: int, logits: torch.Tensor
    ) -> torch.Tensor:
        """Logprobs of the prompt tokens that the chunk [start, end) predicts (those at start +
        1 .. end, within the prompt), from its logits (end - start, V); returns the last
        position's logits (1, V) to sample from."""
        job = entry.item
        assert job.prompt_ids is not None and job.request.prompt_logprobs is not None
        targets = job.prompt_ids[start + 1 : min(end + 1, entry.prompt_len)]
        for token, scored in zip(
            targets,
            prompt_logprobs(logits, targets, job.request.prompt_logprobs),
            strict=True,
        ):
            job.prompt_entries.append(self._token_logprobs(token, scored))
        return logits[-1:]

    def _decode_step(self) -> None:
        batch = [e for e in self.scheduler.decoding() if e.item.next_token is not None]
        if not batch:
            return
        try:
            self._inject("decode")
            logits = self.decoder(
                [e.slot for e in batch],
                [e.item.next_token for e in batch],  # type: ignore[misc]
                [e.length for e in batch],
            )
        except Exception as exc:
            log.exception("decode step failed")
            self._fail(batch, f"decode step failed: {exc}")
            return
        for entry in batch:
            entry.length += 1
        self._sample(batch, logits)

    def _sample(self, batch: list[Scheduled[Job]], logits: torch.Tensor) -> None:
        """Sample one token per row of logits (B, V) and stream it to its request."""
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        bad = [e for e, ok in zip(batch, finite, strict=True) if not ok]
        if bad:
            self._fail(bad, "the model produced NaN or infinite logits")
            keep = [i for i, ok in enumerate(finite) if ok]
            batch = [batch[i] for i in keep]
            logits = logits[keep]
            if not batch:
                return
        batch, sampled = self._sample_rows(batch, logits)
        jobs = [e.item for e in batch]
        now = time.monotonic()
        for entry, job, token, asked in zip(
            batch, jobs, sampled.tokens, sampled.logprobs, strict=True
        ):
            logprobs = None if asked is None else self._token_logprobs(token, asked)
            state = job.state
            text = state.append(token)
            if len(state.tokens) == 1:
                self.observer.first_token(now - job.request.arrival)
            else:
                self.observer.inter_token(now - job.last_token_at)
            job.last_token_at = now
            if state.finish_reason is None and entry.length >= self.max_model_len:
                state.finish_reason = "length"  # the slot is full (never exceeds the context)
            if state.finish_reason is None:
                job.next_token = token
                job.handle.push(TokenEvent(text, token, logprobs))
                continue
            usage = Usage(entry.prompt_len, len(state.tokens))
            self.observer.tokens(0, len(state.tokens))
            self.observer.request_done(now - job.request.arrival)
            self._finish(entry, FinishEvent(state.finish_reason, text, usage, logprobs))

    def _token_logprobs(self, token: int, sampled: SampledLogprobs) -> TokenLogprobs:
        """Token ids -> their bytes (memoised per token id), for the event."""
        to_bytes = self.token_bytes
        top = tuple(
            (to_bytes(i), lp) for i, lp in zip(sampled.top_ids, sampled.top_logprobs, strict=True)
        )
        return TokenLogprobs(to_bytes(token), sampled.logprob, top)

    def _sample_rows(
        self, batch: list[Scheduled[Job]], logits: torch.Tensor
    ) -> tuple[list[Scheduled[Job]], Sampled]:
        """`sample` over the batch; if it fails, row by row, failing only the rows that fail.

        Finite logits can still give non-finite probabilities under a request's own parameters
        (a temperature of 1e-300, a repetition_penalty of 1e-300): that is the request's fault,
        and it must cost neither the worker nor the other rows their step. (Sampled rows of the
        failing step then draw from generators the failed batch call may have advanced; greedy
        rows are unaffected.)
        """
        eos = sorted(self.eos)

        def sample_rows(entries: list[Scheduled[Job]], rows: torch.Tensor) -> Sampled:
            jobs = [e.item for e in entries]
            states = [j.state for j in jobs]
            return sample(
                rows,
                [s.params for s in states],  # type: ignore[union-attr]
                [s.tokens for s in states],  # type: ignore[union-attr]
                [j.generator for j in jobs],
                eos,
            )

        try:
            return batch, sample_rows(batch, logits)
        except Exception:
            if len(batch) == 1:
                self._fail(batch, self._sampling_error(batch[0]), 400)
                return [], Sampled([], [])
        kept, sampled = [], Sampled([], [])
        for i, entry in enumerate(batch):
            try:
                one = sample_rows([entry], logits[i : i + 1])
                sampled.tokens += one.tokens
                sampled.logprobs += one.logprobs
                kept.append(entry)
            except Exception:
                self._fail([entry], self._sampling_error(entry), 400)
        return kept, sampled

    @staticmethod
    def _sampling_error(entry: Scheduled[Job]) -> str:
        p = entry.item.request.params
        return (
            "sampling failed: this request's parameters (temperature "
            f"{p.temperature:g}, top_p {p.top_p:g}, top_k {p.top_k}, repetition_penalty "
            f"{p.repetition_penalty:g}, presence_penalty {p.presence_penalty:g}, "
            f"frequency_penalty {p.frequency_penalty:g}) give no valid probabilities"
        )

    def _report(self) -> None:
        capacity = self.config.max_batch * self.max_model_len
        self.observer.step(
            self.num_running, self.num_waiting, self.scheduler.used_positions / capacity
        )


Chunk = tuple[Scheduled[Job], int, int]  # (entry, start, end) of a prompt chunk


def _consecutive_slots(chunks: list[Chunk]) -> list[list[Chunk]]:
    """Split chunks into runs whose slots follow each other (one prefill forward per run); a
    prompt whose own logprobs are asked for (logits at every position) runs alone."""
    runs: list[list[Chunk]] = []

    def scored(chunk: Chunk) -> bool:
        return chunk[0].item.prompt_ids is not None

    for chunk in sorted(chunks, key=lambda c: c[0].slot):
        previous = runs[-1][-1] if runs else None
        if (
            previous is not None
            and previous[0].slot + 1 == chunk[0].slot
            and not scored(previous)
            and not scored(chunk)
        ):
            runs[-1].append(chunk)
        else:
            runs.append([chunk])
    return runs
