"""Grammar-constrained decoding (structured outputs), with llguidance.

A JSON Schema is compiled once per request into a grammar (`json_schema_grammar`, no tokenizer
needed, so the API process refuses what cannot be enforced before a place is taken); the engine
gives each constrained sequence a matcher over its tokenizer (`GrammarGuide.matcher`) and, per
step, computes the allowed tokens of the constrained rows only, in one batch
(`GrammarGuide.constrained`), and sets the others to -inf (`GrammarGuide.apply`). The caller
computes them after launching the forward and before reading its logits: on CUDA the forward's
kernels run meanwhile. A step without constrained rows costs a scan of the batch, nothing else.
Why llguidance (and not xgrammar): docs/ARCHITECTURE.md, "Structured outputs".
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch
from transformers import PreTrainedTokenizerBase

# What a client's schema may cost: its JSON text and the nesting of its objects and arrays
MAX_SCHEMA_CHARS = 32_768
MAX_SCHEMA_DEPTH = 32
# Compact JSON: no whitespace between tokens (a random or weak model could otherwise spend its
# whole budget on blanks that the grammar allows)
_JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """A schema that cannot be enforced; the message names the part."""


def json_schema_grammar(schema: Any = None) -> str:
    """The grammar of JSON values matching `schema` (None: any JSON object), as llguidance's
    grammar text. GrammarError when the schema is too large or deep, not a schema, or uses what
    the library cannot enforce (named)."""
    if schema is None:
        schema = {"type": "object"}
    if not isinstance(schema, dict):
        raise GrammarError("the JSON schema must be a JSON object")
    size = len(json.dumps(schema))
    if size > MAX_SCHEMA_CHARS:
        raise GrammarError(
            f"the JSON schema has {size} characters; at most {MAX_SCHEMA_CHARS} are accepted"
        )
    depth = _depth(schema)
    if depth > MAX_SCHEMA_DEPTH:
        raise GrammarError(
            f"the JSON schema nests {depth} levels deep; at most {MAX_SCHEMA_DEPTH} are accepted"
        )
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise GrammarError(f"the JSON schema cannot be used: {exc}") from None
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise GrammarError("the JSON schema cannot be enforced: " + "; ".join(messages))
    return grammar


def _depth(value: Any) -> int:
    """Nesting of dicts and lists in a JSON document (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth) for child in children)
    return deepest


class GrammarGuide:
    """Matchers and token masks for one tokenizer and one width of logits.

    The tokenizer's llguidance form is built on first use (a model that never sees a
    constrained request never pays for it)."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_ids: Iterable[int]
    ) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_ids)
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None  # for several rows at once
        # bit i of the mask's word w: token 32 * w + i
        self._shifts = torch.arange(32, dtype=torch.int32)

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        if self._ll_tokenizer is None:
            self._ll_tokenizer = llguidance.hf.from_tokenizer(
                self._tokenizer, n_vocab=self.vocab_size, eos_token=self._eos or None
            )
        return self._ll_tokenizer

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher; GrammarError if the grammar fails against this tokenizer."""
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar)
        if matcher.is_error():
            raise GrammarError(f"the JSON schema cannot be enforced: {matcher.get_error()}")
        return matcher

    def masks(self, matchers: Sequence[llguidance.LLMatcher]) -> torch.Tensor:
        """Allowed tokens (R, vocab_size) bool, one row per matcher, from its current state."""
        words = (self.vocab_size + 31) // 32
        bits = torch.zeros(len(matchers), words, dtype=torch.int32)
        if len(matchers) == 1:
            matchers[0].unsafe_compute_mask_ptr(bits.data_ptr(), words * 4)
        else:  # all rows in one call, on llguidance's own threads (without the GIL)
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            rows = [(matcher, row) for row, matcher in enumerate(matchers)]
            llguidance.torch.fill_next_token_bitmask_par(self._executor, rows, bits)
        allowed = (bits[:, :, None] >> self._shifts) & 1  # (R, words, 32)
        return allowed.flatten(1)[:, : self.vocab_size].bool()

    def constrained(
        self, matchers: Sequence[llguidance.LLMatcher | None]
    ) -> tuple[list[int], torch.Tensor] | None:
        """The batch's constrained rows (matcher not None) and their allowed tokens (R, V);
        None when no row is constrained. Give the result to `apply`."""
        rows = [row for row, matcher in enumerate(matchers) if matcher is not None]
        if not rows:
            return None
        return rows, self.masks([matchers[row] for row in rows])  # type: ignore[misc]

    @staticmethod
    def apply(
        logits: torch.Tensor, constrained: tuple[list[int], torch.Tensor] | None
    ) -> torch.Tensor:
        """logits (B, V) with every token the constrained rows' grammars forbid at -inf (a new
        tensor); the same tensor when no row is constrained."""
        if constrained is None:
            return logits
        rows, allowed = constrained
        allowed = allowed.to(logits.device)
        width = min(allowed.shape[1], logits.shape[1])
        forbidden = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        index = torch.tensor(rows, device=logits.device)
        forbidden[index] = True  # beyond the tokenizer's tokens too
        forbidden[index, :width] = ~allowed[:, :width]
        return logits.masked_fill(forbidden, float("-inf"))
