"""The tasks: which manifest rows each one takes, what it asks, and how it scores the answers.

    asr             audio-only rows: WER / CER (normalised, see text.py)
    masr            audio + image rows with a transcript: WER / CER with the image and without it,
                    and the difference the image makes (negative = the image helps)
    vqa             image rows with a conversation: keyword accuracy on the last answer
    caption         image rows with a caption (`text`): keyword accuracy
    direction       video rows: keyword accuracy on the direction word
    relative-score  image rows with a conversation (the last answer is the reference, e.g.
                    LLaVA's GPT-4 answer) and a `category`: a judge rates reference and
                    candidate, LLaVA-Bench style

A `text` row is asked the task's instruction; a `conversations` row is asked its turns up to the
last answer, which is the reference. Rows may carry an `id` (else "file:line"); relative-score
rows also `category` (conversation | detail | complex; LLaVA's "conv" is accepted), `context`
(captions: a string or a list) and optionally `boxes` ([{"category", "bbox"}], LLaVA's COCO set).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xllm.model.evaluation.backends import Answer, Query
from xllm.model.evaluation.metrics import error_rates, keyword_scores
from xllm.model.prompt import ASR_INSTRUCTION
from xllm.model.train.data import Example, RowError, parse_row
from xllm.model.train.toy import DIRECTIONS

TASKS = ("asr", "masr", "vqa", "caption", "direction", "relative-score")
DEFAULT_MAX_TOKENS = {
    "asr": 96,
    "masr": 96,
    "vqa": 32,
    "caption": 32,
    "direction": 32,
    "relative-score": 512,
}
INSTRUCTIONS = {
    "en": {
        "asr": ASR_INSTRUCTION,
        "masr": "Transcribe the audio, using the image as context.",
        "caption": "Describe the image.",
        "direction": "Which way does the shape move?",
    },
    # X-LLM's own instructions (ASR, multimodal ASR)
    "zh": {
        "asr": "请忠实地识别该语音",
        "masr": "请根据图片忠实地识别这段语音",
        "caption": "请描述这张图片。",
        "direction": "图中的形状往哪个方向移动？",
    },
}


class EvalError(ValueError):
    """Nothing to evaluate, or a bad manifest (the user's to fix)."""


@dataclass
class Row:
    id: str
    example: Example
    raw: dict[str, Any]


@dataclass
class Item:
    """One scored unit: its reference and the queries whose answers are scored against it."""

    id: str
    reference: str
    queries: dict[str, Query]  # condition ("answer", "with_image", ...) -> query
    extra: dict[str, Any] = field(default_factory=dict)


def read_rows(path: Path) -> tuple[list[Row], Counter[str]]:
    """A manifest's usable rows (with their raw JSON, for the extra keys) and skip reasons."""
    if not path.is_file():
        raise EvalError(f"manifest not found: {path}")
    rows: list[Row] = []
    skipped: Counter[str] = Counter()
    root = path.parent.resolve()
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            source = f"{path.name}:{number}"
            try:
                raw = json.loads(line)
                example = parse_row(raw, root, source)
            except json.JSONDecodeError:
                skipped["bad JSON"] += 1
                continue
            except RowError as exc:
                skipped[str(exc)] += 1
                continue
            rows.append(Row(str(raw.get("id") or source), example, raw))
    return rows, skipped


def _prompt(task: str, example: Example, language: str) -> tuple[list[tuple[str, str]], str] | None:
    """(turns to ask, reference) for a row: its conversation, or the task's instruction."""
    if example.turns is not None:
        return list(example.turns[:-1]), example.turns[-1][1]
    if example.text is None or task not in INSTRUCTIONS[language]:
        return None
    return [("user", INSTRUCTIONS[language][task])], example.text


def _direction_reference(text: str) -> str:
    """'A red square moving up.' -> 'up' (the word asked about); unchanged without one."""
    words = [w.strip(".,!?;:").lower() for w in text.split()]
    found = [w for w in words if w in DIRECTIONS]
    return " ".join(found) if found else text


def build_item(task: str, row: Row, language: str = "en") -> Item | None:
    """The row as an item of `task`, or None when it does not fit the task."""
    example = row.example
    kinds = set(example.kinds)
    media = tuple((kind, path) for kind, path in example.media)
    if task == "asr":
        if kinds != {"audio"}:
            return None
        prompt = _prompt(task, example, language)
    elif task == "masr":
        if kinds != {"audio", "image"} or example.text is None:
            return None
        audio_only = tuple(m for m in media if m[0] == "audio")
        instructions = INSTRUCTIONS[language]
        return Item(
            row.id,
            example.text,
            {
                "with_image": Query((("user", instructions["masr"]),), media),
                "without_image": Query((("user", instructions["asr"]),), audio_only),
            },
        )
    elif task == "caption":
        if kinds != {"image"} or example.text is None:
            return None
        prompt = _prompt(task, example, language)
    elif task == "vqa":
        if "image" not in kinds or "video" in kinds or example.turns is None:
            return None
        prompt = _prompt(task, example, language)
    elif task == "direction":
        if "video" not in kinds:
            return None
        prompt = _prompt(task, example, language)
        if prompt is not None and example.turns is None:
            prompt = (prompt[0], _direction_reference(prompt[1]))
    elif task == "relative-score":
        if "image" not in kinds or example.turns is None:
            return None
        return _relative_item(row, media)
    else:
        raise EvalError(f"unknown task {task!r}")
    if prompt is None:
        return None
    turns, reference = prompt
    return Item(row.id, reference, {"answer": Query(tuple(turns), media)})


def _relative_item(row: Row, media: tuple[tuple[str, Path], ...]) -> Item:
    from xllm.model.evaluation.judge import canonical_category
    from xllm.model.prompt import PLACEHOLDER

    turns = list(row.example.turns or ())
    asked, reference = turns[:-1], turns[-1][1]
    question = next((text for role, text in reversed(asked) if role == "user"), "")
    raw = row.raw
    context = raw.get("context", "")
    boxes = raw.get("boxes") or ()
    return Item(
        row.id,
        reference,
        {"answer": Query(tuple(asked), media)},
        {
            "category": canonical_category(raw.get("category")),
            "question": " ".join(PLACEHOLDER.sub(" ", question).split()),
            "context": context if isinstance(context, str | list) else str(context),
            "boxes": list(boxes) if isinstance(boxes, list) else [],
        },
    )


def build_items(
    task: str, rows: list[Row], language: str = "en", limit: int | None = None
) -> tuple[list[Item], int]:
    """The rows that fit the task (the first `limit`), and how many did not fit."""
    items = [item for row in rows if (item := build_item(task, row, language)) is not None]
    unfit = len(rows) - len(items)
    return (items[:limit] if limit is not None else items), unfit


# --- scoring --------------------------------------------------------------------------------


def score_items(
    task: str,
    items: list[Item],
    answers: list[dict[str, Answer]],
    normalizer: str = "auto",
    numbers: str = "words",
) -> tuple[dict[str, Any], list[int]]:
    """Metrics over the items every query of which was answered, and the failed item indexes.

    Rows whose query failed (media that would not decode, a server error) are left out of the
    metrics and reported by the caller with their ids.
    """
    ok = [i for i, a in enumerate(answers) if all(x.text is not None for x in a.values())]
    failed = sorted(set(range(len(items))) - set(ok))
    if not ok:
        return {}, failed
    refs = [items[i].reference for i in ok]

    def texts(condition: str) -> list[str]:
        return [answers[i][condition].text or "" for i in ok]

    if task == "asr":
        metrics = error_rates(refs, texts("answer"), normalizer, numbers)  # type: ignore[arg-type]
        if "transcriptions" in answers[ok[0]]:  # the same clips, /v1/audio/transcriptions
            other = error_rates(refs, texts("transcriptions"), normalizer, numbers)  # type: ignore[arg-type]
            metrics["transcriptions"] = other
            metrics["wer_transcriptions_minus_chat"] = other["wer"] - metrics["wer"]
        return metrics, failed
    if task == "masr":
        with_image = error_rates(refs, texts("with_image"), normalizer, numbers)  # type: ignore[arg-type]
        without = error_rates(refs, texts("without_image"), normalizer, numbers)  # type: ignore[arg-type]
        per_row = [
            (
                error_rates([r], [w], with_image["normalizer"], numbers)["wer"],  # type: ignore[arg-type]
                error_rates([r], [o], with_image["normalizer"], numbers)["wer"],  # type: ignore[arg-type]
            )
            for r, w, o in zip(refs, texts("with_image"), texts("without_image"), strict=True)
        ]
        metrics = {
            "wer": with_image["wer"],
            "cer": with_image["cer"],
            "wer_without_image": without["wer"],
            "cer_without_image": without["cer"],
            "wer_delta": with_image["wer"] - without["wer"],
            "cer_delta": with_image["cer"] - without["cer"],
            "rows_better_with_image": sum(w < o for w, o in per_row),
            "rows_worse_with_image": sum(w > o for w, o in per_row),
            "normalizer": with_image["normalizer"],
            "numbers": with_image["numbers"],
            "with_image": with_image,
            "without_image": without,
        }
        return metrics, failed
    if task in ("vqa", "caption", "direction"):
        return keyword_scores(refs, texts("answer")), failed
    raise EvalError(f"task {task!r} is not scored here")
