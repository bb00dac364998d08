"""Writing media: RGB frames (and a mono audio track) -> video bytes, for synthetic data and tests.

The one video writer of the project: the toy-world data, `xllm bench`'s requests and the tests'
clips all go through `encode_video`, so a PyAV quirk is handled in one place.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from fractions import Fraction

import av
import numpy as np

# Tried in order by `video_encoder`: H.264 where this FFmpeg build has an encoder for it.
VIDEO_ENCODERS = ("libx264", "h264", "mpeg4")


def video_encoder() -> str | None:
    """The first of `VIDEO_ENCODERS` this PyAV build can encode with, or None."""
    for name in VIDEO_ENCODERS:
        if name in av.codecs_available:
            try:
                av.Codec(name, "w")
            except Exception:
                # Listed as a decoder only.
                continue
            return name
    return None


def encode_video(
    frames: np.ndarray | Sequence[np.ndarray],
    fps: int,
    *,
    codec: str | None = None,
    container: str = "mp4",
    audio: np.ndarray | None = None,
    audio_rate: int = 44_100,
    audio_codec: str = "aac",
    rotation: int | None = None,
    options: dict[str, str] | None = None,
) -> bytes:
    """Frames (T, H, W, 3) uint8 RGB at `fps` -> the bytes of a `container` file (yuv420p).

    `codec` defaults to `video_encoder()`. `audio` (S,) float32 mono at `audio_rate` becomes an
    `audio_codec` track starting with the video. `rotation` (degrees, counter-clockwise) is
    stored as a display matrix, as phones do, not applied to the pixels (PyAV >= 18).
    `options` are the container's muxer options.
    """
    codec = codec or video_encoder()
    if codec is None:
        raise RuntimeError(f"this PyAV build has none of the video encoders {VIDEO_ENCODERS}")
    height, width = frames[0].shape[:2]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container, options=options or {}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        if rotation is not None:
            stream.set_display_rotation(rotation)
        audio_stream = None
        if audio is not None:
            audio_stream = out.add_stream(audio_codec, rate=audio_rate, layout="mono")
        for i, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
        if audio_stream is not None:
            mux_audio(out, audio_stream, np.asarray(audio, np.float32)[None, :], audio_rate)
    return buffer.getvalue()


def mux_audio(
    out: av.container.OutputContainer, stream: av.AudioStream, planar: np.ndarray, rate: int
) -> None:
    """Float32 samples (C, S) at `rate`, C = 1 or 2, into `stream` of `out`, in the codec's frame
    size and sample format; flushes the stream."""
    layout = "mono" if planar.shape[0] == 1 else "stereo"
    frame_size = stream.codec_context.frame_size or 1024
    resampler = av.AudioResampler(
        format=stream.codec_context.codec.audio_formats[0].name, layout=layout, rate=stream.rate
    )
    for i in range(0, planar.shape[1], frame_size):
        chunk = np.ascontiguousarray(planar[:, i : i + frame_size])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
        frame.sample_rate = rate
        frame.pts = i
        frame.time_base = Fraction(1, rate)
        for encoded in resampler.resample(frame):
            out.mux(stream.encode(encoded))
    for encoded in resampler.resample(None):
        if encoded is not None:
            out.mux(stream.encode(encoded))
    out.mux(stream.encode(None))
