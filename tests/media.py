"""Small media made in memory for tests (nothing on disk, nothing downloaded)."""

from __future__ import annotations

import io
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from xllm.model.media import decode_audio
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


def speak(text: str) -> np.ndarray:
    """`text` spoken by espeak-ng: 16 kHz mono float32 (skips the test without espeak-ng)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    wav = subprocess.run(["espeak-ng", "--stdout", text], capture_output=True, check=True).stdout
    return decode_audio(wav)


def speech_with_pauses(
    texts: list[str], pause_s: float, lead_s: float = 0.5
) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """The texts spoken one after another with `pause_s` of silence between them (`lead_s`
    before the first), and each utterance's sound as (start, end) seconds."""
    pieces = [np.zeros(round(lead_s * SAMPLE_RATE), np.float32)]
    sounds = []
    at = pieces[0].size
    for text in texts:
        voice = speak(text)
        loud = np.flatnonzero(np.abs(voice) > 1e-3)
        sounds.append(((at + loud[0]) / SAMPLE_RATE, (at + loud[-1] + 1) / SAMPLE_RATE))
        pieces += [voice, np.zeros(round(pause_s * SAMPLE_RATE), np.float32)]
        at += voice.size + pieces[-1].size
    return np.concatenate(pieces), sounds


def to_wav(samples: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()
