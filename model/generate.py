"""Decoding as small functions over explicit state (in the spirit of gpt-fast).

- `SlotKVCache`: preallocated K/V buffers (layers x slots x kv_heads x max_len x head_dim) with
  static shapes; every sequence owns one slot, so sequences join and leave a running batch freely.
- `forward_step`: one LLM forward over (B, q) new embeddings written at per-row positions.
- `sample_next`: per-row logits processing and sampling.
- `SequenceState`: what one sequence has produced (tokens, text, stop/length state).
- `generate`: the single-request loop built from these, used by the CLI; the server's scheduler
  drives the same functions for many sequences at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from xllm.model.config import SamplingDefaults


@dataclass
class SamplingParams:
    max_tokens: int = 512
    min_tokens: int = 0  # EOS is suppressed until this many tokens were generated
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # over the tokens generated so far (HF semantics)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

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

    Before each forward, `bind` says which slots the batch rows are and at which positions their
    new tokens go; each attention layer then calls `update`, which writes the new K/V there and
    returns the rows' K/V up to `kv_len` (masking of stale positions is the caller's 4-D mask).
    """

    is_compileable = False

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
        self._slots = torch.zeros(0, dtype=torch.long, device=device)
        self._positions = torch.zeros(0, 1, dtype=torch.long, device=device)
        self._kv_len = 0

    @classmethod
    def for_model(
        cls, llm: PreTrainedModel, num_slots: int, max_len: int, device: torch.device
    ) -> SlotKVCache:
        config = llm.config.get_text_config()
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        dtype = llm.get_input_embeddings().weight.dtype
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            dtype = torch.float32
        return cls(config.num_hidden_layers, num_slots, max_len, kv_heads, head_dim, dtype, device)

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def bind(self, slots: torch.Tensor, positions: torch.Tensor, kv_len: int) -> None:
        """slots (B,), positions (B, q) where the new tokens go, kv_len = max position + 1."""
        self._slots, self._positions, self._kv_len = slots, positions, kv_len

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states: (B, kv_heads, q, head_dim); buffers: (slots, kv_heads, max_len, head_dim)
        rows = self._slots[:, None]  # (B, 1) broadcast against positions (B, q)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[rows, :, self._positions] = key_states.transpose(1, 2).to(keys.dtype)
        values[rows, :, self._positions] = value_states.transpose(1, 2).to(values.dtype)
        return keys[self._slots, :, : self._kv_len], values[self._slots, :, : self._kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len


def attention_mask_4d(positions: torch.Tensor, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, q, kv_len): row b's query at position p sees its own slot's 0..p."""
    keys = torch.arange(kv_len, device=positions.device)
    allowed = keys[None, None, :] <= positions[:, :, None]  # (B, q, kv_len)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=positions.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


@torch.inference_mode()
def forward_step(
    llm: PreTrainedModel,
    cache: SlotKVCache,
    embeds: torch.Tensor,
    slots: torch.Tensor,
    starts: torch.Tensor,
) -> torch.Tensor:
    """embeds (B, q, H) written at positions starts[b] .. starts[b]+q-1 of slot slots[b].

    Returns the logits of each row's last position, (B, V) in float32.
    """
    q = embeds.shape[1]
    positions = starts[:, None] + torch.arange(q, device=starts.device)[None, :]  # (B, q)
    kv_len = int(starts.max().item()) + q
    cache.bind(slots, positions, kv_len)
    mask = attention_mask_4d(positions, kv_len, embeds.dtype)
    out = llm(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1].float()


def sample_next(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator | None],
    eos_ids: Sequence[int],
) -> list[int]:
    """Next token per row of logits (B, V), each row with its own sampling parameters."""
    logits = logits.clone()
    for row, p in enumerate(params):
        history = histories[row]
        if p.repetition_penalty != 1.0 and history:
            seen = torch.tensor(sorted(set(history)), device=logits.device)
            scores = logits[row, seen]
            logits[row, seen] = torch.where(
                scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty
            )
        if len(history) < p.min_tokens and eos_ids:
            logits[row, list(eos_ids)] = float("-inf")
    greedy = logits.argmax(dim=-1).tolist()
    tokens = []
    for row, p in enumerate(params):
        if p.temperature == 0:
            tokens.append(greedy[row])
            continue
        scores = logits[row] / p.temperature
        if p.top_k > 0:
            kth = torch.topk(scores, min(p.top_k, scores.shape[-1])).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (always the first token)
            drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
            sorted_probs[drop] = 0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        token = torch.multinomial(probs.cpu(), 1, generator=generators[row]).item()
        tokens.append(int(token))
    return tokens


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


@dataclass
class SequenceState:
    """One sequence's decoding state: tokens, emitted text, and why it ended."""

    params: SamplingParams
    eos_ids: frozenset[int]
    detokenizer: IncrementalDetokenizer
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
        if not self.text:
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
        out, self._held = self._held, ""
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
    slot = torch.zeros(1, dtype=torch.long, device=device)
    logits = prefill(llm, cache, prompt_embeds, slot, prefill_chunk)
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
        logits = forward_step(llm, cache, step, slot, torch.tensor([position], device=device))
        position += 1


def prefill(
    llm: PreTrainedModel,
    cache: SlotKVCache,
    prompt_embeds: torch.Tensor,
    slot: torch.Tensor,
    chunk: int,
) -> torch.Tensor:
    """Write a whole prompt (L, H) into a slot in chunks; logits after its last token, (1, V)."""
    logits = None
    for start in range(0, prompt_embeds.shape[0], chunk):
        piece = prompt_embeds[start : start + chunk][None]
        logits = forward_step(llm, cache, piece, slot, torch.tensor([start], device=slot.device))
    assert logits is not None, "empty prompt"
    return logits
