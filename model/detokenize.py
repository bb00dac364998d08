"""What one sequence has produced: tokens, text deltas that never split a character, stop
strings held back until they can be ruled out, and why the sequence ended."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from xllm.model.sampling import SamplingParams


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

    def end(self, reason: str) -> str:
        """End the sequence now (its grammar is complete): the text still held."""
        self.finish_reason = reason
        return self._flush()

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
