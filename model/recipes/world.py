"""The toy world's dialogues as the toy-world LLM is pre-trained on them.

The LLM is pre-trained on the exact prompts xllm builds at inference (the tokenizer's chat
template, `<tag>` + media span + `</tag>`, media bound by placeholder or placed before the last
user turn's text), with each media span filled by *stand-in vectors* that state the media's
content: an image span holds the colour and shape word embeddings in random slots (the rest a
`<blank>` embedding); a video span does that for every frame and adds the shape's centre as
`x * e(<px>) + y * e(<py>)`; an audio span holds its transcript's token embeddings (the C-Former
fires about once per token). The answers must be read out of the span, so the LLM learns to
read its context; the X2L interfaces then only have to produce vectors the LLM already reads.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import ClassVar

from xllm.model.config import Tags
from xllm.model.prompt import MediaSegment, bind_media, build_layout
from xllm.model.train.toy import COLORS, DIRECTIONS, SHAPES, SPOKEN_QUESTIONS, article, sentence

# Tokens that exist only inside media spans (never in text): stand-ins for the interfaces.
SPAN_TOKENS = ["<blank>", "<px>", "<py>"]
CAPTION_QUESTIONS = ("What is in the image?", "Describe the image.", "What do you see?")
COLOR_QUESTIONS = ("What color is the shape?", "What color is it?", "What colour is the shape?")
SHAPE_QUESTIONS = ("What shape is it?", "What shape is this?", "What is the shape?")
VIDEO_CAPTIONS = ("Describe the video.", "What happens in the video?")
SPOKEN_IMAGE = "Answer the spoken question about the image."
SPOKEN_VIDEO = "Answer the spoken question about the video."


def direction_questions(shape: str) -> tuple[str, ...]:
    return (
        f"Which way does the {shape} move?",
        "Where is the shape going?",
        "Which way does the shape move?",
        "Which way does it move?",
    )


def utterance(rng: random.Random) -> str:
    """Everything the toy world says (the spec's utterance kinds)."""
    color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
    kind = rng.randrange(4)
    if kind == 0:
        return f"{article(color)} {color} {shape}"
    if kind == 1:
        return f"{article(color)} {color} {shape} moving {rng.choice(DIRECTIONS)}"
    if kind == 2:
        return f"the {shape} is {color}"
    return rng.choice((*SPOKEN_QUESTIONS, "which way does it move"))


def caption(color: str, shape: str) -> str:
    return sentence(f"{article(color)} {color} {shape}")


def text_corpus(rng: random.Random, n: int) -> list[str]:
    """Plain text of the world, for training the tokenizer."""
    lines = []
    for _ in range(n):
        color, shape, way = rng.choice(sorted(COLORS)), rng.choice(SHAPES), rng.choice(DIRECTIONS)
        lines += [
            utterance(rng),
            rng.choice(CAPTION_QUESTIONS + COLOR_QUESTIONS + SHAPE_QUESTIONS + VIDEO_CAPTIONS),
            rng.choice(direction_questions(shape)),
            caption(color, shape),
            sentence(color),
            sentence(f"a {shape}"),
            sentence(way),
            sentence(f"{article(color)} {color} {shape} moving {way}"),
            "Transcribe the audio. And what color is it? And what shape is it?",
            f"{SPOKEN_IMAGE} {SPOKEN_VIDEO}",
        ]
    return lines


@dataclass
class SpanFill:
    """What fills one media segment: token ids per position, plus centre coordinates (video)."""

    ids: list[int]
    px: list[float] = field(default_factory=list)  # per position, -1..1 (video only)
    py: list[float] = field(default_factory=list)


@dataclass
class Dialogue:
    kind: str
    turns: list[tuple[str, str]]
    media_kinds: list[str]
    segments: list[list[MediaSegment]]
    fills: list[list[SpanFill]]


@dataclass
class Encoded:
    """A dialogue as LM inputs: ids (span positions hold stand-in ids), answer mask, coords."""

    kind: str
    ids: list[int]
    labels: list[bool]
    span: list[bool]
    px: list[float]
    py: list[float]


class World:
    """Draws pre-training dialogues; `tokenizer` must know the words and SPAN_TOKENS."""

    def __init__(self, tokenizer, queries: int, max_frames: int = 8, tags: Tags | None = None):
        self.tok = tokenizer
        self.queries = queries
        self.max_frames = max_frames
        self.tags = tags or Tags()
        ids = tokenizer.convert_tokens_to_ids
        self.blank, self.px_id, self.py_id = (ids(t) for t in SPAN_TOKENS)
        self.word = {w: self._one(" " + w) for w in (*COLORS, *SHAPES)}
        self.assistant = ids("<|assistant|>")
        self.newline = self._one("\n")

    def _one(self, text: str) -> int:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{text!r} is not one token: {ids}")
        return ids[0]

    # --- span contents -----------------------------------------------------------------
    def image_fill(self, rng: random.Random, color: str, shape: str) -> SpanFill:
        slots = [rng.choice((self.blank, self.blank, "c", "s")) for _ in range(self.queries)]
        a, b = rng.sample(range(self.queries), 2)
        slots[a], slots[b] = "c", "s"
        table = {"c": self.word[color], "s": self.word[shape]}
        return SpanFill([table.get(s, s) for s in slots])  # type: ignore[arg-type]

    def video_fill(
        self, rng: random.Random, color: str, shape: str, way: str, frames: int
    ) -> SpanFill:
        travel = rng.uniform(0.3, 0.8)
        start = rng.uniform(0.1, 0.9 - travel)
        along = [start + travel * t / (frames - 1) for t in range(frames)]
        if way in ("left", "up"):
            along = [1 - a for a in along]
        other = rng.uniform(0.1, 0.9)
        fill = SpanFill([])
        for a in along:
            x, y = (a, other) if way in ("left", "right") else (other, a)
            jitter = 0.02
            x, y = x + rng.gauss(0, jitter), y + rng.gauss(0, jitter)
            frame = self.image_fill(rng, color, shape)
            fill.ids += frame.ids
            fill.px += [2 * x - 1] * self.queries
            fill.py += [2 * y - 1] * self.queries
        return fill

    def audio_fill(self, text: str) -> SpanFill:
        return SpanFill(self.tok(text, add_special_tokens=False)["input_ids"])

    # --- dialogues -----------------------------------------------------------------------
    KINDS: ClassVar[dict[str, int]] = {
        "caption": 3,
        "color": 3,
        "shape": 3,
        "followup": 2,
        "direction": 4,
        "video_caption": 1,
        "asr": 4,
        "spoken_image": 3,
        "spoken_video": 1,
    }

    def draw(self, rng: random.Random, kind: str | None = None) -> Dialogue:
        kind = kind or rng.choices(list(self.KINDS), weights=list(self.KINDS.values()))[0]
        color, shape, way = rng.choice(sorted(COLORS)), rng.choice(SHAPES), rng.choice(DIRECTIONS)
        q = self.queries
        image = (
            "image",
            [MediaSegment("image", q)],
            [self.image_fill(rng, color, shape)],
        )
        frames = rng.randint(3, self.max_frames)
        video_fill = self.video_fill(rng, color, shape, way, frames)
        video = ("video", [MediaSegment("video", q * frames)], [video_fill])
        if kind in ("direction", "video_caption") and rng.random() < 0.25:
            narration = self.audio_fill(f"{article(color)} {color} {shape} moving {way}")
            video[1].append(MediaSegment("audio", len(narration.ids)))
            video[2].append(narration)
        turns: list[str]
        media: list[tuple]
        if kind == "caption":
            media, turns = [image], [rng.choice(CAPTION_QUESTIONS), caption(color, shape)]
        elif kind == "color":
            media, turns = [image], [rng.choice(COLOR_QUESTIONS), sentence(color)]
        elif kind == "shape":
            media, turns = [image], [rng.choice(SHAPE_QUESTIONS), sentence(f"a {shape}")]
        elif kind == "followup":
            first = rng.random() < 0.5
            qa = [
                (rng.choice(SHAPE_QUESTIONS), sentence(f"a {shape}")),
                (rng.choice(COLOR_QUESTIONS), sentence(color)),
                (rng.choice(CAPTION_QUESTIONS), caption(color, shape)),
            ]
            a, b = (qa[0], qa[1]) if first else (qa[rng.choice((1, 2))], qa[0])
            follow = "And what color is it?" if b[1] == sentence(color) else "And what shape is it?"
            media, turns = [image], [a[0], a[1], follow, b[1]]
        elif kind == "direction":
            media, turns = [video], [rng.choice(direction_questions(shape)), sentence(way)]
        elif kind == "video_caption":
            text = sentence(f"{article(color)} {color} {shape} moving {way}")
            media, turns = [video], [rng.choice(VIDEO_CAPTIONS), text]
        elif kind == "asr":
            text = utterance(rng)
            fill = self.audio_fill(text)
            media = [("audio", [MediaSegment("audio", len(fill.ids))], [fill])]
            turns = ["Transcribe the audio.", text]
        elif kind == "spoken_image":
            question = rng.choice(SPOKEN_QUESTIONS)
            answer = {
                "what color is the shape": sentence(color),
                "what shape is this": sentence(f"a {shape}"),
                "describe the picture": caption(color, shape),
            }[question]
            fill = self.audio_fill(question)
            audio = ("audio", [MediaSegment("audio", len(fill.ids))], [fill])
            media = [image, audio] if rng.random() < 0.7 else [audio, image]
            turns = [SPOKEN_IMAGE, answer]
        elif kind == "spoken_video":
            fill = self.audio_fill("which way does it move")
            audio = ("audio", [MediaSegment("audio", len(fill.ids))], [fill])
            media, turns = [video, audio], [SPOKEN_VIDEO, sentence(way)]
        else:
            raise ValueError(kind)
        # Media bound by placeholders ("<image> What ...") or placed before the text (the
        # server's form uploads): both tokenize differently, so both are trained.
        if kind == "followup" or rng.random() < 0.5:
            turns[0] = " ".join(f"<{m[0]}>" for m in media) + " " + turns[0]
        roles = ["user", "assistant"] * (len(turns) // 2)
        return Dialogue(
            kind,
            list(zip(roles, turns, strict=True)),
            [m[0] for m in media],
            [m[1] for m in media],
            [m[2] for m in media],
        )

    def encode(self, dialogue: Dialogue) -> Encoded:
        messages = bind_media(dialogue.turns, dialogue.media_kinds)  # type: ignore[arg-type]
        layout = build_layout(
            self.tok, messages, dialogue.segments, self.tags, add_generation_prompt=False
        )
        ids = list(layout.token_ids)
        span = [False] * len(ids)
        px = [0.0] * len(ids)
        py = [0.0] * len(ids)
        for start, length, index, seg in layout.spans:
            fill = dialogue.fills[index][seg]
            assert len(fill.ids) == length
            ids[start : start + length] = fill.ids
            span[start : start + length] = [True] * length
            if fill.px:
                px[start : start + length] = fill.px
                py[start : start + length] = fill.py
        labels = list(layout.labels_mask)
        # GLM's template puts "\n" after <|assistant|>; generation starts right after the role
        # token, so the model must emit that "\n" itself: it is a target too.
        for i in range(len(ids) - 1):
            if ids[i] == self.assistant and ids[i + 1] == self.newline:
                labels[i + 1] = True
        return Encoded(dialogue.kind, ids, labels, span, px, py)
