"""The judge: review prompt format, score parsing, and the client's retry, limits and cache."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.evaluation.judge_standin import JudgeStandIn
from xllm.model.evaluation.judge import (
    RULE_BENCH,
    RULE_COCO,
    JudgeClient,
    JudgeError,
    ReviewParseError,
    chat_completions_url,
    parse_review,
    review_content,
    rule_for,
)


def test_review_content_llava_layout() -> None:
    content = review_content("What is it?", "A cat.", "A dog.", ["Cap one.", "Cap two."])
    assert content == (
        "[Context]\nCap one.\nCap two.\n\n"
        "[Question]\nWhat is it?\n\n"
        "[Assistant 1]\nA cat.\n\n[End of Assistant 1]\n\n"
        "[Assistant 2]\nA dog.\n\n[End of Assistant 2]\n\n"
        f"[System]\n{RULE_BENCH}\n\n"
    )
    boxes = [{"category": "cat", "bbox": [0.1, 0.2, 0.5, 0.9]}]
    coco = review_content("Q", "R", "C", "Caption.", boxes, rule_for("conversation", True))
    assert coco.startswith("[Context]\nCaption.\n\ncat: [0.1, 0.2, 0.5, 0.9]\n\n[Question]\nQ")
    assert RULE_COCO in coco and "bounding box" in RULE_COCO and "bounding box" not in RULE_BENCH


def test_rules_from_a_rule_file() -> None:
    rules = {"conv": "COCO conv", "llava_bench_conv": "wild conv", "default": "fallback"}
    assert rule_for("conversation", True, rules) == "COCO conv"
    assert rule_for("conversation", False, rules) == "wild conv"
    assert rule_for("detail", False, rules) == "fallback"


@pytest.mark.parametrize(
    ("text", "scores"),
    [
        ("8 6\nreason", (8.0, 6.0)),
        ("8, 6\nreason", (8.0, 6.0)),
        ("  7.5   9 \n", (7.5, 9.0)),
        ("10 1", (10.0, 1.0)),
    ],
)
def test_parse_review(text: str, scores: tuple[float, float]) -> None:
    assert parse_review(text) == scores


@pytest.mark.parametrize(
    "text",
    ["", "Assistant 1: 8, Assistant 2: 6", "8\n6", "8 6 7", "eight six", "11 5", "0 5", "8/10 6"],
)
def test_unparseable_reviews(text: str) -> None:
    with pytest.raises(ReviewParseError):
        parse_review(text)


def test_endpoint_urls() -> None:
    assert chat_completions_url("https://api.openai.com/v1") == (
        "https://api.openai.com/v1/chat/completions"
    )
    assert chat_completions_url("http://h:8/") == "http://h:8/v1/chat/completions"
    assert chat_completions_url("http://h/x/chat/completions") == "http://h/x/chat/completions"


def client(judge: JudgeStandIn, cache: Path | None, **kwargs) -> JudgeClient:
    return JudgeClient(judge.url, "m", cache_dir=cache, backoff=0.01, **kwargs)


def test_retries_then_caches(tmp_path: Path) -> None:
    with JudgeStandIn(busy=2, errors=1) as judge:
        first = client(judge, tmp_path)
        replies = first.review_all(["a", "b"])
        assert [r.text for r in replies] == [
            "8 6\nAssistant 1 is more accurate; Assistant 2 misses details."
        ] * 2
        assert judge.calls == 5 and first.calls == 5 and first.retried == 3
        judge.reset()
        again = client(judge, tmp_path)
        assert [r.cached for r in again.review_all(["a", "b"])] == [True, True]
        assert judge.calls == 0 and again.cache_hits == 2
        # the key is the whole request: another model or temperature is another review
        other = JudgeClient(judge.url, "other-model", cache_dir=tmp_path)
        other.review_all(["a"])
        assert judge.calls == 1


def test_gives_up_after_retries(tmp_path: Path) -> None:
    with JudgeStandIn(errors=10) as judge:
        reply = client(judge, tmp_path, retries=2).review_all(["a"])[0]
    assert reply.text is None and "gave up after 3 attempts" in (reply.error or "")
    assert judge.calls == 3
    assert not list(tmp_path.rglob("*.json"))  # failures are not cached


def test_refusal_is_fatal() -> None:
    with JudgeStandIn(status=401) as judge, pytest.raises(JudgeError, match="401"):
        client(judge, None).review_all(["a"])
    assert judge.calls == 1


def test_concurrency_and_rate_limits() -> None:
    """Lower bounds only (a busy machine can only make things slower)."""
    with JudgeStandIn(delay=0.2) as judge:
        started = time.monotonic()
        client(judge, None, concurrency=2).review_all([str(i) for i in range(6)])
        elapsed = time.monotonic() - started
    assert judge.max_in_flight <= 2 and elapsed >= 3 * 0.2  # 6 calls, 2 at a time
    with JudgeStandIn() as judge:
        started = time.monotonic()
        client(judge, None, concurrency=8, rps=20).review_all([str(i) for i in range(5)])
        elapsed = time.monotonic() - started
    assert judge.calls == 5 and elapsed >= 4 / 20  # starts 50 ms apart


def test_damaged_cache_entry_is_asked_again(tmp_path: Path) -> None:
    with JudgeStandIn() as judge:
        first = client(judge, tmp_path)
        first.review_all(["a"])
        (entry,) = tmp_path.rglob("*.json")
        entry.write_text("{not json")
        client(judge, tmp_path).review_all(["a"])
    assert judge.calls == 2
