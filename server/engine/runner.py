"""The model runner: what one engine iteration does with tensors, over `Sequence`s.

Media encoding (batched per encoder, through the content-hash cache), prompt layout and
embedding, the prefill forwards (one per run of consecutive slots), the decode step over the
slot prefix, and sampling with its per-request failures. It decides nothing about scheduling
and ends no request itself: it returns each sequence's event, and the engine loop delivers them
and tells the scheduler.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import torch

from xllm.model.config import ModelConfigError
from xllm.model.detokenize import IncrementalDetokenizer, SequenceState, TokenBytes, eos_token_ids
from xllm.model.generate import CompileOptions, SlotLLM, TorchSlots
from xllm.model.grammar import GrammarError, GrammarGuide
from xllm.model.prompt import PromptLayout, renders_tools
from xllm.model.sampling import Sampled, SampledLogprobs, make_generator, prompt_logprobs, sample
from xllm.model.xllm import XLLM, EncodedMedia
from xllm.server.engine.config import EngineConfig
from xllm.server.engine.contract import EngineObserver
from xllm.server.engine.encoder_cache import EncoderCache
from xllm.server.engine.events import (
    EngineRequest,
    ErrorEvent,
    FinishEvent,
    TokenEvent,
    TokenLogprobs,
    Usage,
)
from xllm.server.engine.prefix_cache import Copy, prompt_keys
from xllm.server.engine.scheduler import PrefillChunk
from xllm.server.engine.sequence import Sequence

log = logging.getLogger("xllm.engine")

TOOLS_NOT_RENDERED = (
    "tool_choice 'auto' (the default with tools) needs a chat template that renders tools; this "
    "model's does not: use tool_choice 'required' or name a function"
)


@dataclass
class Failure:
    """Sequences that fail together, with the reason (logged once for all of them)."""

    sequences: list[Sequence]
    message: str
    status: int = 500

    @property
    def event(self) -> ErrorEvent:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return ErrorEvent(self.message, self.status, kind)


@dataclass
class SampleOutcome:
    """One sampling of a batch: the failures, then per sequence sampled its event in batch order
    (a FinishEvent for those that ended, a TokenEvent for those that go on)."""

    failures: list[Failure] = field(default_factory=list)
    events: list[tuple[Sequence, TokenEvent | FinishEvent]] = field(default_factory=list)


def media_tokens(layout: PromptLayout, media: list[EncodedMedia]) -> dict[str, int]:
    """The prompt positions each media kind fills (its spans' lengths, by segment kind)."""
    counts: dict[str, int] = {}
    for _, length, index, segment in layout.spans:
        kind = media[index][segment][0]
        counts[kind] = counts.get(kind, 0) + length
    return counts


class ModelRunner:
    def __init__(
        self, model: XLLM, config: EngineConfig, max_model_len: int, observer: EngineObserver
    ) -> None:
        self.model = model
        self.config = config
        self.max_model_len = max_model_len
        self.observer = observer
        self.slots = self._slot_llm(config, max_model_len)
        self.encoder_cache = EncoderCache(config.encoder_cache_mb * 2**20)
        self.eos = eos_token_ids(model.llm, model.tokenizer)
        self.token_bytes = TokenBytes(model.tokenizer)  # for logprobs
        vocab_size = model.llm.get_output_embeddings().weight.shape[0]  # the logits' width
        self.guide = GrammarGuide(model.tokenizer, vocab_size, self.eos)  # structured outputs

    def _slot_llm(self, config: EngineConfig, max_model_len: int) -> SlotLLM:
        """What runs the frozen LLM over the KV slots: PyTorch, or llama.cpp on the CPU."""
        llm, slots = self.model.llm, config.max_batch
        if config.llm_backend == "torch":
            compile = self._compile_options(config)
            return TorchSlots(llm, slots, max_model_len, self.model.device, compile)
        from xllm.model.llamacpp import LlamaCppSlots, gguf_weights_for

        if self.model.device.type != "cpu":
            raise ModelConfigError("the llama.cpp backend runs on the CPU: add --device cpu")
        weights = gguf_weights_for(llm.dtype, config.llamacpp_quantize)
        threads = torch.get_num_threads()
        return LlamaCppSlots(llm, slots, max_model_len, weights, threads, config.prefill_chunk)

    def _compile_options(self, config: EngineConfig) -> CompileOptions | None:
        device = self.model.device
        if not (device.type == "cuda" if config.compile is None else config.compile):
            return None
        return replace(CompileOptions.for_device(device), backend=config.compile_backend)

    # --- prompts ---
    def encoder_inputs(self, request: EngineRequest) -> int:
        """The encoder inputs (images, frames, audio windows) a request's media still need:
        those of media the encoder cache holds cost nothing."""
        todo = {
            item.digest: item for item in request.media if item.digest not in self.encoder_cache
        }
        return sum(item.encoder_inputs for item in todo.values())

    @torch.inference_mode()
    def encode(self, requests: list[EngineRequest]) -> list[list[EncodedMedia]]:
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
        for request in requests:
            for digest in request.pinned:
                self.encoder_cache.pin(digest, results[digest])
        return [[results[item.digest] for item in request.media] for request in requests]

    @torch.inference_mode()
    def lay_out(self, sequence: Sequence, media: list[EncodedMedia]) -> ErrorEvent | None:
        """Tokenize or lay out the prompt, embed it and set up the sequence's generation state;
        the error to end it with when the prompt is empty or leaves no room in the context."""
        request = sequence.request
        if request.prompt is not None:
            ids = self.model.tokenizer(request.prompt)["input_ids"]
            layout = PromptLayout(token_ids=list(ids))
        else:
            tools = request.tools if renders_tools(self.model.tokenizer) else ()
            if request.tools_in_prompt and not tools:
                return ErrorEvent(TOOLS_NOT_RENDERED, 400, "invalid_request_error")
            layout = self.model.layout(request.messages, media, tools=tools)
        prompt_len = len(layout)
        params = request.params
        room = self.max_model_len - prompt_len
        if prompt_len == 0:
            return ErrorEvent("the prompt is empty", 400, "invalid_request_error")
        if not request.max_tokens_given:  # params hold the model's default; the flag wins
            if self.config.default_max_tokens is not None:
                params.max_tokens = self.config.default_max_tokens
            params.max_tokens = min(params.max_tokens, room)
        if room < 1 or params.max_tokens > room:
            return ErrorEvent(
                f"the prompt has {prompt_len} tokens and max_tokens is {params.max_tokens}: "
                f"together {prompt_len + params.max_tokens}, more than the model's context of "
                f"{self.max_model_len} tokens",
                400,
                "invalid_request_error",
            )
        params.min_tokens = min(params.min_tokens, params.max_tokens)
        if request.grammar is not None:
            try:
                sequence.matcher = self.guide.matcher(request.grammar)
            except GrammarError as exc:
                return ErrorEvent(str(exc), 400, "invalid_request_error")
        sequence.embeds = self.model.embed(layout, media)
        sequence.state = SequenceState(
            params,
            self.eos,
            IncrementalDetokenizer(self.model.tokenizer),
            strip_leading_newline=request.prompt is None,
        )
        sequence.generator = make_generator(request.params.seed)
        if request.prompt_logprobs is not None:
            sequence.prompt_ids = layout.token_ids
            first = TokenLogprobs(self.token_bytes(layout.token_ids[0]), None, ())
            sequence.prompt_entries = [first]
        sequence.prompt_len = prompt_len
        sequence.media_tokens = media_tokens(layout, media)
        if self.config.prefix_cache:
            sequence.prompt_keys = prompt_keys(layout, [item.digest for item in request.media])
        self.observer.tokens(prompt_len, 0)
        return None

    def move(self, sequence: Sequence, old_slot: int, held: int = 0) -> None:
        """Compaction: the sequence's K/V follow it to its new slot; the first `held` positions
        of that slot (kept for prefix reuse) go to the old one."""
        if held:
            self.slots.exchange(old_slot, sequence.slot, sequence.length, held)
            return
        self.slots.move(old_slot, sequence.slot, sequence.length)

    def fork(self, sequence: Sequence, leader: Sequence) -> None:
        """A follower (another choice of the leader's prompt) starts where the leader's prompt
        ends: a copy of its K/V and of its settled parameters, with its own seed."""
        assert leader.state is not None
        self.slots.move(leader.slot, sequence.slot, leader.length)
        params = replace(leader.state.params, seed=sequence.request.params.seed)
        sequence.request.params = params
        sequence.state = SequenceState(
            params,
            self.eos,
            IncrementalDetokenizer(self.model.tokenizer),
            strip_leading_newline=sequence.request.prompt is None,
        )
        sequence.generator = make_generator(params.seed)
        if sequence.request.grammar is not None:
            sequence.matcher = self.guide.matcher(sequence.request.grammar)
        sequence.media_tokens = leader.media_tokens
        sequence.prompt_ids = leader.prompt_ids
        sequence.prompt_entries = list(leader.prompt_entries)

    def copy(self, copy: Copy) -> None:
        """Prefix reuse: K/V positions copied from one slot into another."""
        self.slots.move(copy.source, copy.target, copy.length)

    # --- forwards ---
    def prefill(self, run: list[PrefillChunk]) -> torch.Tensor:
        """One forward for a run of chunks of consecutive slots; each row's logits after its
        chunk, (len(run), V). A sequence scoring its prompt (alone in its run) gets its prompt
        tokens' logprobs recorded too."""
        pieces = []
        for chunk in run:
            assert chunk.sequence.embeds is not None
            pieces.append((chunk.sequence.embeds[chunk.start : chunk.end], chunk.start))
        first_slot = run[0].sequence.slot
        self.observer.prefill(sum(chunk.end - chunk.start for chunk in run))
        if run[0].sequence.scores_prompt:
            every = self.slots.prefill(first_slot, pieces, every_position=True)
            return self._score_prompt(run[0], every[0])
        return self.slots.prefill(first_slot, pieces)

    def _score_prompt(self, chunk: PrefillChunk, logits: torch.Tensor) -> torch.Tensor:
        """Logprobs of the prompt tokens that the chunk [start, end) predicts (those at start +
        1 .. end, within the prompt), from its logits (end - start, V); returns the last
        position's logits (1, V) to sample from."""
        sequence = chunk.sequence
        k = sequence.request.prompt_logprobs
        assert sequence.prompt_ids is not None and k is not None
        targets = sequence.prompt_ids[chunk.start + 1 : min(chunk.end + 1, sequence.prompt_len)]
        for token, scored in zip(targets, prompt_logprobs(logits, targets, k), strict=True):
            sequence.prompt_entries.append(self._token_logprobs(token, scored))
        return logits[-1:]

    def decode(self, batch: list[Sequence]) -> torch.Tensor:
        """One decode step: each sequence's pending token written at its length; logits (B, V),
        those of constrained rows masked by their grammars. The masks are computed once the
        forward is launched (on CUDA its kernels run meanwhile; the decoder does not sync)."""
        logits = self.slots.decode(
            [s.slot for s in batch],
            [s.next_token for s in batch],  # type: ignore[misc]
            [s.length for s in batch],
        )
        return self.constrain(batch, logits)

    def constrain(self, batch: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) of the batch with the constrained rows masked by their grammars."""
        return self.guide.apply(logits, self.guide.constrained([s.matcher for s in batch]))

    # --- sampling ---
    def sample(self, batch: list[Sequence], logits: torch.Tensor) -> SampleOutcome:
        """One token per row of logits (B, V): the event for each sequence, in batch order."""
        outcome = SampleOutcome()
        # -inf is a token a grammar forbids; NaN, +inf or a row with nothing finite is a fault
        broken = logits.isnan() | logits.isposinf()
        finite = (~broken.any(dim=-1) & logits.isfinite().any(dim=-1)).tolist()
        bad = [s for s, ok in zip(batch, finite, strict=True) if not ok]
        if bad:
            outcome.failures.append(Failure(bad, "the model produced NaN or infinite logits"))
            keep = [i for i, ok in enumerate(finite) if ok]
            batch = [batch[i] for i in keep]
            logits = logits[keep]
            if not batch:
                return outcome
        batch, sampled = self._sample_rows(batch, logits, outcome.failures)
        now = time.monotonic()
        for sequence, token, asked in zip(batch, sampled.tokens, sampled.logprobs, strict=True):
            logprobs = None if asked is None else self._token_logprobs(token, asked)
            state = sequence.state
            assert state is not None
            text = state.append(token)
            if sequence.matcher is not None:
                sequence.matcher.consume_token(token)
                if state.finish_reason is None and sequence.matcher.is_stopped():
                    text += state.end("stop")  # the grammar is complete: nothing may follow
            if len(state.tokens) == 1:
                sequence.stages["first_token"] = now - sequence.request.arrival
                self.observer.first_token(now - sequence.request.arrival)
                if sequence.laid_out_at:  # not a follower (n choices): it prefilled
                    sequence.stages["prefill"] = now - sequence.laid_out_at
                    self.observer.request_prefill(now - sequence.laid_out_at)
            else:
                self.observer.inter_token(now - sequence.last_token_at)
            sequence.last_token_at = now
            if state.finish_reason is None and sequence.length >= self.max_model_len:
                state.finish_reason = "length"  # the slot is full (never exceeds the context)
            if state.finish_reason is None:
                sequence.next_token = token
                outcome.events.append((sequence, TokenEvent(text, token, logprobs)))
                continue
            usage = Usage(
                0 if sequence.request.choice else sequence.prompt_len,  # n choices: counted once
                len(state.tokens),
                sequence.cached_tokens,
                sequence.media_tokens,
            )
            self.observer.tokens(0, len(state.tokens))
            self.observer.request_done(now - sequence.request.arrival)
            decoding = now - sequence.request.arrival - sequence.stages["first_token"]
            sequence.stages["decode"] = decoding
            self.observer.request_decode(decoding)
            stages = dict(sequence.stages)
            event = FinishEvent(state.finish_reason, text, usage, logprobs, token, stages)
            outcome.events.append((sequence, event))
        return outcome

    def _token_logprobs(self, token: int, sampled: SampledLogprobs) -> TokenLogprobs:
        """Token ids -> their bytes (memoised per token id), for the event."""
        to_bytes = self.token_bytes
        top = tuple(
            (to_bytes(i), lp) for i, lp in zip(sampled.top_ids, sampled.top_logprobs, strict=True)
        )
        return TokenLogprobs(to_bytes(token), sampled.logprob, top)

    def _sample_rows(
        self, batch: list[Sequence], logits: torch.Tensor, failures: list[Failure]
    ) -> tuple[list[Sequence], Sampled]:
        """`sample` over the batch; if it fails, row by row, failing only the rows that fail.

        Finite logits can still give non-finite probabilities under a request's own parameters
        (a temperature of 1e-300, a repetition_penalty of 1e-300): that is the request's fault,
        and it must cost neither the worker nor the other rows their step. (Sampled rows of the
        failing step then draw from generators the failed batch call may have advanced; greedy
        rows are unaffected.)
        """
        eos = sorted(self.eos)

        def sample_rows(sequences: list[Sequence], rows: torch.Tensor) -> Sampled:
            states = [s.state for s in sequences]
            return sample(
                rows,
                [s.params for s in states],  # type: ignore[union-attr]
                [s.tokens for s in states],  # type: ignore[union-attr]
                [s.generator for s in sequences],
                eos,
            )

        try:
            return batch, sample_rows(batch, logits)
        except Exception:
            if len(batch) == 1:
                failures.append(Failure(batch, _sampling_error(batch[0]), 400))
                return [], Sampled([], [])
        kept, sampled = [], Sampled([], [])
        for i, sequence in enumerate(batch):
            try:
                one = sample_rows([sequence], logits[i : i + 1])
                sampled.tokens += one.tokens
                sampled.logprobs += one.logprobs
                kept.append(sequence)
            except Exception:
                failures.append(Failure([sequence], _sampling_error(sequence), 400))
        return kept, sampled


def _sampling_error(sequence: Sequence) -> str:
    p = sequence.request.params
    return (
        "sampling failed: this request's parameters (temperature "
        f"{p.temperature:g}, top_p {p.top_p:g}, top_k {p.top_k}, repetition_penalty "
        f"{p.repetition_penalty:g}, presence_penalty {p.presence_penalty:g}, "
        f"frequency_penalty {p.frequency_penalty:g}) give no valid probabilities"
    )
