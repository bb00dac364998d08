"""Sampling: per-row logits processing (penalties, min_tokens), the draw, and logprobs.

The ranges of the OpenAI sampling parameters live here, for every layer that checks them (the
HTTP schemas, the form fields and `SamplingParams.validate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from xllm.model.config import SamplingDefaults

PENALTY_LIMIT = 2.0  # presence_penalty and frequency_penalty lie in [-PENALTY_LIMIT, PENALTY_LIMIT]
MAX_TOP_LOGPROBS = 20  # alternatives per token a request may ask for (chat's top_logprobs)
MAX_COMPLETION_LOGPROBS = 5  # the same for /v1/completions' `logprobs` (OpenAI's legacy limit)
MAX_CHOICES = 16  # OpenAI's n: choices sampled from one prompt


@dataclass(frozen=True)
class Range:
    """The values a sampling parameter may take. `bounds` are the keyword arguments of
    pydantic's `Field` and FastAPI's `Form`, so the HTTP schemas check what `validate` does."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    @property
    def bounds(self) -> dict[str, float]:
        named = {"ge": self.ge, "gt": self.gt, "le": self.le}
        return {name: value for name, value in named.items() if value is not None}

    def __contains__(self, value: float) -> bool:
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
        )


MAX_TOKENS = Range(ge=1)
MIN_TOKENS = Range(ge=0)  # and at most max_tokens
TEMPERATURE = Range(ge=0)
OPENAI_TEMPERATURE = Range(ge=0, le=2)  # OpenAI's schemas cap it too
TOP_P = Range(gt=0, le=1)
TOP_K = Range(ge=0)  # 0: off
REPETITION_PENALTY = Range(gt=0)
PENALTY = Range(ge=-PENALTY_LIMIT, le=PENALTY_LIMIT)  # presence_penalty, frequency_penalty
TOP_LOGPROBS = Range(ge=0, le=MAX_TOP_LOGPROBS)
COMPLETION_LOGPROBS = Range(ge=0, le=MAX_COMPLETION_LOGPROBS)
CHOICES = Range(ge=1, le=MAX_CHOICES)


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
        if self.max_tokens not in MAX_TOKENS:
            raise ValueError("max_tokens must be at least 1")
        if self.min_tokens not in MIN_TOKENS or self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must be between 0 and max_tokens")
        if self.temperature not in TEMPERATURE:
            raise ValueError("temperature must be >= 0")
        if self.top_p not in TOP_P:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k not in TOP_K:
            raise ValueError("top_k must be >= 0")
        if self.repetition_penalty not in REPETITION_PENALTY:
            raise ValueError("repetition_penalty must be > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in PENALTY:
                raise ValueError(f"{name} must be between {-PENALTY_LIMIT:g} and {PENALTY_LIMIT:g}")
        if self.logprobs is not None and self.logprobs not in TOP_LOGPROBS:
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


def choice_seed(seed: int | None, choice: int) -> int | None:
    """The seed of choice `choice` of n sampled from one prompt: seed + choice (wrapped into
    the 64 bits a generator takes), so a seeded request repeats its n answers and each differs;
    without a seed every choice draws its own."""
    if seed is None or choice == 0:
        return seed
    value = seed + choice
    return value - 2**64 if value >= 2**64 else value


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
