"""Media made in memory for `xllm bench`: PNG (Pillow), WAV (soundfile), MP4 (PyAV), seeded."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MediaItem:
    kind: str  # image | audio | video
    filename: str
    data: bytes


def make_media(kind: str, seed: int) -> MediaItem:
    if kind == "image":
        return MediaItem("image", f"bench-{seed}.png", make_png(seed))
    if kind == "audio":
        return MediaItem("audio", f"bench-{seed}.wav", make_wav(seed))
    return MediaItem("video", f"bench-{seed}.mp4", make_mp4(seed))


def make_png(seed: int, size: int = 224) -> bytes:
    """A coloured shape on a coloured background (distinct per seed, a few kB)."""
    import io
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    x, y = rng.randrange(size // 2), rng.randrange(size // 2)
    box = (x, y, x + size // 3 + rng.randrange(size // 4), y + size // 3 + rng.randrange(size // 4))
    fill = tuple(rng.randrange(256) for _ in range(3))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def make_wav(seed: int, seconds: float = 2.0, rate: int = 16_000) -> bytes:
    """A chirp with noise, 16 kHz mono PCM-16."""
    import io

    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    freq = 200 + 300 * rng.random() + 200 * t / seconds
    wave = 0.3 * np.sin(2 * np.pi * freq * t) + 0.02 * rng.standard_normal(t.shape)
    buffer = io.BytesIO()
    sf.write(buffer, wave.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def make_mp4(seed: int, seconds: int = 2, fps: int = 4, size: int = 64) -> bytes:
    """A square moving over a gradient (H.264, or MPEG-4 where there is no H.264 encoder)."""
    import random

    import numpy as np

    from xllm.model.media.writer import encode_video

    rng = random.Random(seed)
    color = [rng.randrange(256) for _ in range(3)]
    frames = np.zeros((seconds * fps, size, size, 3), np.uint8)  # (T, H, W, 3)
    for i, pixels in enumerate(frames):
        pixels[..., rng.randrange(3)] = np.linspace(0, 255, size, dtype=np.uint8)[None, :]
        x = (i * 6) % (size - 16)
        pixels[24:40, x : x + 16] = color
    return encode_video(frames, fps)
