"""Decoding as small functions over explicit state (in the spirit of gpt-fast).

- `prefill_rows`: prompt chunks written into their slots of a `SlotKVCache` (model/kv_cache.py),
  one sequence or several of consecutive slots in one forward.
- `SlotDecoder`: one decode step over the slot prefix [0, B), plain or compiled (torch.compile,
  bucketed static shapes, CUDA graphs).
- `SlotLLM`: what the engine calls to run the frozen LLM over its KV slots; `TorchSlots` is
  the two above over a `SlotKVCache`, `LlamaCppSlots` (model/llamacpp.py) the same on llama.cpp.
- `generate`: the single-request loop built from these, `sample_next` (model/sampling.py) and a
  `SequenceState` (model/detokenize.py), used by the CLI; the server's scheduler drives the same
  functions for many sequences at once.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import AttentionInterface, PreTrainedModel, PreTrainedTokenizerBase
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from xllm.model.detokenize import IncrementalDetokenizer, SequenceState, eos_token_ids
from xllm.model.kv_cache import SlotKVCache
from xllm.model.sampling import SamplingParams, make_generator, sample_next


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


class SlotLLM(Protocol):
    """The frozen LLM over `num_slots` KV slots of `max_len` positions (the engine's contract
    with whatever runs it). Logits come back as float32 tensors on the model's device."""

    num_slots: int
    max_len: int

    @property
    def bytes(self) -> int: ...

    def prefill(
        self,
        first_slot: int,
        chunks: Sequence[tuple[torch.Tensor, int]],
        every_position: bool = False,
    ) -> torch.Tensor: ...

    def decode(
        self, slots: Sequence[int], tokens: Sequence[int], lengths: Sequence[int]
    ) -> torch.Tensor: ...

    def move(self, source: int, target: int, length: int) -> None: ...

    def exchange(self, a: int, b: int, length_a: int, length_b: int) -> None: ...


class TorchSlots:
    """`SlotLLM` in PyTorch: `prefill_rows` and a `SlotDecoder` over a `SlotKVCache`."""

    def __init__(
        self,
        llm: PreTrainedModel,
        num_slots: int,
        max_len: int,
        device: torch.device,
        compile: CompileOptions | None = None,
    ) -> None:
        self.llm = llm
        self.num_slots, self.max_len = num_slots, max_len
        self.cache = SlotKVCache.for_model(llm, num_slots, max_len, device)
        self.decode = SlotDecoder(llm, self.cache, compile)
        self.move = self.cache.move
        self.exchange = self.cache.exchange

    @property
    def bytes(self) -> int:
        return self.cache.bytes

    def prefill(
        self,
        first_slot: int,
        chunks: Sequence[tuple[torch.Tensor, int]],
        every_position: bool = False,
    ) -> torch.Tensor:
        return prefill_rows(self.llm, self.cache, first_slot, chunks, every_position)


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
    slots: SlotLLM | None = None,
) -> Iterator[Delta]:
    """Stream one reply for prompt embeddings (L, H), one token at a time, in slot 0 of `slots`
    (default: a PyTorch slot of the prompt's and reply's length)."""
    params.validate()
    prompt_len = prompt_embeds.shape[0]
    if slots is None:
        slots = TorchSlots(llm, 1, prompt_len + params.max_tokens, prompt_embeds.device)
    logits = prefill(slots, prompt_embeds, 0, prefill_chunk)
    eos = eos_token_ids(llm, tokenizer)
    state = SequenceState(params, eos, IncrementalDetokenizer(tokenizer))
    generator = make_generator(params.seed)
    position = prompt_len
    while True:
        token = sample_next(logits, [params], [state.tokens], [generator], sorted(eos))[0]
        text = state.append(token)
        yield Delta(text, token, state.finish_reason)
        if state.finish_reason is not None:
            return
        logits = slots.decode([0], [token], [position])
        position += 1


@torch.inference_mode()
def prefill(slots: SlotLLM, prompt_embeds: torch.Tensor, slot: int, chunk: int) -> torch.Tensor:
    """Write a whole prompt (L, H) into a slot in chunks; logits after its last token, (1, V)."""
    logits = None
    for start in range(0, prompt_embeds.shape[0], chunk):
        logits = slots.prefill(slot, [(prompt_embeds[start : start + chunk], start)])
    assert logits is not None, "empty prompt"
    return logits
