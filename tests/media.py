"""Small media files made in memory for tests (no fixtures on disk)."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import soundfile as sf
from PIL import Image


def make_png(
    size: tuple[int, int] = (48, 40), color: tuple[int, int, int] = (220, 40, 40)
) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def make_wav(seconds: float = 1.0, freq: float = 440.0, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, format="WAV")
    return buffer.getvalue()


def make_mp4(frames: int = 10, fps: int = 10, size: int = 64, audio: bool = False) -> bytes:
    """H.264 MP4 whose frames go from black to white; optionally with an AAC sine track."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        video = container.add_stream(
            "libx264" if "libx264" in av.codecs_available else "h264", rate=fps
        )
        video.width = video.height = size
        video.pix_fmt = "yuv420p"
        audio_stream = container.add_stream("aac", rate=16000) if audio else None
        for i in range(frames):
            level = int(255 * i / max(1, frames - 1))
            image = np.full((size, size, 3), level, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if audio_stream is not None:
            samples = int(16000 * frames / fps)
            t = np.arange(samples) / 16000
            wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
            pts = 0
            for start in range(0, samples, 1024):
                chunk = av.AudioFrame.from_ndarray(
                    wave[:, start : start + 1024], format="fltp", layout="mono"
                )
                chunk.sample_rate = 16000
                chunk.pts = pts
                chunk.time_base = Fraction(1, 16000)
                pts += chunk.samples
                for packet in audio_stream.encode(chunk):
                    container.mux(packet)
            for packet in audio_stream.encode():
                container.mux(packet)
    return buffer.getvalue()
