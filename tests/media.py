"""Small media made in memory for tests (nothing on disk, nothing downloaded)."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

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
    for codec in ("libx264", "h264", "mpeg4"):
        if codec in av.codecs_available:
            try:
                av.Codec(codec, "w")
            except Exception:
                continue
            return codec
    pytest.skip("this PyAV build has no H.264 / MPEG-4 encoder")


def make_mp4(frames: int = 10, fps: int = 10, size: int = 64, audio: bool = False) -> bytes:
    """An MP4 of a yellow square moving over a red gradient; with `audio`, an AAC tone track."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream(video_codec(), rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        audio_stream = container.add_stream("aac", rate=44100, layout="mono") if audio else None
        for i in range(frames):
            image = np.zeros((size, size, 3), np.uint8)
            image[..., 0] = np.linspace(0, 255, size, dtype=np.uint8)[None, :]
            x = (i * 5) % (size - 16)
            image[20:36, x : x + 16] = (255, 255, 0)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
        if audio_stream is not None:
            _mux_tone(container, audio_stream, frames / fps)
    return buffer.getvalue()


def _mux_tone(container: av.container.OutputContainer, stream, seconds: float) -> None:
    rate = stream.rate
    t = np.arange(round(seconds * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
    frame_size = stream.codec_context.frame_size or 1024
    fmt = stream.codec_context.codec.audio_formats[0].name
    resampler = av.AudioResampler(format=fmt, layout="mono", rate=rate)
    for i in range(0, tone.shape[1], frame_size):
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(tone[:, i : i + frame_size]), format="fltp", layout="mono"
        )
        frame.sample_rate = rate
        frame.pts = i
        frame.time_base = Fraction(1, rate)
        for out in resampler.resample(frame):
            container.mux(stream.encode(out))
    for out in resampler.resample(None):
        container.mux(stream.encode(out))
    container.mux(stream.encode(None))
