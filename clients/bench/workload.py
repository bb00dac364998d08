"""What `xllm bench` sends: request kinds in the `--mix` proportions, prompts, and media.

Media come from `--media-dir` (by file extension) or are made in memory (`bench.media`), one
distinct item per request so the server's encoder cache does not flatter the figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from xllm.clients.bench.media import MediaItem, make_media

KINDS = ("image", "audio", "video", "text")
DEFAULT_MIX = "image=1,audio=1,video=1,text=1"
EXTENSIONS = {
    "image": (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"),
    "audio": (".wav", ".flac", ".mp3", ".ogg", ".m4a", ".opus"),
    "video": (".mp4", ".mov", ".mkv", ".webm", ".avi"),
}
MIME = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".wav": "audio/wav",
    ".flac": "audio/flac",
    ".mp4": "video/mp4",
}
PROMPTS = {
    "image": ("What is in the image?", "Describe the picture.", "What color is the shape?"),
    "audio": ("Transcribe the audio.", "What do you hear?", "请忠实地识别该语音。"),
    "video": ("Which way does the shape move?", "Describe the video.", "What happens here?"),
    "text": (
        "Large language models can read images, speech and video as if they were foreign "
        "languages. Explain how in a few sentences.",
        "Write a short story about a red circle that meets a green square.",
        "What is the quick brown fox known for? Answer at length.",
    ),
}


@dataclass
class BenchRequest:
    index: int
    kind: str  # image | audio | video | text
    prompt: str
    media: list[MediaItem] = field(default_factory=list)


def parse_mix(spec: str) -> dict[str, float]:
    """'image=2,text=1' -> normalised weights; ValueError naming the bad part."""
    weights: dict[str, float] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        kind, sep, value = part.partition("=")
        kind = kind.strip()
        if kind not in KINDS:
            raise ValueError(f"--mix: unknown kind '{kind}' (use {', '.join(KINDS)})")
        try:
            weight = float(value) if sep else 1.0
        except ValueError:
            raise ValueError(f"--mix: '{part}' is not kind=weight") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"--mix: the weight of '{kind}' must be a number >= 0")
        weights[kind] = weights.get(kind, 0.0) + weight
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("--mix: give at least one kind with a positive weight")
    return {k: w / total for k, w in weights.items() if w > 0}


def kind_counts(mix: dict[str, float], n: int) -> dict[str, int]:
    """Exactly n requests split by the mix (largest remainder), so runs are comparable."""
    exact = {k: w * n for k, w in mix.items()}
    counts = {k: int(v) for k, v in exact.items()}
    rest = n - sum(counts.values())
    for k in sorted(exact, key=lambda k: (counts[k] - exact[k], k))[:rest]:
        counts[k] += 1
    return counts


def media_files(media_dir: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {kind: [] for kind in EXTENSIONS}
    for path in sorted(media_dir.iterdir()):
        for kind, suffixes in EXTENSIONS.items():
            if path.is_file() and path.suffix.lower() in suffixes:
                found[kind].append(path)
    return found


def build_requests(
    n: int, mix: dict[str, float], seed: int, media_dir: Path | None = None, offset: int = 0
) -> list[BenchRequest]:
    """n requests, kinds in the mix's proportions in a seeded order, each with its own media."""
    import random

    rng = random.Random(seed)
    kinds = [k for k, c in kind_counts(mix, n).items() for _ in range(c)]
    rng.shuffle(kinds)
    files = media_files(media_dir) if media_dir is not None else {}
    used = {kind: 0 for kind in EXTENSIONS}
    requests = []
    for i, kind in enumerate(kinds):
        prompt = PROMPTS[kind][rng.randrange(len(PROMPTS[kind]))]
        request = BenchRequest(offset + i, kind, prompt)
        if kind != "text":
            pool = files.get(kind) or []
            if pool:
                path = pool[used[kind] % len(pool)]
                request.media.append(MediaItem(kind, path.name, path.read_bytes()))
            else:
                request.media.append(make_media(kind, seed * 1_000_003 + offset + i))
            used[kind] += 1
        requests.append(request)
    return requests
