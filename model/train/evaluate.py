"""`xllm eval`: greedy answers on a manifest, scored per task.

    asr        WER and CER (jiwer) on lower-cased, punctuation-free text
    caption    keyword accuracy: every keyword of the reference appears in the answer
    vqa        the same, on the last assistant answer of each conversation
    direction  the same, for videos (the keyword is the direction)

Keywords are the reference's toy-world words (colours, shapes, directions); a reference without
any uses its content words (longer than two letters). A `text` row is asked the task's
instruction; a `conversations` row is asked its turns up to the last answer, which is the
reference.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from xllm.model.train.data import Example, read_manifest
from xllm.model.train.toy import COLORS, DIRECTIONS, SHAPES

TASK_KIND = {"caption": "image", "asr": "audio", "vqa": "image", "direction": "video"}
TASK_INSTRUCTION = {
    "caption": "Describe the image.",
    "asr": "Transcribe the audio.",
    "direction": "Which way does the shape move?",
}
KEYWORDS = frozenset(COLORS) | frozenset(SHAPES) | frozenset(DIRECTIONS)
SHOWN_EXAMPLES = 5


class EvalError(ValueError):
    """Nothing to evaluate, or a bad manifest (the user's to fix)."""


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def keywords(reference: str) -> set[str]:
    words = set(normalize(reference).split())
    found = words & KEYWORDS
    return found or {w for w in words if len(w) > 2} or words


def keyword_hit(reference: str, hypothesis: str) -> bool:
    return keywords(reference) <= set(normalize(hypothesis).split())


def task_prompt(task: str, example: Example) -> tuple[list[tuple[str, str]], str] | None:
    """(turns to ask, reference answer), or None when the row does not fit the task."""
    if TASK_KIND[task] not in example.kinds:
        return None
    if example.turns is not None:
        return list(example.turns[:-1]), example.turns[-1][1]
    if task == "vqa" or example.text is None:
        return None
    return [("user", TASK_INSTRUCTION[task])], example.text


def score(task: str, references: list[str], hypotheses: list[str]) -> dict[str, float]:
    if task == "asr":
        import jiwer

        refs = [normalize(r) for r in references]
        hyps = [normalize(h) for h in hypotheses]
        return {"wer": jiwer.wer(refs, hyps), "cer": jiwer.cer(refs, hyps)}
    hits = [keyword_hit(r, h) for r, h in zip(references, hypotheses, strict=True)]
    exact = [normalize(r) == normalize(h) for r, h in zip(references, hypotheses, strict=True)]
    return {"keyword_accuracy": sum(hits) / len(hits), "exact_match": sum(exact) / len(exact)}


def evaluate_manifest(
    model_dir: Path,
    data: Path,
    task: str,
    *,
    limit: int | None = None,
    max_tokens: int = 32,
    device: str = "auto",
    quantize: str = "none",
) -> dict[str, Any]:
    from xllm.model.checkpoint import load_model

    if not data.is_file():
        raise EvalError(f"manifest not found: {data}")
    manifest = read_manifest(data)
    asked = [(e, p) for e in manifest.examples if (p := task_prompt(task, e)) is not None]
    skipped = sum(manifest.skipped.values()) + len(manifest.examples) - len(asked)
    asked = asked[:limit] if limit is not None else asked
    if not asked:
        raise EvalError(f"{data}: no rows fit the {task} task")
    model = load_model(model_dir, device=device, quantize=quantize)  # type: ignore[arg-type]
    references, hypotheses = [], []
    for example, (turns, reference) in asked:
        hypotheses.append(answer(model, example, turns, max_tokens))
        references.append(reference)
    result: dict[str, Any] = {
        "task": task,
        "model": str(model_dir),
        "data": str(data),
        "rows": len(asked),
        "skipped": skipped,
    }
    result.update(score(task, references, hypotheses))
    pairs = list(zip(references, hypotheses, strict=True))[:SHOWN_EXAMPLES]
    result["examples"] = [{"reference": r, "answer": h} for r, h in pairs]
    return result


def answer(model: Any, example: Example, turns: list[tuple[str, str]], max_tokens: int) -> str:
    """Greedy reply of the model to the row's media and turns."""
    from xllm.model.generate import SamplingParams, generate
    from xllm.model.media import load_media_file
    from xllm.model.prompt import bind_media

    interface = model.config.image_interface
    video = {"fps": interface.video_fps, "max_frames": interface.max_frames} if interface else {}
    prepared = []
    for kind, path in example.media:
        media = load_media_file(path, kind, **(video if kind == "video" else {}))
        prepared.append(model.prepare(kind, media))
    with torch.inference_mode():
        encoded = model.encode(prepared)
        layout = model.layout(bind_media(turns, example.kinds), encoded)
        embeds = model.embed(layout, encoded)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return "".join(delta.text for delta in generate(model.llm, model.tokenizer, embeds, params))
