"""`xllm data scenes`: synthetic training data wider than the toy world, for a real frozen LLM.

Images hold one to five coloured shapes, each in one cell of a 3 x 3 grid (so "where is it"
has one answer), small or large, on a light or dark background that may be textured; videos
move one shape left, right, up, down or diagonally over such a background; speech says
thousands of varied sentences (`sentences.py`) in many voices of several TTS engines, with
noise (`speech_synth.py`). Every answer is computed from the scene drawn, and every row records
its scene (`scene`) or its voice (`speech`), so answers can be checked.

Every item is drawn from its own seeded RNG (seed, split, manifest, index), so the output does
not depend on --jobs. Training and validation rows use training voices and training sentences
only; `generate_heldout` speaks held-out sentences in held-out voices, for evaluation.

Written files (media paths are relative to DIR):
    image_{train,val}.jsonl   captions and questions (colour, shape, count, position, size,
                              background) about images
    speech_{train,val}.jsonl  utterances with transcripts (`source`: the sentence's origin)
    video_{train,val}.jsonl   captions and "which way" questions about moving shapes
    mixed_{train,val}.jsonl   image chats with follow-ups, narrated videos, transcription
                              instructions, spoken questions about images
    spoken_{train,val}.jsonl  spoken general questions: `typed` is the question as text and
                              `target` stays null until `fill_llm_answers` writes the frozen
                              LLM's own answer to it (X-LLM stage 3); unfilled rows are skipped
                              by `xllm train` (they have no conversation yet)
With `generate_heldout` (--heldout N), for evaluation only:
    speech_heldout.jsonl, spoken_heldout.jsonl, spoken_image_heldout.jsonl
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from xllm.model.train import speech_synth, toy
from xllm.model.train.sentences import Sentence, is_heldout, sentence_pool, sentences
from xllm.model.train.toy import (
    Job,
    article,
    chat,
    manifest_rows,
    relative,
    replace_manifest,
    sentence,
)

COLORS: dict[str, tuple[int, int, int]] = {
    **toy.COLORS,
    "pink": (245, 130, 190),
    "brown": (135, 85, 45),
}
SHAPES = (*toy.SHAPES, "hexagon", "cross")
# Grid cell (row, column) -> where it is, as the answers say it.
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "in the top left corner",
    (0, 1): "at the top",
    (0, 2): "in the top right corner",
    (1, 0): "on the left",
    (1, 1): "in the center",
    (1, 2): "on the right",
    (2, 0): "in the bottom left corner",
    (2, 1): "at the bottom",
    (2, 2): "in the bottom right corner",
}
# Direction -> its words; diagonal moves combine a vertical and a horizontal one.
DIRECTIONS: dict[str, str] = {d: d for d in toy.DIRECTIONS} | {
    f"{v}-{h}": f"{v} and {h}" for v in ("up", "down") for h in ("left", "right")
}
NUMBERS = ("zero", "one", "two", "three", "four", "five")
COUNT_WEIGHTS = (30, 25, 20, 15, 10)  # shapes per image, 1 to 5
SIZES = {"small": (0.35, 0.55), "large": (0.75, 0.95)}  # radius, as a fraction of a half cell
TEXTURES = ("plain", "gradient", "checked", "striped", "noisy")
MANIFESTS = ("image", "speech", "video", "mixed", "spoken")
HELDOUT_MANIFESTS = ("speech", "spoken", "spoken_image")
SPEECH_SOURCES = (("fortunes", 0.6), ("question", 0.25), ("scene", 0.15))  # share of utterances
SPOKEN_PROMPT = "<audio>"  # the user turn of a spoken question: the speech alone, as if typed
SPOKEN_IMAGE_PROMPT = "<image> <audio> Answer the spoken question about the image."
CAPTION_QUESTIONS = (*toy.CAPTION_QUESTIONS, "What shapes are in the picture?")


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x")) else "s")


# --- scenes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Background:
    tone: str  # "light" | "dark"
    texture: str  # one of TEXTURES
    rgb: tuple[int, int, int]
    pattern_seed: int  # draws the texture's details (stripe width, noise)

    def phrase(self) -> str:
        """'a dark striped background', 'a plain light background'."""
        words = f"plain {self.tone}" if self.texture == "plain" else f"{self.tone} {self.texture}"
        return f"a {words} background"


@dataclass(frozen=True)
class Item:
    """One shape of an image, in grid cell (row, column)."""

    color: str
    shape: str
    size: str  # "small" | "large"
    cell: tuple[int, int]
    rgb: tuple[int, int, int]  # the colour after jitter
    centre: tuple[float, float]
    radius: float
    angle: float

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def phrase(self) -> str:
        return f"{article(self.color)} {self.color} {self.shape}"


@dataclass(frozen=True)
class ImageScene:
    size: tuple[int, int]
    background: Background
    items: tuple[Item, ...]  # in reading order (by cell)

    def record(self) -> dict[str, Any]:
        """The scene as the manifest row keeps it, for checking answers."""
        return {"background": asdict(self.background), "items": [asdict(i) for i in self.items]}


def random_color(rng: random.Random) -> tuple[str, tuple[int, int, int]]:
    color = rng.choice(sorted(COLORS))
    return color, toy.jitter(rng, COLORS[color])


def random_background(rng: random.Random) -> Background:
    """Near-grey light or dark, as the toy world's, so the shapes' colour words stay true; a
    light one starts lower than the toy's, leaving room for a texture."""
    tone = "light" if rng.random() < 0.5 else "dark"
    low = rng.randint(200, 225) if tone == "light" else rng.randint(0, 30)
    return Background(tone, rng.choice(TEXTURES), toy.greyish(rng, low), rng.getrandbits(32))


def paint_background(background: Background, size: tuple[int, int]) -> Image.Image:
    """The background at `size`; textures vary the base colour by at most about 20 levels."""
    width, height = size
    rng = np.random.default_rng(background.pattern_seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    if background.texture == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        ramp = xs * math.cos(angle) + ys * math.sin(angle)
        offset = 20 * (ramp - ramp.min()) / max(1.0, float(np.ptp(ramp))) - 10
    elif background.texture == "checked":
        period = rng.integers(8, 33)
        offset = np.where(((xs // period + ys // period) % 2) == 0, 8.0, -8.0)
    elif background.texture == "striped":
        period, angle = rng.integers(6, 25), rng.choice((0.0, math.pi / 2, math.pi / 4))
        offset = np.where(((xs * math.cos(angle) + ys * math.sin(angle)) // period) % 2 == 0, 9, -9)
    elif background.texture == "noisy":
        offset = rng.normal(0, 6, (height, width)).clip(-15, 15)
    else:
        offset = np.zeros((height, width), np.float32)
    pixels = np.asarray(background.rgb, np.float32) + offset[..., None]
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")


def random_items(rng: random.Random, size: tuple[int, int], count: int) -> tuple[Item, ...]:
    """`count` shapes in distinct grid cells, each inside its cell."""
    width, height = size
    cell_w, cell_h = width / 3, height / 3
    items = []
    for row, col in sorted(rng.sample(sorted(POSITIONS), count)):
        color, rgb = random_color(rng)
        size_word = rng.choice(sorted(SIZES))
        radius = rng.uniform(*SIZES[size_word]) * min(cell_w, cell_h) / 2
        slack_x, slack_y = cell_w / 2 - radius, cell_h / 2 - radius
        centre = (
            (col + 0.5) * cell_w + rng.uniform(-slack_x, slack_x),
            (row + 0.5) * cell_h + rng.uniform(-slack_y, slack_y),
        )
        shape, angle = rng.choice(SHAPES), rng.uniform(0, 2 * math.pi)
        items.append(Item(color, shape, size_word, (row, col), rgb, centre, radius, angle))
    return tuple(items)


def random_image_scene(rng: random.Random) -> ImageScene:
    size = toy.random_size(rng, 128, 512)
    count = rng.choices(range(1, len(COUNT_WEIGHTS) + 1), weights=COUNT_WEIGHTS)[0]
    return ImageScene(size, random_background(rng), random_items(rng, size, count))


def draw_scene(scene: ImageScene) -> Image.Image:
    image = paint_background(scene.background, scene.size)
    pen = ImageDraw.Draw(image)
    for item in scene.items:
        toy.draw_shape(pen, item.shape, item.rgb, item.centre, item.radius, item.angle)
    return image


def save_image(rng: random.Random, image: Image.Image, path: Path) -> Path:
    fmt = rng.choice(toy.IMAGE_FORMATS)
    path = path.with_suffix("." + fmt)
    image.save(path, format=fmt.upper(), **({} if fmt == "png" else {"quality": 90}))
    return path


# --- questions about an image -------------------------------------------------------------


def caption(scene: ImageScene, rng: random.Random) -> str:
    """'A red circle on the left.' / 'Two shapes: a red circle on the left and ...'."""
    parts = [f"{item.phrase()} {item.position}" for item in scene.items]
    if rng.random() < 0.3:  # sometimes the sizes too
        parts = [
            f"{article(i.size)} {i.size} {i.color} {i.shape} {i.position}" for i in scene.items
        ]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    text = listed if len(parts) == 1 else f"{NUMBERS[len(parts)]} shapes: {listed}"
    if rng.random() < 0.3:
        text += f", on {scene.background.phrase()}"
    return sentence(text)


def unique(items: tuple[Item, ...], key: Callable[[Item], Any]) -> list[Item]:
    """The items whose key no other item shares."""
    keys = [key(i) for i in items]
    return [i for i, k in zip(items, keys, strict=True) if keys.count(k) == 1]


def image_questions(scene: ImageScene, rng: random.Random) -> list[tuple[str, str]]:
    """Every kind of question this scene answers unambiguously, one (question, answer) each."""
    items = scene.items
    color, shape = rng.choice(items).color, rng.choice(items).shape
    colored = sum(i.color == color for i in items)
    shaped = sum(i.shape == shape for i in items)
    qa = [
        (rng.choice(CAPTION_QUESTIONS), caption(scene, rng)),
        ("How many shapes are there?", sentence(NUMBERS[len(items)])),
        (f"How many {color} shapes are there?", sentence(NUMBERS[colored])),
        (f"How many {plural(shape)} are there?", sentence(NUMBERS[shaped])),
        ("What is the background like?", sentence(scene.background.phrase())),
    ]
    if by_kind := unique(items, lambda i: (i.color, i.shape)):
        item = rng.choice(by_kind)
        qa += [(f"Where is the {item.color} {item.shape}?", sentence(item.position))]
        qa += [(f"Is the {item.color} {item.shape} small or large?", sentence(item.size))]
    if by_shape := unique(items, lambda i: i.shape):
        item = rng.choice(by_shape)
        question = f"What color is the {item.shape}?"
        if len(items) == 1:  # a lone shape is asked about unnamed as often as by name
            unnamed = ("What color is the shape?", "What color is it?")
            question = rng.choice((*unnamed, question, question))
        qa += [(question, sentence(item.color))]
    if by_color := unique(items, lambda i: i.color):
        item = rng.choice(by_color)
        question = (
            "What shape is it?" if len(items) == 1 else f"What shape is the {item.color} one?"
        )
        qa += [(question, sentence(f"{article(item.shape)} {item.shape}"))]
    item = rng.choice(items)
    qa += [(f"What is {item.position}?", sentence(item.phrase()))]
    return qa


def trained_question(scene: ImageScene, rng: random.Random) -> tuple[str, str]:
    """A question to speak in training data: never a held-out sentence (the count and background
    questions, asked of every scene, are not held out, so one is always left)."""
    return rng.choice([qa for qa in image_questions(scene, rng) if not is_heldout(qa[0])])


# --- videos -------------------------------------------------------------------------------


def straight_move(
    rng: random.Random, direction: str, size: tuple[int, int], radius: float
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Start and end centres; a diagonal move combines toy.motion's vertical and horizontal."""
    if "-" not in direction:
        return toy.motion(rng, direction, size, radius)
    vertical, horizontal = direction.split("-")
    (x0, _), (x1, _) = toy.motion(rng, horizontal, size, radius)
    (_, y0), (_, y1) = toy.motion(rng, vertical, size, radius)
    return (x0, y0), (x1, y1)


def random_motion(rng: random.Random) -> dict[str, Any]:
    """What a video shows: a shape, its colour, its direction (a third diagonal), background."""
    diagonal = rng.random() < 1 / 3
    direction = rng.choice(
        sorted(set(DIRECTIONS) - set(toy.DIRECTIONS)) if diagonal else toy.DIRECTIONS
    )
    color, rgb = random_color(rng)
    return {
        "color": color,
        "rgb": rgb,
        "shape": rng.choice(SHAPES),
        "direction": direction,
        "background": random_background(rng),
    }


def motion_phrase(motion: dict[str, Any]) -> str:
    """'a red circle moving up and left'."""
    color, shape = motion["color"], motion["shape"]
    return f"{article(color)} {color} {shape} moving {DIRECTIONS[motion['direction']]}"


def make_video(
    rng: random.Random, path: Path, motion: dict[str, Any], narration: str | None = None
) -> tuple[Path, dict[str, Any]]:
    """The shape of `motion` moving in a straight line over its background, 1-4 s at 5-30 fps,
    96-256 px; with `narration`, spoken in a training voice as the audio track. Returns the path
    and the scene record (with the narration and its voice)."""
    size = toy.random_size(rng, 96, 256, even=True)
    radius = rng.uniform(0.20, 0.40) * min(size) / 2
    (x0, y0), (x1, y1) = straight_move(rng, motion["direction"], size, radius)
    fps = rng.randint(5, 30)
    count = max(2, round(rng.uniform(1.0, 4.0) * fps))
    angle = rng.uniform(0, 2 * math.pi)
    canvas = paint_background(motion["background"], size)

    def frame_at(t: float) -> Image.Image:
        image = canvas.copy()
        centre = (x0 + t * (x1 - x0), y0 + t * (y1 - y0))
        toy.draw_shape(ImageDraw.Draw(image), motion["shape"], motion["rgb"], centre, radius, angle)
        return image

    scene = motion | {"background": asdict(motion["background"])}

    def narrate() -> tuple[np.ndarray, int]:
        assert narration is not None
        samples, settings = speech_synth.render(rng, narration, speech_synth.pick_voice(rng, False))
        scene["narration"], scene["speech"] = narration, settings
        return samples, speech_synth.RATE

    path = toy.encode_video(rng, path, size, fps, count, frame_at, narrate if narration else None)
    return path, scene


def direction_question(rng: random.Random, scene: dict[str, Any]) -> tuple[str, str]:
    question = rng.choice(
        (
            f"Which way does the {scene['shape']} move?",
            "Where is the shape going?",
            f"In which direction is the {scene['color']} {scene['shape']} moving?",
        )
    )
    return question, sentence(DIRECTIONS[scene["direction"]])


# --- speech -------------------------------------------------------------------------------


def pick_sentence(rng: random.Random, heldout: bool, source: str | None = None) -> Sentence:
    """A sentence of the split; without `source`, a source by SPEECH_SOURCES' shares."""
    if source is None:
        names, shares = zip(*SPEECH_SOURCES, strict=True)
        source = rng.choices(names, weights=shares)[0]
    return rng.choice(sentences(source, heldout))


# --- manifest rows ------------------------------------------------------------------------


def image_row(rng: random.Random, root: Path, stem: str, heldout: bool) -> dict[str, Any]:
    scene = random_image_scene(rng)
    image = relative(save_image(rng, draw_scene(scene), root / "images" / stem), root)
    row: dict[str, Any] = {"image": image}
    if rng.random() < 0.4:
        row["text"] = caption(scene, rng)
    else:
        turns = rng.sample(image_questions(scene, rng), 2 if rng.random() < 0.3 else 1)
        flat = [text for qa in turns for text in qa]
        row["conversations"] = chat(f"<image> {flat[0]}", *flat[1:])
    return row | {"scene": scene.record()}


def speech_row(rng: random.Random, root: Path, stem: str, heldout: bool) -> dict[str, Any]:
    chosen = pick_sentence(rng, heldout)
    path, settings = speech_synth.speak_to_file(rng, chosen.text, root / "audio" / stem, heldout)
    row = {"audio": relative(path, root), "text": chosen.text, "source": chosen.source}
    return row | {"speech": settings}


def video_row(rng: random.Random, root: Path, stem: str, heldout: bool) -> dict[str, Any]:
    motion = random_motion(rng)
    path, scene = make_video(rng, root / "videos" / stem, motion)
    row: dict[str, Any] = {"video": relative(path, root)}
    if rng.random() < 0.5:
        row["text"] = sentence(motion_phrase(motion))
    else:
        question, answer = direction_question(rng, scene)
        row["conversations"] = chat(f"<video> {question}", answer)
    return row | {"scene": scene}


def mixed_row(rng: random.Random, root: Path, stem: str, heldout: bool) -> dict[str, Any]:
    """Stage-3 instructions: image chat with a follow-up, narrated video, transcription,
    spoken question about an image."""
    base = root / "mixed" / stem
    kind = rng.randrange(4)
    if kind == 0:
        scene = random_image_scene(rng)
        image = relative(save_image(rng, draw_scene(scene), base), root)
        turns = rng.sample(image_questions(scene, rng), 2)
        flat = [text for qa in turns for text in qa]
        conversation = chat(f"<image> {flat[0]}", *flat[1:])
        return {"image": image, "conversations": conversation, "scene": scene.record()}
    if kind == 1:
        motion = random_motion(rng)
        while is_heldout(sentence(motion_phrase(motion))):  # never a held-out sentence
            motion = random_motion(rng)
        path, scene = make_video(rng, base, motion, narration=sentence(motion_phrase(motion)))
        question, answer = direction_question(rng, scene)
        conversation = chat(f"<video> {question}", answer)
        return {"video": relative(path, root), "conversations": conversation, "scene": scene}
    if kind == 2:
        chosen = pick_sentence(rng, heldout=False)
        path, settings = speech_synth.speak_to_file(rng, chosen.text, base, heldout=False)
        conversation = chat("<audio> Transcribe the audio.", chosen.text)
        row = {"audio": relative(path, root), "conversations": conversation}
        return row | {"source": chosen.source, "speech": settings}
    return spoken_image(rng, root, base, heldout=False)


def spoken_image(rng: random.Random, root: Path, base: Path, heldout: bool) -> dict[str, Any]:
    """An image and a spoken question about it (base-image.*, base-question.flac); the answer
    comes from the scene. Training never speaks a held-out sentence; held-out rows may."""
    scene = random_image_scene(rng)
    if heldout:
        question, answer = rng.choice(image_questions(scene, rng))
    else:
        question, answer = trained_question(scene, rng)
    image = relative(save_image(rng, draw_scene(scene), base.with_name(base.name + "-image")), root)
    question_path = base.with_name(base.name + "-question")
    audio, settings = speech_synth.speak_to_file(rng, question, question_path, heldout)
    row = {"image": image, "audio": relative(audio, root)}
    row |= {"conversations": chat(SPOKEN_IMAGE_PROMPT, answer), "spoken": question}
    return row | {"scene": scene.record(), "speech": settings}


def spoken_image_row(rng: random.Random, root: Path, stem: str, heldout: bool) -> dict[str, Any]:
    return spoken_image(rng, root, root / "spoken" / stem, heldout)


def spoken_row(rng: random.Random, root: Path, stem: str, heldout: bool) -> dict[str, Any]:
    """A spoken general question; its target is the frozen LLM's answer, filled in later."""
    chosen = pick_sentence(rng, heldout, source="question")
    path, settings = speech_synth.speak_to_file(rng, chosen.text, root / "spoken" / stem, heldout)
    row = {"audio": relative(path, root), "typed": chosen.text, "target": None}
    return row | {"source": chosen.source, "speech": settings}


ROW_MAKERS: dict[str, Callable[[random.Random, Path, str, bool], dict[str, Any]]] = {
    "image": image_row,
    "speech": speech_row,
    "video": video_row,
    "mixed": mixed_row,
    "spoken": spoken_row,
    "spoken_image": spoken_image_row,  # held-out evaluation only; training has them in mixed
}
FOLDERS = ("images", "audio", "videos", "mixed", "spoken")


def make_row(job: Job) -> dict[str, Any]:
    """One manifest row with its media; runs in a worker process."""
    manifest, split, index, seed, root = job
    rng = random.Random(f"xllm-scenes/{seed}/{split}/{manifest}/{index}")
    return ROW_MAKERS[manifest](rng, Path(root), f"{split}-{index:05d}", split == "heldout")


def prepare(out: str | Path, manifests: tuple[str, ...]) -> Path:
    """Check the engines and the sentence pool before any work, and make the folders."""
    unknown = sorted(set(manifests) - set(ROW_MAKERS))
    if unknown:
        raise ValueError(f"unknown manifests {unknown}; known: {', '.join(ROW_MAKERS)}")
    speech_synth.require_voices()
    sentence_pool()  # raises ToolMissingError without the fortunes packages
    root = Path(out).resolve()
    for folder in FOLDERS:
        (root / folder).mkdir(parents=True, exist_ok=True)
    return root


def generate_scenes(
    out: str | Path,
    n: int,
    seed: int = 0,
    n_val: int | None = None,
    jobs: int | None = None,
    manifests: tuple[str, ...] = MANIFESTS,
) -> dict[str, Path]:
    """Write n training and n_val (default n/4, at least 1) validation rows per manifest.

    Returns the manifest paths by name ("image_train", ...). `jobs` bounds the worker processes
    (default: the CPU count, at most 8).
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    n_val = max(1, n // 4) if n_val is None else n_val
    if n_val < 0:
        raise ValueError("n_val must be at least 0")
    root = prepare(out, manifests)
    plan = [(m, "train", i, seed, str(root)) for m in manifests for i in range(n)]
    plan += [(m, "val", i, seed, str(root)) for m in manifests for i in range(n_val)]
    return toy.write_manifests(root, plan, toy.run_jobs(make_row, plan, jobs))


def generate_heldout(
    out: str | Path, n: int, seed: int = 0, jobs: int | None = None
) -> dict[str, Path]:
    """Evaluation speech in held-out voices: n rows each of speech_heldout.jsonl (held-out
    sentences with transcripts), spoken_heldout.jsonl (held-out general questions, targets null)
    and spoken_image_heldout.jsonl (spoken questions about images, answers from the scene)."""
    if n < 1:
        raise ValueError("n must be at least 1")
    root = prepare(out, HELDOUT_MANIFESTS)
    plan = [(m, "heldout", i, seed, str(root)) for m in HELDOUT_MANIFESTS for i in range(n)]
    return toy.write_manifests(root, plan, toy.run_jobs(make_row, plan, jobs))


def transcribe_spoken_questions(root: str | Path, split: str) -> int:
    """Add each spoken question's clip to the speech manifest as a transcription row (its text:
    the question as typed). The same clip is then written down when asked to transcribe and
    answered when not: the pair teaches the frozen LLM, which follows a spoken instruction
    rather than copy it, which one the user asked for. Clips already there are not added again;
    the file is replaced whole. Returns how many rows were added."""
    root = Path(root)
    speech = root / f"speech_{split}.jsonl"
    rows = manifest_rows(speech)
    present = {row["audio"] for row in rows}
    added = [
        {"audio": q["audio"], "text": q["typed"], "source": q["source"], "speech": q["speech"]}
        for q in manifest_rows(root / f"spoken_{split}.jsonl")
        if q["audio"] not in present
    ]
    replace_manifest(speech, rows + added)
    return len(added)


def fill_llm_answers(manifest: str | Path, answer_fn: Callable[[str], str]) -> int:
    """Write the frozen LLM's answer to each unfilled spoken question of a manifest.

    `answer_fn(typed)` answers the typed question (the recipe runs the frozen LLM greedily); each
    distinct question is asked once. Rows get `target` and a conversation whose user turn is the
    speech alone (SPOKEN_PROMPT). The file is replaced whole, so an interrupted fill leaves it
    as it was. Returns how many rows were filled.
    """
    path = Path(manifest)
    rows = manifest_rows(path)
    answers: dict[str, str] = {}
    filled = 0
    for row in rows:
        if "typed" not in row or row.get("target") is not None:
            continue
        if row["typed"] not in answers:
            answer = answer_fn(row["typed"]).strip()
            if not answer:
                raise ValueError(f"empty answer to {row['typed']!r}")
            answers[row["typed"]] = answer
        row["target"] = answers[row["typed"]]
        row["conversations"] = chat(SPOKEN_PROMPT, row["target"])
        filled += 1
    replace_manifest(path, rows)
    return filled
