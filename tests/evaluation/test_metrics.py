"""The arithmetic, on hand-made references and predictions (counts worked out by hand)."""

from __future__ import annotations

import pytest

from xllm.model.evaluation.backends import Answer, Query
from xllm.model.evaluation.metrics import (
    ReviewScore,
    error_rates,
    keyword_hit,
    keyword_hit_strict,
    keyword_scores,
    relative_scores,
    score,
)
from xllm.model.evaluation.tasks import Item, score_items
from xllm.model.evaluation.text import (
    detect_language,
    normalize_chinese,
    normalize_english,
    number_to_words,
)

# --- normalisation ---


@pytest.mark.parametrize(
    ("text", "words", "digits"),
    [
        ("The Star, is BLUE!", "the star is blue", "the star is blue"),
        (
            "He paid 1,250 on the 21st.",
            "he paid one thousand two hundred fifty on the twenty first",
            "he paid 1250 on the 21st",
        ),
        ("one hundred and twenty-five", "one hundred twenty five", "125"),
        ("3.5% of 7", "three point five percent of seven", "3.5 percent of 7"),
        ("don't  stop", "don't stop", "don't stop"),
        ("one two three", "one two three", "1 2 3"),
        ("a thousand", "a thousand", "a thousand"),  # "a" is not a number word
        ("zero", "zero", "0"),
        ("2nd and 11th", "second and eleventh", "2nd and 11th"),
    ],
)
def test_english_normaliser(text: str, words: str, digits: str) -> None:
    assert normalize_english(text, "words") == words
    assert normalize_english(text, "digits") == digits


def test_numbers_match_either_way() -> None:
    """A reference in words and a hypothesis in digits meet in the middle, in both styles."""
    for style in ("words", "digits"):
        assert normalize_english("twenty one birds", style) == normalize_english("21 birds", style)
        assert normalize_english("one thousand and one", style) == normalize_english("1001", style)
    assert normalize_english("21 birds", "keep") == "21 birds"
    assert number_to_words(1_000_042) == "one million forty two"


def test_chinese_normaliser() -> None:
    # full-width letters, digits and punctuation fold; one token per CJK character
    assert normalize_chinese("ＡＢＣ，你好！　我用 iPhone１５。") == "abc 你 好 我 用 iphone15"
    assert normalize_chinese("“厨房”用具、") == "厨 房 用 具"
    assert detect_language(["你好", "世界", "hello"]) == "chinese"
    assert detect_language(["hello", "world", "你好"]) == "english"


# --- WER / CER ---


def test_english_error_rates_count_edits() -> None:
    # ref 1: "a red circle" vs "a red" -> 1 deletion; ref 2: "the star is blue" vs
    # "the star was blue too" -> 1 substitution, 1 insertion. 7 reference words, 3 edits.
    rates = error_rates(["A red circle.", "the star is blue"], ["a red", "The star was blue too"])
    assert rates["normalizer"] == "english"
    assert rates["word_edits"] == {"substitutions": 1, "deletions": 1, "insertions": 1, "hits": 5}
    assert rates["wer"] == pytest.approx(3 / 7)
    assert rates["reference_words"] == 7
    # characters: "a red circle" -> "a red" deletes " circle" (7); "is" -> "was" is 1
    # substitution + 1 insertion, " too" adds 4: 13 edits over 12 + 16 characters
    assert rates["cer"] == pytest.approx(13 / 28)


def test_error_rates_are_corpus_level() -> None:
    """Summed edits over summed reference length, not a mean of per-row rates."""
    rates = error_rates(["a", "b c d e f g h i j"], ["x", "b c d e f g h i j"], "english")
    assert rates["wer"] == pytest.approx(1 / 10)  # the mean of row rates would be 0.5


def test_numbers_do_not_count_as_errors() -> None:
    rates = error_rates(["twenty one birds"], ["21 birds"])
    assert rates["wer"] == 0.0
    assert error_rates(["twenty one birds"], ["21 birds"], numbers="keep")["wer"] == pytest.approx(
        2 / 3
    )


def test_chinese_cer() -> None:
    # 厨房用具 vs 厨房用品: 1 substitution of 4 characters; punctuation and width ignored
    rates = error_rates(["厨房用具。"], ["厨房 用品"], "auto")
    assert rates["normalizer"] == "chinese"
    assert rates["cer"] == pytest.approx(1 / 4)
    assert rates["char_edits"] == {"substitutions": 1, "deletions": 0, "insertions": 0, "hits": 3}
    assert error_rates(["ＡＢ你好"], ["ab你好"], "chinese")["cer"] == 0.0


def test_legacy_score() -> None:
    assert score("asr", ["the star is blue"], ["The star is blue."]) == {"wer": 0.0, "cer": 0.0}
    assert score("asr", ["a red circle"], ["a red"])["wer"] == pytest.approx(1 / 3)


# --- keyword accuracy ---


def test_keyword_accuracy() -> None:
    assert keyword_hit("A red circle.", "a RED circle, surely")
    assert not keyword_hit("A red circle.", "a blue circle")
    assert keyword_hit("Red.", "red or blue or green")  # lenient: every keyword is there
    assert not keyword_hit_strict("Red.", "red or blue or green")  # strict: no other colour
    assert keyword_hit_strict("A red circle.", "It is a red circle.")
    assert keyword_hit_strict("Left.", "It moves left, slowly.")
    refs = ["A red circle.", "Left.", "Blue.", "A star."]
    hyps = ["a red circle", "it goes left", "blue or red", "a square"]
    assert keyword_scores(refs, hyps) == {
        "keyword_accuracy": 3 / 4,
        "keyword_accuracy_strict": 2 / 4,
        "exact_match": 1 / 4,
    }


# --- tasks' scoring over answers ---


def _item(ref: str, *conditions: str) -> Item:
    return Item(ref, ref, {c: Query((("user", "q"),)) for c in conditions})


def test_masr_difference_the_image_makes() -> None:
    items = [
        _item("a red circle", "with_image", "without_image"),
        _item("the star is blue", "with_image", "without_image"),
    ]
    answers = [
        {"with_image": Answer("a red circle"), "without_image": Answer("a bed circle")},
        {"with_image": Answer("the star is blue"), "without_image": Answer("the star is blue")},
    ]
    metrics, failed = score_items("masr", items, answers)
    assert failed == []
    assert metrics["wer"] == 0.0 and metrics["wer_without_image"] == pytest.approx(1 / 7)
    assert metrics["wer_delta"] == pytest.approx(-1 / 7)  # negative: the image helps
    assert metrics["rows_better_with_image"] == 1 and metrics["rows_worse_with_image"] == 0


def test_failed_rows_are_left_out_and_reported() -> None:
    items = [_item("a red circle", "answer"), _item("a blue star", "answer")]
    answers = [{"answer": Answer("a red circle")}, {"answer": Answer(None, "MediaError: bad")}]
    metrics, failed = score_items("asr", items, answers)
    assert failed == [1] and metrics["wer"] == 0.0 and metrics["reference_words"] == 3


# --- relative score ---


def test_relative_scores_per_category() -> None:
    reviews = [
        ReviewScore("1", "conversation", 8, 6),
        ReviewScore("2", "conversation", 10, 9),
        ReviewScore("3", "detail", 7, 7),
        ReviewScore("4", "complex", 9, 3),
    ]
    out = relative_scores(reviews)
    assert list(out) == ["complex", "conversation", "detail", "all"]
    assert out["conversation"]["relative_score"] == pytest.approx(15 / 18 * 100)
    assert out["conversation"]["reference_mean"] == 9.0
    assert out["detail"]["relative_score"] == pytest.approx(100.0)
    assert out["complex"]["relative_score"] == pytest.approx(100 / 3)
    # overall: candidate total / reference total, not a mean of the category scores
    assert out["all"] == {
        "n": 4,
        "reference_mean": 34 / 4,
        "candidate_mean": 25 / 4,
        "relative_score": pytest.approx(25 / 34 * 100),
    }
