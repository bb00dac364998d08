"""`xllm data toy`: a small synthetic world of shapes, for training and testing the whole pipeline.

Images hold one shape (circle, square, triangle, 5-pointed star) in one of six colours on a plain
light or dark background; videos move one shape in a straight line; speech is English by
espeak-ng. Every item is drawn from its own seeded RNG (seed, split, manifest, index), so the
output does not depend on how many processes made it.

Written files (media paths in the manifests are relative to DIR):
    image_{train,val}.jsonl   captions (`text`) and questions (`conversations`) about images
    speech_{train,val}.jsonl  utterances with transcripts
    video_{train,val}.jsonl   captions and "which way" questions about moving shapes
    mixed_{train,val}.jsonl   instructions mixing image, video with its audio track, speech, and
                              spoken questions about images, with follow-up turns
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "star")
DIRECTIONS = ("left", "right", "up", "down")
VOICES = ("en-us", "en-gb", "en-gb-x-rp", "en-029", "en-gb-scotland")
VARIANTS = tuple(f"m{i}" for i in range(1, 8)) + tuple(f"f{i}" for i in range(1, 6))
SAMPLE_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000)  # all valid for MP3 too
IMAGE_FORMATS = ("png", "jpeg", "webp")
AUDIO_FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS")}
AUDIO_FORMATS["mp3"] = ("MP3", "MPEG_LAYER_III")
# (container, video codec, audio codec for a narrated clip)
VIDEO_FORMATS = (("mp4", "libx264", "aac"), ("webm", "libvpx", "libopus"))
VIDEO_FORMATS += (("webm", "libvpx-vp9", "libopus"),)
MANIFESTS = ("image", "speech", "video", "mixed")
Job = tuple[str, str, int, int, str]  # (manifest, split, index, seed, root) of one row

CAPTION_QUESTIONS = ("What is in the image?", "Describe the image.", "What do you see?")
SPOKEN_QUESTIONS = (
    "what color is the shape",
    "what shape is this",
    "describe the picture",
)


class ToolMissingError(RuntimeError):
    """A system program the generator needs is not installed; the message says how to get it."""


def require_espeak() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise ToolMissingError(
            "espeak-ng is not installed; toy speech needs it: `apt-get install espeak-ng` "
            "(Debian/Ubuntu) or `brew install espeak-ng` (macOS)"
        )
    return path


# --- scenes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    rgb: tuple[int, int, int]  # the colour after jitter
    background: tuple[int, int, int]


def article(color: str) -> str:
    return "an" if color[0] in "aeiou" else "a"


def phrase(scene: Scene) -> str:
    """'a red circle' (an utterance; captions capitalise it and add a full stop)."""
    return f"{article(scene.color)} {scene.color} {scene.shape}"


def sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def jitter(rng: random.Random, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """A colour with each channel moved by up to 20, so a colour word names a range."""
    return tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in rgb)  # type: ignore[return-value]


def greyish(rng: random.Random, low: int) -> tuple[int, int, int]:
    """A near-grey: each channel low..low+20."""
    return tuple(low + rng.randint(0, 20) for _ in range(3))  # type: ignore[return-value]


def random_scene(rng: random.Random) -> Scene:
    color = rng.choice(sorted(COLORS))
    rgb = jitter(rng, COLORS[color])
    # light: each channel 200-255, within 20 of each other; dark: each channel 0-50
    low = rng.randint(200, 235) if rng.random() < 0.5 else rng.randint(0, 30)
    background = greyish(rng, low)
    return Scene(color, rng.choice(SHAPES), rgb, background)


def random_size(rng: random.Random, low: int, high: int, even: bool = False) -> tuple[int, int]:
    """(width, height) with each side in [low, high] and aspect ratio within 3:4 .. 4:3."""
    while True:
        width, height = rng.randint(low, high), rng.randint(low, high)
        if even:
            width, height = width - width % 2, height - height % 2  # H.264 wants even sides
        if 3 / 4 <= width / height <= 4 / 3:
            return width, height


def shape_points(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple]:
    """Polygon of a shape inscribed in the circle (cx, cy, radius), rotated by `angle` radians."""
    if shape == "square":
        corners = [(angle + math.pi / 4 + k * math.pi / 2, radius) for k in range(4)]
    elif shape == "triangle":
        corners = [(angle + k * 2 * math.pi / 3, radius) for k in range(3)]
    elif shape == "hexagon":
        corners = [(angle + k * math.pi / 3, radius) for k in range(6)]
    elif shape == "cross":  # a plus sign whose arms are a third of its width
        arm = math.atan2(1, 3)  # corner of an arm's end, seen from the centre
        inner = radius * math.sqrt(2) / math.sqrt(10)  # where two arms meet
        corners = []
        for k in range(4):
            axis = angle + k * math.pi / 2
            corners += [(axis - arm, radius), (axis + arm, radius), (axis + math.pi / 4, inner)]
    else:  # star: 5 outer points, 5 inner at the regular star's ratio
        inner = radius * math.sin(math.pi / 10) / math.sin(7 * math.pi / 10)
        corners = [(angle + k * math.pi / 5, radius if k % 2 == 0 else inner) for k in range(10)]
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a, r in corners]


def draw_shape(
    pen: ImageDraw.ImageDraw,
    shape: str,
    rgb: tuple[int, int, int],
    centre: tuple[float, float],
    radius: float,
    angle: float,
) -> None:
    """Fill one shape inscribed in the circle (centre, radius)."""
    cx, cy = centre
    if shape == "circle":
        pen.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=rgb)
    else:
        pen.polygon(shape_points(shape, cx, cy, radius, angle), fill=rgb)


def draw(
    scene: Scene, size: tuple[int, int], centre: tuple[float, float], radius: float, angle: float
) -> Image.Image:
    image = Image.new("RGB", size, scene.background)
    draw_shape(ImageDraw.Draw(image), scene.shape, scene.rgb, centre, radius, angle)
    return image


def make_image(rng: random.Random, scene: Scene, path: Path) -> Path:
    """One still image; the shape's bounding circle is 25-70% of the shorter side, fully inside."""
    width, height = random_size(rng, 64, 512)
    radius = rng.uniform(0.25, 0.70) * min(width, height) / 2
    centre = (rng.uniform(radius, width - radius), rng.uniform(radius, height - radius))
    image = draw(scene, (width, height), centre, radius, rng.uniform(0, 2 * math.pi))
    fmt = rng.choice(IMAGE_FORMATS)
    path = path.with_suffix("." + fmt)
    image.save(path, format=fmt.upper(), **({} if fmt == "png" else {"quality": 90}))
    return path


# --- speech -------------------------------------------------------------------------------


def speak(rng: random.Random, text: str) -> tuple[np.ndarray, int]:
    """espeak-ng in a random voice and speed -> (float32 mono samples, espeak's sample rate)."""
    import soundfile as sf

    voice = f"{rng.choice(VOICES)}+{rng.choice(VARIANTS)}"
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        cmd = [require_espeak(), "-v", voice, "-s", str(rng.randint(120, 200)), "-w", str(wav)]
        subprocess.run([*cmd, text], check=True, capture_output=True)
        samples, rate = sf.read(wav, dtype="float32", always_2d=True)
    return samples[:, 0], rate


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Band-limited resampling by FFmpeg's libswresample (through PyAV)."""
    import av

    frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
    frame.sample_rate = rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target)
    frames = resampler.resample(frame) + resampler.resample(None)
    return np.concatenate([f.to_ndarray()[0] for f in frames]).astype(np.float32)


def make_audio(rng: random.Random, text: str, path: Path) -> Path:
    import soundfile as sf

    samples, rate = speak(rng, text)
    target = rng.choice(SAMPLE_RATES)
    fmt = rng.choice(sorted(AUDIO_FORMATS))
    container, subtype = AUDIO_FORMATS[fmt]
    path = path.with_suffix("." + fmt)
    sf.write(path, resample(samples, rate, target), target, format=container, subtype=subtype)
    return path


# --- video --------------------------------------------------------------------------------


def motion(
    rng: random.Random, direction: str, size: tuple[int, int], radius: float
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Start and end centres of a straight move crossing at least 30% of the frame."""
    width, height = size
    length = width if direction in ("left", "right") else height
    travel = rng.uniform(0.3 * length, length - 2 * radius)
    start = rng.uniform(radius, length - radius - travel)  # along the axis of motion
    end = start + travel
    if direction in ("left", "up"):
        start, end = length - start, length - end
    across = height if direction in ("left", "right") else width
    other = rng.uniform(radius, across - radius)
    if direction in ("left", "right"):
        return (start, other), (end, other)
    return (other, start), (other, end)


def make_video(
    rng: random.Random, scene: Scene, direction: str, path: Path, narration: str | None = None
) -> Path:
    """1-4 s at 5-30 fps, 96-256 px; with `narration`, a spoken audio track is muxed in."""
    size = random_size(rng, 96, 256, even=True)
    radius = rng.uniform(0.20, 0.45) * min(size) / 2  # room left to travel 30% of the frame
    (x0, y0), (x1, y1) = motion(rng, direction, size, radius)
    fps = rng.randint(5, 30)
    count = max(2, round(rng.uniform(1.0, 4.0) * fps))
    angle = rng.uniform(0, 2 * math.pi)

    def frame_at(t: float) -> Image.Image:
        return draw(scene, size, (x0 + t * (x1 - x0), y0 + t * (y1 - y0)), radius, angle)

    narrate = None if narration is None else (lambda: speak(rng, narration))
    return encode_video(rng, path, size, fps, count, frame_at, narrate)


def encode_video(
    rng: random.Random,
    path: Path,
    size: tuple[int, int],
    fps: int,
    count: int,
    frame_at: Callable[[float], Image.Image],
    narrate: Callable[[], tuple[np.ndarray, int]] | None = None,
) -> Path:
    """Encode `count` frames, frame_at(t) for t from 0 to 1, in a random container and codec;
    `narrate()` (mono samples, rate) becomes a 48 kHz audio track starting with the video."""
    import av

    container, codec, audio_codec = rng.choice(VIDEO_FORMATS)
    path = path.with_suffix("." + container)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        audio = None
        if narrate is not None:
            samples, rate = narrate()
            audio = resample(samples, rate, 48000)
            audio_stream = out.add_stream(audio_codec, rate=48000)
            audio_stream.layout = "mono"
        for k in range(count):
            image = frame_at(k / (count - 1))
            frame = av.VideoFrame.from_ndarray(np.asarray(image), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
        if audio is not None:
            frame = av.AudioFrame.from_ndarray(audio[None, :], format="flt", layout="mono")
            frame.sample_rate, frame.pts = 48000, 0
            out.mux(audio_stream.encode(frame))
            out.mux(audio_stream.encode(None))
    return path


# --- manifest rows ------------------------------------------------------------------------


def chat(*turns: str) -> list[dict[str, str]]:
    """Alternating user / assistant turns."""
    return [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]


def image_dialogue(rng: random.Random, scene: Scene, prefix: str) -> list[dict[str, str]]:
    """A question about one image (prefix holds its placeholder), sometimes with a follow-up."""
    caption, color, shape = (
        sentence(phrase(scene)),
        sentence(scene.color),
        sentence(f"a {scene.shape}"),
    )
    kind = rng.randrange(4)
    if kind == 0:
        return chat(f"{prefix}{rng.choice(CAPTION_QUESTIONS)}", caption)
    if kind == 1:
        return chat(f"{prefix}What color is the shape?", color)
    if kind == 2:
        return chat(f"{prefix}What shape is it?", shape)
    return chat(f"{prefix}What shape is it?", shape, "And what color is it?", color)


def relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def image_row(rng: random.Random, root: Path, stem: str) -> dict[str, Any]:
    scene = random_scene(rng)
    path = relative(make_image(rng, scene, root / "images" / stem), root)
    if rng.random() < 2 / 3:
        return {"image": path, "text": sentence(phrase(scene))}
    return {"image": path, "conversations": image_dialogue(rng, scene, "<image> ")}


def utterance(rng: random.Random) -> str:
    scene = random_scene(rng)
    kind = rng.randrange(4)
    if kind == 0:
        return phrase(scene)
    if kind == 1:
        return f"{phrase(scene)} moving {rng.choice(DIRECTIONS)}"
    if kind == 2:
        return f"the {scene.shape} is {scene.color}"
    return rng.choice((*SPOKEN_QUESTIONS, "which way does it move"))


def speech_row(rng: random.Random, root: Path, stem: str) -> dict[str, Any]:
    text = utterance(rng)
    return {"audio": relative(make_audio(rng, text, root / "audio" / stem), root), "text": text}


def video_row(rng: random.Random, root: Path, stem: str) -> dict[str, Any]:
    scene, direction = random_scene(rng), rng.choice(DIRECTIONS)
    path = relative(make_video(rng, scene, direction, root / "videos" / stem), root)
    if rng.random() < 0.5:
        return {"video": path, "text": sentence(f"{phrase(scene)} moving {direction}")}
    question = rng.choice((f"Which way does the {scene.shape} move?", "Where is the shape going?"))
    return {"video": path, "conversations": chat(f"<video> {question}", sentence(direction))}


def mixed_row(rng: random.Random, root: Path, stem: str) -> dict[str, Any]:
    """Stage-3 instructions: one of image chat, narrated video, ASR, spoken question + image."""
    base = root / "mixed" / stem
    kind = rng.randrange(4)
    if kind == 0:
        scene = random_scene(rng)
        path = relative(make_image(rng, scene, base), root)
        return {"image": path, "conversations": image_dialogue(rng, scene, "<image> ")}
    if kind == 1:
        scene, direction = random_scene(rng), rng.choice(DIRECTIONS)
        narration = f"{phrase(scene)} moving {direction}"
        path = relative(make_video(rng, scene, direction, base, narration=narration), root)
        question = f"Which way does the {scene.shape} move?"
        return {"video": path, "conversations": chat(f"<video> {question}", sentence(direction))}
    if kind == 2:
        text = utterance(rng)
        path = relative(make_audio(rng, text, base), root)
        return {"audio": path, "conversations": chat("<audio> Transcribe the audio.", text)}
    scene = random_scene(rng)
    question = rng.choice(SPOKEN_QUESTIONS)
    answer = {
        "what color is the shape": sentence(scene.color),
        "what shape is this": sentence(f"a {scene.shape}"),
        "describe the picture": sentence(phrase(scene)),
    }[question]
    image = relative(make_image(rng, scene, base.with_name(stem + "-image")), root)
    audio = relative(make_audio(rng, question, base.with_name(stem + "-question")), root)
    turns = chat("<image> <audio> Answer the spoken question about the image.", answer)
    return {"image": image, "audio": audio, "conversations": turns}


ROW_MAKERS: dict[str, Callable[[random.Random, Path, str], dict[str, Any]]] = {
    "image": image_row,
    "speech": speech_row,
    "video": video_row,
    "mixed": mixed_row,
}


def make_row(job: Job) -> dict[str, Any]:
    """One manifest row with its media; runs in a worker process."""
    manifest, split, index, seed, root = job
    rng = random.Random(f"xllm-toy/{seed}/{split}/{manifest}/{index}")
    return ROW_MAKERS[manifest](rng, Path(root), f"{split}-{index:05d}")


def generate_toy(
    out: str | Path, n: int, seed: int = 0, n_val: int | None = None, jobs: int | None = None
) -> dict[str, Path]:
    """Write the toy world to `out`: n training and n_val validation rows per manifest.

    Returns the manifest paths by name ("image_train", ...). `jobs` bounds the worker processes
    (default: the CPU count, at most 8).
    """
    require_espeak()
    if n < 1:
        raise ValueError("n must be at least 1")
    n_val = max(1, n // 4) if n_val is None else n_val
    root = Path(out).resolve()
    for folder in ("images", "audio", "videos", "mixed"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    plan = [(m, "train", i, seed, str(root)) for m in MANIFESTS for i in range(n)]
    plan += [(m, "val", i, seed, str(root)) for m in MANIFESTS for i in range(n_val)]
    return write_manifests(root, plan, run_jobs(make_row, plan, jobs))


def run_jobs(
    make: Callable[[Job], dict[str, Any]], plan: list[Job], jobs: int | None
) -> list[dict[str, Any]]:
    """make(job) for every job, in plan order, in up to `jobs` processes (default: the CPU
    count, at most 8); each row has its own RNG, so the rows do not depend on `jobs`."""
    workers = max(1, min(jobs or os.cpu_count() or 1, 8))
    if workers == 1:
        return [make(job) for job in plan]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(make, plan, chunksize=4))


def manifest_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL manifest (blank lines skipped)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def replace_manifest(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write a manifest whole through a temporary file: an interrupted write leaves it as it was."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(temporary, path)


def write_manifests(root: Path, plan: list[Job], rows: list[dict[str, Any]]) -> dict[str, Path]:
    """<manifest>_<split>.jsonl under root, rows in plan order; returns the paths by name."""
    written: dict[str, Path] = {}
    for (manifest, split, *_), row in zip(plan, rows, strict=True):
        path = root / f"{manifest}_{split}.jsonl"
        if path not in written.values():
            path.write_text("")
            written[f"{manifest}_{split}"] = path
        with path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
    return written
