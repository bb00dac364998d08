"""Small media made in memory for tests (nothing on disk, nothing downloaded)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from xllm.model.media.writer import encode_video, video_encoder

SAMPLE_RATE = 16_000


def make_png(
    size: tuple[int, int] = (48, 40), color: tuple[int, int, int] = (220, 40, 40)
) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def make_wav(seconds: float = 1.0, freq: float = 440.0, rate: int = SAMPLE_RATE) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, format="WAV")
    return buffer.getvalue()


def video_codec() -> str:
    """An H.264 (or MPEG-4) encoder this PyAV build has; skips the test when there is none."""
    codec = video_encoder()
    if codec is None:
        pytest.skip("this PyAV build has no H.264 / MPEG-4 encoder")
    return codec


def make_mp4(frames: int = 10, fps: int = 10, size: int = 64, audio: bool = False) -> bytes:
    """An MP4 of a yellow square moving over a red gradient; with `audio`, an AAC tone track."""
    images = np.zeros((frames, size, size, 3), np.uint8)  # (T, H, W, 3)
    images[..., 0] = np.linspace(0, 255, size, dtype=np.uint8)[None, :]
    for i in range(frames):
        x = (i * 5) % (size - 16)
        images[i, 20:36, x : x + 16] = (255, 255, 0)
    tone = None
    if audio:
        t = np.arange(round(frames / fps * 44100)) / 44100
        tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return encode_video(images, fps, codec=video_codec(), audio=tone, audio_rate=44100)
