"""The arithmetic: error rates, keyword accuracy, relative scores. Pure functions, no model.

Error rates are corpus-level, as in sclite and jiwer: the edits of all rows summed over the
reference words (characters) of all rows, not a mean of per-row rates.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from xllm.model.evaluation.text import (
    Language,
    NumberStyle,
    detect_language,
    normalize,
    simple_normalize,
)
from xllm.model.train.toy import COLORS, DIRECTIONS, SHAPES

KEYWORD_GROUPS = (frozenset(COLORS), frozenset(SHAPES), frozenset(DIRECTIONS))
KEYWORDS = frozenset().union(*KEYWORD_GROUPS)


# --- WER / CER ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorCounts:
    substitutions: int
    deletions: int
    insertions: int
    hits: int

    @property
    def reference_length(self) -> int:
        return self.substitutions + self.deletions + self.hits

    @property
    def rate(self) -> float:
        errors = self.substitutions + self.deletions + self.insertions
        if self.reference_length == 0:
            return 0.0 if errors == 0 else float("inf")
        return errors / self.reference_length

    def as_dict(self) -> dict[str, int]:
        return {
            "substitutions": self.substitutions,
            "deletions": self.deletions,
            "insertions": self.insertions,
            "hits": self.hits,
        }


def word_errors(references: Sequence[str], hypotheses: Sequence[str]) -> ErrorCounts:
    """Word edits between already normalised texts (tokens are split on whitespace)."""
    import jiwer

    if not references:
        return ErrorCounts(0, 0, 0, 0)
    out = jiwer.process_words(list(references), list(hypotheses))
    return ErrorCounts(out.substitutions, out.deletions, out.insertions, out.hits)


def char_errors(references: Sequence[str], hypotheses: Sequence[str]) -> ErrorCounts:
    """Character edits between already normalised texts (spaces count as characters)."""
    import jiwer

    if not references:
        return ErrorCounts(0, 0, 0, 0)
    out = jiwer.process_characters(list(references), list(hypotheses))
    return ErrorCounts(out.substitutions, out.deletions, out.insertions, out.hits)


def error_rates(
    references: Sequence[str],
    hypotheses: Sequence[str],
    language: Language | str = "auto",
    numbers: NumberStyle = "words",
) -> dict[str, Any]:
    """WER and CER after normalising both sides the same way, with the edit counts.

    Chinese: CER over characters with spaces removed (the primary figure); WER over the tokens
    of `normalize_chinese` (one per CJK character, Latin words whole). English: WER over words,
    CER over characters including the single spaces between words.
    """
    if len(references) != len(hypotheses):
        raise ValueError("references and hypotheses differ in length")
    lang: Language = detect_language(references) if language == "auto" else language  # type: ignore[assignment]
    refs = [normalize(r, lang, numbers) for r in references]
    hyps = [normalize(h, lang, numbers) for h in hypotheses]
    words = word_errors(refs, hyps)
    if lang == "chinese":
        chars = char_errors([r.replace(" ", "") for r in refs], [h.replace(" ", "") for h in hyps])
    else:
        chars = char_errors(refs, hyps)
    return {
        "wer": words.rate,
        "cer": chars.rate,
        "normalizer": lang,
        "numbers": numbers if lang == "english" else None,
        "reference_words": words.reference_length,
        "reference_chars": chars.reference_length,
        "word_edits": words.as_dict(),
        "char_edits": chars.as_dict(),
    }


# --- keyword accuracy -----------------------------------------------------------------------


def keywords(reference: str) -> set[str]:
    """The reference's toy-world words (colours, shapes, directions); without any, its content
    words (longer than two letters)."""
    words = set(simple_normalize(reference).split())
    found = words & KEYWORDS
    return found or {w for w in words if len(w) > 2} or words


def keyword_hit(reference: str, hypothesis: str) -> bool:
    """Every keyword of the reference appears in the answer."""
    return keywords(reference) <= set(simple_normalize(hypothesis).split())


def keyword_hit_strict(reference: str, hypothesis: str) -> bool:
    """A keyword hit that names no other word of the same kind: 'red or blue' for 'red' misses.
    (Listing every colour would pass `keyword_hit`.)"""
    wanted = keywords(reference)
    said = set(simple_normalize(hypothesis).split())
    if not wanted <= said:
        return False
    return all(not (group & wanted) or said & group <= wanted for group in KEYWORD_GROUPS)


def exact_match(reference: str, hypothesis: str) -> bool:
    return simple_normalize(reference) == simple_normalize(hypothesis)


def keyword_scores(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    pairs = list(zip(references, hypotheses, strict=True))
    if not pairs:
        raise ValueError("nothing to score")
    n = len(pairs)
    return {
        "keyword_accuracy": sum(keyword_hit(r, h) for r, h in pairs) / n,
        "keyword_accuracy_strict": sum(keyword_hit_strict(r, h) for r, h in pairs) / n,
        "exact_match": sum(exact_match(r, h) for r, h in pairs) / n,
    }


def score(task: str, references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """The headline numbers of a simple task: {'wer', 'cer'} for asr (English normalisation),
    keyword accuracy, its strict form and exact match for caption / vqa / direction."""
    if task == "asr":
        rates = error_rates(references, hypotheses, "auto")
        return {"wer": rates["wer"], "cer": rates["cer"]}
    return keyword_scores(references, hypotheses)


# --- relative score (LLaVA-Bench) -----------------------------------------------------------


@dataclass(frozen=True)
class ReviewScore:
    """A judge's two scores for one question: the reference (Assistant 1), the candidate (2)."""

    id: str
    category: str
    reference: float
    candidate: float


def relative_scores(reviews: Iterable[ReviewScore]) -> dict[str, dict[str, float]]:
    """Per category and overall ('all'): the count, the mean scores and the relative score,
    candidate total / reference total * 100 (LLaVA's `summarize_gpt_review`)."""
    groups: dict[str, list[ReviewScore]] = {}
    for review in reviews:
        groups.setdefault(review.category, []).append(review)
        groups.setdefault("all", []).append(review)
    out = {}
    for name in sorted(groups, key=lambda g: (g == "all", g)):
        group = groups[name]
        reference = sum(r.reference for r in group)
        candidate = sum(r.candidate for r in group)
        out[name] = {
            "n": len(group),
            "reference_mean": reference / len(group),
            "candidate_mean": candidate / len(group),
            "relative_score": candidate / reference * 100 if reference else float("nan"),
        }
    return out
