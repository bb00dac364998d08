"""Decoding as small functions over explicit state (in the spirit of gpt-fast).

- `SlotKVCache`: preallocated K/V buffers (layers x slots x kv_heads x max_len x head_dim) with
  static shapes; every sequence owns one slot, so sequences join and leave a running batch freely.
- `forward_step` / `prefill_rows`: prompt chunks written into their slots (prefill), one
  sequence or several of consecutive slots in one forward.
- `SlotDecoder`: one decode step over the slot prefix [0, B), plain or compiled (torch.compile,
  bucketed static shapes, CUDA graphs).
- `sample` / `sample_next`: per-row logits processing (penalties), sampling, logprobs.
- `SequenceState`: what one sequence has produced (tokens, text, stop/length state).
- `generate`: the single-request loop built from these, used by the CLI; the server's scheduler
  drives the same functions for many sequences at once.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from transformers import AttentionInterface, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from xllm.model.config import SamplingDefaults

# The ranges of the OpenAI sampling parameters, for every layer that checks them (the HTTP
# schemas and SamplingParams.validate).
PENALTY_LIMIT = 2.0  # presence_penalty and frequency_penalty lie in [-PENALTY_LIMIT, PENALTY_LIMIT]
MAX_TOP_LOGPROBS = 20  # alternatives per token a request may ask for (chat's top_logprobs)
MAX_COMPLETION_LOGPROBS = 5  # the same for /v1/completions' `logprobs` (OpenAI's legacy limit)


@dataclass
class SamplingParams:
    max_tokens: int = 512
    min_tokens: int = 0  # EOS is suppressed until this many tokens were generated
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # over the tokens generated so far (HF semantics)
    # OpenAI's: logits[t] -= presence * (count[t] > 0) + frequency * count[t], counts over the
    # tokens generated so far
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # None: no logprobs; k: each token's logprob and the k most likely tokens' (see `sample`)
    logprobs: int | None = None

    def validate(self) -> None:
        """Raise ValueError with a message naming the bad field."""
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError("min_tokens must be between 0 and max_tokens")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -PENALTY_LIMIT <= getattr(self, name) <= PENALTY_LIMIT:
                raise ValueError(f"{name} must be between {-PENALTY_LIMIT:g} and {PENALTY_LIMIT:g}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")


def sampling_params(defaults: SamplingDefaults, **overrides: object) -> SamplingParams:
    """A request's parameters: its own values where given (not None), the model's defaults else.

    Raises ValueError naming the first bad field.
    """
    base = {
        "max_tokens": defaults.max_tokens,
        "temperature": defaults.temperature,
        "top_p": defaults.top_p,
        "top_k": defaults.top_k,
        "repetition_penalty": defaults.repetition_penalty,
    }
    base.update({k: v for k, v in overrides.items() if v is not None})
    params = SamplingParams(**base)  # type: ignore[arg-type]
    params.validate()
    return params


class SlotKVCache(Cache):
    """Static K/V slots driven through HF's Cache interface.

    Before each forward, `bind` says which contiguous slots the batch rows are (row b is slot
    first_slot + b) and at which positions their new tokens go; each attention layer then calls
    `update`, which writes the new K/V there and returns views of the rows' K/V up to `kv_len`
    (no copy; masking of stale positions is the caller's 4-D mask).
    """

    is_compileable = False  # HF generate must not compile it: SlotDecoder does

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        max_len: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__(layers=[])
        shape = (num_slots, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots
        self.max_len = max_len
        self._first_slot = 0
        self._rows = torch.zeros(0, 1, dtype=torch.long, device=device)
        self._positions = torch.zeros(0, 1, dtype=torch.long, device=device)
        self._kv_len = 0

    @classmethod
    def for_model(
        cls, llm: PreTrainedModel, num_slots: int, max_len: int, device: torch.device
    ) -> SlotKVCache:
        layers, kv_heads, head_dim = kv_shape(llm)
        return cls(layers, num_slots, max_len, kv_heads, head_dim, kv_cache_dtype(llm), device)

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @property
    def scratch_position(self) -> int:
        """Where rows that are not decoding write their K/V during a decode step.

        Safe for every slot: a sequence holds at most max_len - 1 positions before its last
        decode step, and that step writes position max_len - 1 itself before reading it.
        """
        return self.max_len - 1

    def bind(self, first_slot: int, positions: torch.Tensor, kv_len: int) -> None:
        """Rows are slots first_slot.. first_slot + B - 1; positions (B, q) where the new tokens
        go; kv_len (host-known, >= every row's last position + 1) the K/V length attended."""
        self._first_slot, self._positions, self._kv_len = first_slot, positions, kv_len
        self._rows = torch.arange(positions.shape[0], device=positions.device)[:, None]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states: (B, kv_heads, q, head_dim); buffers: (slots, kv_heads, max_len, head_dim)
        batch = slice(self._first_slot, self._first_slot + key_states.shape[0])
        keys, values = self.keys[layer_idx][batch], self.values[layer_idx][batch]  # views
        keys[self._rows, :, self._positions] = key_states.transpose(1, 2).to(keys.dtype)
        values[self._rows, :, self._positions] = value_states.transpose(1, 2).to(values.dtype)
        return keys[:, :, : self._kv_len], values[:, :, : self._kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    def move(self, source: int, target: int, length: int) -> None:
        """Copy a sequence's first `length` positions from slot `source` to slot `target`."""
        for buffers in (self.keys, self.values):
            for layer in buffers:
                layer[target, :, :length] = layer[source, :, :length]

    def mark_static_addresses(self) -> None:
        """CUDA graphs replay fixed addresses: tell dynamo the buffers never move, so their
        in-place updates stay inside the captured graph."""
        for buffer in self.keys + self.values:
            torch._dynamo.mark_static_address(buffer)


def kv_shape(llm: PreTrainedModel) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the LLM's K/V."""
    config = llm.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers, kv_heads, head_dim


def kv_cache_dtype(llm: PreTrainedModel) -> torch.dtype:
    """The LLM's compute dtype (float32 for quantized embeddings)."""
    dtype = llm.get_input_embeddings().weight.dtype
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def kv_bytes_per_position(llm: PreTrainedModel) -> int:
    """K and V of one position in every layer, in bytes (what one slot position costs)."""
    layers, kv_heads, head_dim = kv_shape(llm)
    element = torch.empty(0, dtype=kv_cache_dtype(llm)).element_size()
    return 2 * layers * kv_heads * head_dim * element


def attention_mask_4d(positions: torch.Tensor, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, q, kv_len): row b's query at position p sees its own slot's 0..p."""
    keys = torch.arange(kv_len, device=positions.device)
    allowed = keys[None, None, :] <= positions[:, :, None]  # (B, q, kv_len)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=positions.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def forward_rows(
    llm: PreTrainedModel,
    cache: SlotKVCache,
    embeds: torch.Tensor,
    first_slot: int,
    positions: torch.Tensor,
    kv_len: int,
    every_position: bool = False,
) -> torch.Tensor:
    """embeds (B, q, H) written at positions (B, q) of slots first_slot.. first_slot + B - 1.

    Returns the logits of each row's last position, (B, V) in float32; with every_position
    those of all its positions, (B, q, V) (a prompt's own logprobs). No host sync: kv_len
    comes from the caller, which knows every row's length.
    """
    cache.bind(first_slot, positions, kv_len)
    mask = attention_mask_4d(positions, kv_len, embeds.dtype)
    out = llm(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=0 if every_position else 1,  # 0: all
    )
    return out.logits.float() if every_position else out.logits[:, -1].float()


@torch.inference_mode()
def forward_step(
    llm: PreTrainedModel, cache: SlotKVCache, embeds: torch.Tensor, slot: int, start: int
) -> torch.Tensor:
    """One sequence's embeds (1, q, H) written at positions start.. start + q - 1 of `slot`.

    Returns the logits after its last position, (1, V) in float32.
    """
    return prefill_rows(llm, cache, slot, [(embeds[0], start)])


def prefill_rows(
    llm: PreTrainedModel,
    cache: SlotKVCache,
    first_slot: int,
    chunks: Sequence[tuple[torch.Tensor, int]],
    every_position: bool = False,
) -> torch.Tensor:
    """Prompt chunks of consecutive slots in one forward: chunk i = (embeds (q_i, H), start_i)
    goes to positions start_i.. start_i + q_i - 1 of slot first_slot + i. every_position (one
    chunk only): the logits of every position, (1, q, V), see forward_rows.

    Rows are left-padded to the longest chunk, so every row's last real position is the last
    one (`logits_to_keep=1`). Pads write the cache's scratch position, which no real query of
    this forward attends (it lies past every prompt) and a sequence overwrites before it reads.
    Returns each row's logits after its last position, (B, V) in float32.
    """
    longest = max(embeds.shape[0] for embeds, _ in chunks)
    first = chunks[0][0]
    if len(chunks) == 1:
        batch = first[None]
        positions = torch.arange(chunks[0][1], chunks[0][1] + longest)[None]
    else:
        batch = first.new_zeros(len(chunks), longest, first.shape[1])
        positions = torch.full((len(chunks), longest), cache.scratch_position)
        for row, (embeds, start) in enumerate(chunks):
            length = embeds.shape[0]
            batch[row, longest - length :] = embeds
            positions[row, longest - length :] = torch.arange(start, start + length)
    kv_len = max(start + embeds.shape[0] for embeds, start in chunks)
    positions = host_to_device(positions, first.device)
    assert not every_position or len(chunks) == 1, "every_position takes one chunk"
    return forward_rows(llm, cache, batch, first_slot, positions, kv_len, every_position)


def host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host-built tensor on `device` without a host sync (pinned, non-blocking: CUDA)."""
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def sdpa_packed_gqa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """HF's SDPA attention, except that one-token queries with grouped K/V heads are packed.

    query (B, heads, 1, D) is read as (B, kv_heads, groups, D): each K/V head serves its group
    of query heads as if they were query positions, so the cache views (B, kv_heads, kv_len, D)
    are attended as they are. HF does this itself in eager mode only; under torch.compile it
    repeats K/V to every query head, a copy of the attended cache in every layer.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, **kwargs
        )
    batch, heads, _, dim = query.shape
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(batch, heads // groups, groups, dim),
        key,
        value,
        attn_mask=attention_mask,  # (B, 1, 1, kv_len) broadcasts over (kv_heads, groups)
        scale=scaling,
    )
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


SDPA_PACKED_GQA = "xllm_sdpa_packed_gqa"
AttentionInterface.register(SDPA_PACKED_GQA, sdpa_packed_gqa)
AttentionMaskInterface.register(SDPA_PACKED_GQA, sdpa_mask)


def power_of_two_buckets(smallest: int, largest: int) -> tuple[int, ...]:
    """smallest, 2 * smallest, 4 * smallest, ... while below largest, then largest itself."""
    sizes = []
    size = min(smallest, largest)
    while size < largest:
        sizes.append(size)
        size *= 2
    return (*sizes, largest)


def fit_bucket(buckets: tuple[int, ...], n: int) -> int:
    """The smallest bucket holding n (buckets ascending, the last one holds every n)."""
    return buckets[bisect.bisect_left(buckets, n)]


@dataclass(frozen=True)
class CompileOptions:
    backend: str = "inductor"  # "aot_eager" / "eager" check the shape logic cheaply (tests)
    mode: str | None = None  # "reduce-overhead": CUDA graphs, one per (batch, kv_len) bucket

    @classmethod
    def for_device(cls, device: torch.device) -> CompileOptions:
        return cls(mode="reduce-overhead" if device.type == "cuda" else None)


SMALLEST_KV_BUCKET = 256  # shorter attention spans cost less than the launch overhead they save


class SlotDecoder:
    """Decode steps over the slot range [0, B): one new token for each sequence in `slots`.

    The batch is a prefix of the cache, so every layer attends over views of it, never a gather.
    Range rows that hold no decoding sequence (free slots, prompts still prefilling) run too, on
    token 0 at the cache's scratch position, and their logits are dropped.

    Plain: B = highest slot + 1, kv_len = longest sequence + 1, eager.
    Compiled: B and kv_len rounded up to power-of-two buckets. The graph is compiled with both
    sizes symbolic (a handful of compiles: B = 1, B = all slots and kv_len = max_len specialise),
    and mode "reduce-overhead" records one CUDA graph per (B, kv_len) bucket, as vLLM does per
    batch size. Either way the host knows every length: no step waits for the device.
    """

    def __init__(
        self, llm: PreTrainedModel, cache: SlotKVCache, compile: CompileOptions | None = None
    ) -> None:
        self.llm = llm
        self.cache = cache
        self.compiled = compile is not None
        self.batch_buckets = power_of_two_buckets(1, cache.num_slots)
        self.kv_buckets = power_of_two_buckets(SMALLEST_KV_BUCKET, cache.max_len)
        device = cache.keys[0].device
        self._key_positions = torch.arange(cache.max_len, device=device)  # sliced to kv_len
        self._forward = decode_rows
        if compile is not None:
            self._forward = self._compile(compile)

    def _compile(self, options: CompileOptions) -> Callable[..., torch.Tensor]:
        if self.llm.config._attn_implementation == "sdpa":
            self.llm.set_attn_implementation(SDPA_PACKED_GQA)
        if options.mode == "reduce-overhead":
            import torch._inductor.config as inductor_config

            self.cache.mark_static_addresses()
            # one graph per bucket is the design, not a sign of shapes running wild
            buckets = len(self.batch_buckets) * len(self.kv_buckets)
            inductor_config.triton.cudagraph_dynamic_shape_warn_limit = buckets
        return torch.compile(decode_rows, backend=options.backend, mode=options.mode)

    def shape_for(self, slots: Sequence[int], lengths: Sequence[int]) -> tuple[int, int]:
        """(rows, kv_len) of the step that extends sequences of `lengths` held in `slots`."""
        rows, kv_len = max(slots) + 1, max(lengths) + 1
        if self.compiled:
            return fit_bucket(self.batch_buckets, rows), fit_bucket(self.kv_buckets, kv_len)
        return rows, kv_len

    @torch.inference_mode()
    def __call__(
        self, slots: Sequence[int], tokens: Sequence[int], lengths: Sequence[int]
    ) -> torch.Tensor:
        """Write tokens[i] at position lengths[i] of slot slots[i]; logits (len(slots), V)."""
        rows, kv_len = self.shape_for(slots, lengths)
        row_tokens = [0] * rows
        row_positions = [self.cache.scratch_position] * rows
        for slot, token, length in zip(slots, tokens, lengths, strict=True):
            row_tokens[slot], row_positions[slot] = token, length
        device = self._key_positions.device
        host = torch.tensor([row_tokens, row_positions, list(slots) + [0] * (rows - len(slots))])
        inputs = host_to_device(host, device)  # (3, rows): one copy, no sync
        row_tokens_t, row_positions_t = inputs[0], inputs[1]
        key_positions = self._key_positions[:kv_len]
        if self.compiled:  # sizes symbolic from the first compile on, not after a recompile
            for tensor in (row_tokens_t, row_positions_t, key_positions):
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        logits = self._forward(self.llm, self.cache, row_tokens_t, row_positions_t, key_positions)
        return logits[inputs[2, : len(slots)]]  # a new tensor: a CUDA graph reuses its output


def decode_rows(
    llm: PreTrainedModel,
    cache: SlotKVCache,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    key_positions: torch.Tensor,
) -> torch.Tensor:
    """tokens (B,) written at positions (B,) of slots 0..B-1, attending over key_positions
    (kv_len,) = 0..kv_len-1 (a tensor, so that kv_len is a size torch.compile can keep
    symbolic); logits (B, V) in float32."""
    embeds = llm.get_input_embeddings()(tokens[:, None])  # (B, 1, H)
    return forward_rows(llm, cache, embeds, 0, positions[:, None], key_positions.shape[0])


class SampledLogprobs(NamedTuple):
    """One sampled token's logprob and the most likely tokens', for a row that asked."""

    logprob: float
    top_ids: tuple[int, ...]  # most likely first
    top_logprobs: tuple[float, ...]


@dataclass
class Sampled:
    tokens: list[int]  # one per row
    logprobs: list[SampledLogprobs | None]  # None for the rows that did not ask


# What a logprob of -inf (a token the request's min_tokens forbids) is reported as: JSON has no
# infinity, and OpenAI reports impossible tokens the same way.
MIN_LOGPROB = -9999.0


def sample_next(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator | None],
    eos_ids: Sequence[int],
) -> list[int]:
    """Next token per row of logits (B, V), each row with its own sampling parameters."""
    return sample(logits, params, histories, generators, eos_ids).tokens


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator | None],
    eos_ids: Sequence[int],
) -> Sampled:
    """Next token per row of logits (B, V), each row with its own sampling parameters, and the
    logprobs of the rows whose params ask for them.

    Logits processing runs batched over the rows that need it; only the draw itself is per
    row (each request has its own seeded generator). Reported logprobs are those of the
    distribution the row samples from after penalties and temperature (temperature 0 reads
    as 1: a greedy row reports the model's own distribution), before top-k / top-p truncation,
    so they cover the whole vocabulary. Rows that did not ask cost nothing but the check.
    """
    logits = penalised(logits, params, histories, eos_ids)
    tokens = logits.argmax(dim=-1).tolist()
    sampled = [row for row, p in enumerate(params) if p.temperature != 0]
    if sampled:
        probs = sampling_probs(logits[sampled], [params[row] for row in sampled]).cpu()
        for i, row in enumerate(sampled):
            tokens[row] = int(torch.multinomial(probs[i], 1, generator=generators[row]).item())
    logprobs: list[SampledLogprobs | None] = [None] * len(params)
    asked = [row for row, p in enumerate(params) if p.logprobs is not None]
    if asked:
        for row, entry in zip(asked, token_logprobs(logits, params, tokens, asked), strict=True):
            logprobs[row] = entry
    return Sampled(tokens, logprobs)


def token_logprobs(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    tokens: Sequence[int],
    rows: Sequence[int],
) -> list[SampledLogprobs]:
    """Logprobs of `rows` of the processed logits (B, V): each row's sampled token and its
    params.logprobs most likely tokens. Batched over the A rows: log_softmax(x) = x -
    logsumexp(x), so only a logsumexp (A,), a gather and a top-k (A, k) are computed, never a
    (A, V) log_softmax; one copy to the host."""
    device = logits.device
    scores = logits if len(rows) == len(logits) else logits[torch.tensor(rows, device=device)]
    temperature = [params[r].temperature or 1.0 for r in rows]
    if any(t != 1.0 for t in temperature):
        scores = scores / torch.tensor(temperature, device=device, dtype=scores.dtype)[:, None]
    norm = scores.logsumexp(dim=-1, keepdim=True)  # (A, 1)
    chosen = torch.tensor([tokens[r] for r in rows], device=device)[:, None]
    k = min(max(params[r].logprobs or 0 for r in rows), scores.shape[-1])
    top_scores, top_ids = scores.topk(k, dim=-1) if k else (scores[:, :0], chosen[:, :0])
    # (A, 1 + k): the sampled token's logprob, then the top k's
    values = (torch.cat([scores.gather(-1, chosen), top_scores], dim=-1) - norm).clamp(
        min=MIN_LOGPROB
    )
    out = []
    for row, row_values, row_ids in zip(rows, values.tolist(), top_ids.tolist(), strict=True):
        n = params[row].logprobs or 0
        out.append(SampledLogprobs(row_values[0], tuple(row_ids[:n]), tuple(row_values[1 : 1 + n])))
    return out


def prompt_logprobs(logits: torch.Tensor, targets: Sequence[int], k: int) -> list[SampledLogprobs]:
    """The model's logprobs of a prompt's own tokens: logits (q, V) of q consecutive positions,
    targets the tokens that follow each of the first len(targets) of them (<= q); with the k
    most likely tokens at each. The model's distribution (temperature 1), no penalties."""
    rows = list(range(len(targets)))
    if not rows:
        return []
    return token_logprobs(
        logits[: len(rows)], [SamplingParams(logprobs=k)] * len(rows), targets, rows
    )


def penalised(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[Sequence[int]],
    eos_ids: Sequence[int],
) -> torch.Tensor:
    """logits (B, V) after the penalties on the tokens generated so far and min_tokens EOS
    suppression.

    Penalties, for the R rows that have any: token counts (R, V) from one scatter over their
    histories, then HF's repetition penalty on the tokens seen (negative scores multiplied,
    positive divided) and OpenAI's presence (x seen) and frequency (x count) penalties
    subtracted, in a few batched ops. A default penalty leaves scores exactly as they are.
    The input is returned as it is when no row needs anything (the common case), else a copy
    (a failed batch is retried row by row on it).
    """
    penalty_rows = [
        r
        for r, p in enumerate(params)
        if histories[r]
        and (p.repetition_penalty != 1.0 or p.presence_penalty != 0 or p.frequency_penalty != 0)
    ]
    eos_rows = [r for r, p in enumerate(params) if len(histories[r]) < p.min_tokens]
    if not eos_ids:
        eos_rows = []
    if not penalty_rows and not eos_rows:
        return logits
    logits = logits.clone()
    device = logits.device
    if penalty_rows:
        rows = torch.tensor(penalty_rows, device=device)
        counts = token_counts([histories[r] for r in penalty_rows], logits.shape[-1], device)
        seen = counts > 0
        dtype = logits.dtype

        def column(name: str) -> torch.Tensor:  # (R, 1): one parameter of every penalty row
            values = [getattr(params[r], name) for r in penalty_rows]
            return torch.tensor(values, device=device, dtype=dtype)[:, None]

        scores = logits[rows]  # (R, V)
        repetition = column("repetition_penalty")
        repeated = torch.where(scores < 0, scores * repetition, scores / repetition)
        scores = torch.where(seen, repeated, scores)
        scores = scores - column("presence_penalty") * seen - column("frequency_penalty") * counts
        logits[rows] = scores
    if eos_rows:
        rows = torch.tensor(eos_rows, device=device)[:, None]
        logits[rows, torch.tensor(list(eos_ids), device=device)[None, :]] = float("-inf")
    return logits


def token_counts(
    histories: Sequence[Sequence[int]], vocab: int, device: torch.device
) -> torch.Tensor:
    """(R, vocab) float32: how often each token occurs in each history (histories non-empty).

    One scatter_add over the histories padded to the longest (pads add 0 to token 0)."""
    width = max(len(h) for h in histories)
    ids = torch.tensor([list(h) + [0] * (width - len(h)) for h in histories], device=device)
    lengths = torch.tensor([len(h) for h in histories], device=device)[:, None]
    weights = (torch.arange(width, device=device)[None, :] < lengths).float()  # (R, width)
    counts = torch.zeros(len(histories), vocab, device=device)
    return counts.scatter_add_(1, ids, weights)


def sampling_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Probabilities (S, V) of rows that sample: temperature, then top-k, then top-p."""
    device, vocab = logits.device, logits.shape[-1]
    temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]
    scores = logits / temperature.to(logits.dtype)
    top_k = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
    if min(top_k) < vocab:
        kth_index = torch.tensor(top_k, device=device)[:, None] - 1  # (S, 1)
        kth = scores.sort(dim=-1, descending=True).values.gather(-1, kth_index)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if any(p.top_p < 1.0 for p in params):
        # keep the smallest prefix whose mass reaches top_p (always the first token); rows
        # without top-p keep everything (cumsum rounding must not drop their tail)
        top_p = [p.top_p if p.top_p < 1.0 else float("inf") for p in params]
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= torch.tensor(top_p, device=device)[:, None]
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return probs


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a character."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """At the end: the text of the tokens still held back, an incomplete character included
        (as U+FFFD, as a decode of all the tokens would show it)."""
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :]


class TokenBytes:
    """Token id -> the bytes it stands for, memoised (logprobs report them per token).

    Byte-level BPE tokens map back to their exact bytes, so a token holding part of a UTF-8
    character gives those bytes; other tokenizers (and special tokens outside the byte alphabet)
    give the UTF-8 of the token decoded alone."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        byte_level = type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"
        self._byte_of = {c: b for b, c in bytes_to_unicode().items()} if byte_level else None
        self._memo: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        known = self._memo.get(token_id)
        if known is not None:
            return known
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if self._byte_of is not None and piece and all(c in self._byte_of for c in piece):
            known = bytes(self._byte_of[c] for c in piece)
        else:
            known = self.tokenizer.decode([token_id]).encode()
        self._memo[token_id] = known
        return known


@dataclass
class SequenceState:
    """One sequence's decoding state: tokens, emitted text, and why it ended."""

    params: SamplingParams
    eos_ids: frozenset[int]
    detokenizer: IncrementalDetokenizer
    # A chat template ends the prompt before the answer's newline (see append); a raw prompt
    # (/v1/completions) has no template, and its continuation is kept as generated.
    strip_leading_newline: bool = True
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # everything emitted so far
    _held: str = ""  # text withheld because it may be the start of a stop string
    finish_reason: str | None = None  # "stop" | "length" | None while running

    def append(self, token: int) -> str:
        """Record a generated token; return the text to emit now (may be empty)."""
        self.tokens.append(token)
        is_eos = token in self.eos_ids and len(self.tokens) > self.params.min_tokens
        if is_eos and not self.params.ignore_eos:
            self.finish_reason = "stop"
            return self._flush()
        pending = self._held + self.detokenizer.push(token)
        if not self.text and self.strip_leading_newline:
            # GLM's template ends the prompt with `<|assistant|>` and the model answers "\n...":
            # that newline belongs to the template, not the answer (nor to a "\n" stop string).
            pending = pending.lstrip("\n")
        stops = self.params.stop
        for stop in stops:
            # A stop string may straddle the emitted text and the new text.
            window = self.text[-len(stop) :] + pending if self.text else pending
            at = window.find(stop)
            if at >= 0:
                already = len(window) - len(pending)
                self.finish_reason = "stop"
                self._held = ""
                return self._emit(pending[: max(0, at - already)])
        if len(self.tokens) >= self.params.max_tokens:
            self.finish_reason = "length"
            self._held = pending
            return self._flush()
        hold = max((_overlap(pending, s) for s in stops), default=0)
        self._held = pending[len(pending) - hold :] if hold else ""
        return self._emit(pending[: len(pending) - hold])

    def _flush(self) -> str:
        """Everything still held (stop-string prefixes, an incomplete last character)."""
        out, self._held = self._held + self.detokenizer.flush(), ""
        return self._emit(out)

    def _emit(self, text: str) -> str:
        self.text += text
        return text


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0


def eos_token_ids(llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    for source in (
        llm.generation_config.eos_token_id,
        llm.config.eos_token_id,
        tokenizer.eos_token_id,
    ):
        if source is None:
            continue
        ids.update(source if isinstance(source, list) else [source])
    return frozenset(ids)


@dataclass
class Delta:
    text: str
    token: int
    finish_reason: str | None


def generate(
    llm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_embeds: torch.Tensor,
    params: SamplingParams,
    *,
    prefill_chunk: int = 512,
) -> Iterator[Delta]:
    """Stream one reply for prompt embeddings (L, H), one token at a time."""
    params.validate()
    device = prompt_embeds.device
    prompt_len = prompt_embeds.shape[0]
    cache = SlotKVCache.for_model(llm, 1, prompt_len + params.max_tokens, device)
    logits = prefill(llm, cache, prompt_embeds, 0, prefill_chunk)
    eos = eos_token_ids(llm, tokenizer)
    state = SequenceState(params, eos, IncrementalDetokenizer(tokenizer))
    generator = make_generator(params.seed)
    embed = llm.get_input_embeddings()
    position = prompt_len
    while True:
        token = sample_next(logits, [params], [state.tokens], [generator], sorted(eos))[0]
        text = state.append(token)
        yield Delta(text, token, state.finish_reason)
        if state.finish_reason is not None:
            return
        step = embed(torch.tensor([[token]], device=device))
        logits = forward_step(llm, cache, step, 0, position)
        position += 1


def prefill(
    llm: PreTrainedModel,
    cache: SlotKVCache,
    prompt_embeds: torch.Tensor,
    slot: int,
    chunk: int,
) -> torch.Tensor:
    """Write a whole prompt (L, H) into a slot in chunks; logits after its last token, (1, V)."""
    logits = None
    for start in range(0, prompt_embeds.shape[0], chunk):
        piece = prompt_embeds[start : start + chunk][None]
        logits = forward_step(llm, cache, piece, slot, start)
    assert logits is not None, "empty prompt"
    return logits
