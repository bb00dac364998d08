"""`xllm eval pack`: an offline benchmark pack from the toy world, one manifest per task.

    DIR/pack.json             what was made: seed, n, the task manifests
    DIR/asr.jsonl             spoken toy utterances and their transcripts
    DIR/masr.jsonl            a picture and a spoken description of it (image + audio + text)
    DIR/vqa.jsonl             questions about a picture (colour, shape; some with a follow-up)
    DIR/caption.jsonl         pictures and their captions
    DIR/direction.jsonl       clips of a moving shape and "which way" questions
    DIR/relative-score.jsonl  LLaVA-Bench-style questions in three categories (conversation,
                              detail, complex) with templated reference answers and captions as
                              the judge's context
    DIR/images, audio, videos the media

Each item is drawn from its own RNG seeded by (seed, task, index), so the pack does not depend on
the number of worker processes. Speech needs espeak-ng. The pack measures the plumbing and the
toy-world skills a tiny recipe can learn; its numbers are not comparable with published ones.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from xllm.model.evaluation.tasks import TASKS
from xllm.model.train.toy import (
    COLORS,
    DIRECTIONS,
    Scene,
    article,
    chat,
    image_dialogue,
    make_audio,
    make_image,
    make_video,
    phrase,
    random_scene,
    relative,
    require_espeak,
    sentence,
    utterance,
)

PACK_VERSION = 1
SPEECH_TASKS = frozenset({"asr", "masr"})
CATEGORIES = ("conversation", "detail", "complex")
FOLDERS = {"image": "images", "audio": "audio", "video": "videos"}


def background(scene: Scene) -> str:
    return "light" if sum(scene.background) / 3 > 127 else "dark"


def asr_row(rng: random.Random, root: Path, stem: str) -> dict[str, Any]:
    text = utterance(rng)
    return {"audio": relative(make_audio(rng, text, root / "audio" / stem), root), "text": text}


def masr_row(rng: random.Random, root: Path, stem: str) -> dict[str, Any]:
    scene = random_scene(rng)
    spoken = rng.choice(
        (
            phrase(scene),
            f"the {scene.shape} is {scene.color}",
            f"this is {phrase(scene)}",
            f"i can see {phrase(scene)}",
        )
    )
    image = make_image(rng, scene, root / "images" / f"{stem}-image")
    audio = make_audio(rng, spoken, root / "audio" / f"{stem}-speech")
    return {"image": relative(image, root), "audio": relative(audio, root), "text": spoken}


def vqa_row(rng: random.Random, root: Path, stem: str) -> dict[str, Any]:
    scene = random_scene(rng)
    image = relative(make_image(rng, scene, root / "images" / stem), root)
    return {"image": image, "conversations": image_dialogue(rng, scene, "<image> ")}


def caption_row(rng: random.Random, root: Path, stem: str) -> dict[str, Any]:
    scene = random_scene(rng)
    image = relative(make_image(rng, scene, root / "images" / stem), root)
    return {"image": image, "text": sentence(phrase(scene))}


def direction_row(rng: random.Random, root: Path, stem: str) -> dict[str, Any]:
    scene, direction = random_scene(rng), rng.choice(DIRECTIONS)
    video = relative(make_video(rng, scene, direction, root / "videos" / stem), root)
    question = rng.choice((f"Which way does the {scene.shape} move?", "Where is the shape going?"))
    return {"video": video, "conversations": chat(f"<video> {question}", sentence(direction))}


CORNERS = {
    "circle": "None: it is a circle, a round shape without corners or straight edges.",
    "square": "Four: it is a square, with four equal sides meeting at four right angles.",
    "triangle": "Three: it is a triangle, with three straight sides and three corners.",
    "star": "Ten: the star has five outer points and five inner corners between them.",
}


def relative_question(rng: random.Random, scene: Scene, category: str) -> tuple[str, str]:
    """(question, reference answer) of a category, about the scene."""
    color, shape, bg = scene.color, scene.shape, background(scene)
    if category == "conversation":
        return rng.choice(
            (
                ("What color is the shape in the image?", f"The shape in the image is {color}."),
                ("What shape is shown in the image?", f"The image shows {article(shape)} {shape}."),
                (
                    "Is the background of the image light or dark?",
                    f"The background is {bg}: a plain {bg} backdrop behind the {color} {shape}.",
                ),
                (
                    "How many shapes are there in the image?",
                    f"There is exactly one shape in the image: {phrase(scene)}.",
                ),
            )
        )
    if category == "detail":
        question = rng.choice(
            ("Describe the image in detail.", "What is in this picture? Describe it in detail.")
        )
        return question, (
            f"The image shows a single {color} {shape} on a plain {bg} background. The {shape} "
            "is a flat, filled shape with no outline, texture or shadow, and nothing else is in "
            "the picture: no text and no other objects."
        )
    other = rng.choice(sorted(set(COLORS) - {color}))
    return rng.choice(
        (
            (
                f"If the shape were painted {other}, what would change in the image?",
                f"Only the colour of the shape would change: the image would show "
                f"{article(other)} {other} {shape} instead of {article(color)} {color} one, on "
                f"the same plain {bg} background.",
            ),
            (
                "Why does the shape stand out in this image?",
                f"It is the only object in the picture, and its {color} colour contrasts with "
                f"the plain {bg} background, so nothing competes with it for attention.",
            ),
            ("How many corners does the shape have? Explain.", CORNERS[shape]),
        )
    )


def relative_row(rng: random.Random, root: Path, stem: str, index: int) -> dict[str, Any]:
    scene = random_scene(rng)
    category = CATEGORIES[index % len(CATEGORIES)]
    question, answer = relative_question(rng, scene, category)
    image = relative(make_image(rng, scene, root / "images" / stem), root)
    bg = background(scene)
    context = [
        sentence(phrase(scene)),
        f"A single {scene.color} {scene.shape} on a plain {bg} background.",
        f"A simple picture of one {scene.shape}, coloured {scene.color}.",
    ]
    return {
        "image": image,
        "category": category,
        "context": context,
        "conversations": chat(f"<image>\n{question}", answer),
    }


ROW_MAKERS: dict[str, Callable[[random.Random, Path, str], dict[str, Any]]] = {
    "asr": asr_row,
    "masr": masr_row,
    "vqa": vqa_row,
    "caption": caption_row,
    "direction": direction_row,
}


def make_item(job: tuple[str, int, int, str]) -> dict[str, Any]:
    """One pack row with its media; runs in a worker process."""
    task, index, seed, root = job
    rng = random.Random(f"xllm-eval-pack/{seed}/{task}/{index}")
    stem = f"{task}-{index:05d}"
    if task == "relative-score":
        row = relative_row(rng, Path(root), stem, index)
    else:
        row = ROW_MAKERS[task](rng, Path(root), stem)
    return {"id": stem, **row}


def make_pack(
    out: str | Path,
    n: int,
    seed: int = 0,
    tasks: tuple[str, ...] | list[str] = TASKS,
    jobs: int | None = None,
    progress: bool = False,
) -> dict[str, Path]:
    """Write the pack: `n` items for each task. Returns the manifest paths by task."""
    if n < 1:
        raise ValueError("n must be at least 1")
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task(s): {', '.join(sorted(unknown))}")
    if SPEECH_TASKS & set(tasks):
        require_espeak()
    root = Path(out).resolve()
    for folder in FOLDERS.values():
        (root / folder).mkdir(parents=True, exist_ok=True)
    plan = [(task, i, seed, str(root)) for task in tasks for i in range(n)]
    # a worker process costs seconds to start (imports): small packs are made in this one
    workers = max(1, min(jobs or os.cpu_count() or 1, 8, len(plan) // 64))
    from tqdm import tqdm

    with tqdm(total=len(plan), desc="pack", unit="item", disable=not progress) as bar:
        if workers == 1:
            rows = []
            for job in plan:
                rows.append(make_item(job))
                bar.update(1)
        else:
            with ProcessPoolExecutor(workers) as pool:
                rows = []
                for row in pool.map(make_item, plan, chunksize=4):
                    rows.append(row)
                    bar.update(1)
    written: dict[str, Path] = {}
    for task in tasks:
        path = root / f"{task}.jsonl"
        task_rows = [row for (t, *_), row in zip(plan, rows, strict=True) if t == task]
        path.write_text("".join(json.dumps(row) + "\n" for row in task_rows))
        written[task] = path
    meta = {
        "generator": "xllm eval pack",
        "version": PACK_VERSION,
        "seed": seed,
        "n": n,
        "tasks": {task: path.name for task, path in written.items()},
    }
    (root / "pack.json").write_text(json.dumps(meta, indent=2) + "\n")
    return written
