"""Video: container bytes -> a ``DecodedVideo`` (sampled RGB frames, timestamps, audio track).

Frames are decoded one by one, keeping only the sampled ones, and the real timestamps are checked
against the limits while decoding, because headers can lie.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from dataclasses import dataclass

import av
import numpy as np
from PIL import Image

from xllm.model.media.audio import AudioSink
from xllm.model.media.container import (
    VIDEO_DEMUXERS,
    PacketDecoder,
    check_demuxer,
    container_seconds,
    open_container,
    stream_seconds,
    stream_start,
)
from xllm.model.media.limits import (
    DEFAULT_LIMITS,
    DURATION_SLACK_S,
    MediaError,
    MediaLimits,
    check_duration,
    check_input,
    describe,
    only_media_errors,
)
from xllm.model.media.sniff import has_image_signature

logger = logging.getLogger(__name__)


@dataclass
class DecodedVideo:
    """Frames sampled from a video, plus its audio track."""

    frames: list[Image.Image]  # RGB, sampled frames in time order
    timestamps: list[float]  # seconds from the start of the video, one per frame
    # float32 mono SAMPLE_RATE audio of the whole clip; None when there is no
    # audio track or it has no (decodable) samples.
    audio: np.ndarray | None


# Frames are decoded sequentially up to the last sampled time, so a clip whose
# timestamps are packed densely (thousands of tiny frames per second) could cost
# far more decoding than its duration suggests.  Cap the decoded frame count at
# this average rate over the duration limit.
_MAX_VIDEO_FPS = 240

# Upper bound on decoder threads per video, so a thread pool of concurrent
# decodes does not oversubscribe the CPU by a factor of cpu_count.
_VIDEO_DECODER_THREADS = min(4, os.cpu_count() or 1)


# AV_DISPOSITION_ATTACHED_PIC: a still image (cover art) exposed as a video stream.
_ATTACHED_PIC = 0x0400


def _check_resolution(width: int, height: int, limits: MediaLimits) -> None:
    if max(width, height) > limits.max_video_side:
        raise MediaError(
            f"video is {width}x{height}, over the limit of {limits.max_video_side} pixels per side",
            413,
        )


def _plan_targets(duration: float, fps: float, max_frames: int) -> list[float]:
    """Times (s) to sample: every 1/fps, or max_frames spread evenly if that is more."""
    if duration <= 0:
        return [0.0]
    # The epsilon keeps a 3.0 s clip at 1 fps to 3 targets despite float noise.
    count = max(1, math.ceil(duration * fps - 1e-6))
    if count <= max_frames:
        return [i / fps for i in range(count)]
    step = duration / max_frames
    return [i * step for i in range(max_frames)]


_ROTATIONS = {
    1: Image.Transpose.ROTATE_90,
    2: Image.Transpose.ROTATE_180,
    3: Image.Transpose.ROTATE_270,
}


def _frame_to_image(frame: av.VideoFrame) -> Image.Image:
    image = frame.to_image()  # RGB
    try:
        # Phone videos store portrait orientation as a display matrix rather
        # than rotated pixels; `rotation` is counter-clockwise degrees, as is
        # PIL's ROTATE_90.
        quarter_turns = round(frame.rotation / 90) % 4
    except Exception:
        # Side data unreadable: show the pixels as stored.
        quarter_turns = 0
    if quarter_turns:
        image = image.transpose(_ROTATIONS[quarter_turns])
    return image


class _FramePicker:
    """Picks, while decoding, the frame nearest each target time.

    Frames arrive in presentation order; only the previous frame and the
    already-picked (converted) ones are kept, so memory does not grow with the
    clip length.
    """

    def __init__(self, targets: list[float], start: float, limits: MediaLimits) -> None:
        self._targets = targets
        self._next = 0
        self._start = start
        self._limits = limits
        self._prev: tuple[float, av.VideoFrame] | None = None
        self._prev_end = 0.0
        self._last_picked: av.VideoFrame | None = None
        self._decoded = 0
        self._max_decoded = max(1000, math.ceil(limits.max_video_seconds * _MAX_VIDEO_FPS))
        self.frames: list[Image.Image] = []
        self.timestamps: list[float] = []

    @property
    def done(self) -> bool:
        return self._next >= len(self._targets)

    def _pick(self, t: float, frame: av.VideoFrame) -> None:
        if frame is self._last_picked:  # two targets nearest the same frame: keep it once
            return
        self._last_picked = frame
        self.frames.append(_frame_to_image(frame))
        self.timestamps.append(round(max(t, 0.0), 6))

    def offer(self, frame: av.VideoFrame, default_step: float) -> None:
        _check_resolution(frame.width, frame.height, self._limits)
        self._decoded += 1
        if self._decoded > self._max_decoded:
            raise MediaError(
                f"video has more than {self._max_decoded} frames, over the limit of "
                f"{_MAX_VIDEO_FPS} frames per second for {self._limits.max_video_seconds:g} s",
                413,
            )
        prev_t = self._prev[0] if self._prev else None
        if frame.time is not None:
            t = frame.time - self._start
        else:
            t = (prev_t + default_step) if prev_t is not None else 0.0
        if prev_t is not None:
            t = max(t, prev_t)  # broken timestamps must not reorder the output
        if t > self._limits.max_video_seconds + DURATION_SLACK_S:
            raise MediaError(
                f"video is longer than the limit of {self._limits.max_video_seconds:g} s", 413
            )
        while not self.done and self._targets[self._next] <= t:
            target = self._targets[self._next]
            if self._prev is not None and target - self._prev[0] <= t - target:
                self._pick(*self._prev)
            else:
                self._pick(t, frame)
            self._next += 1
        step = default_step
        frame_duration = getattr(frame, "duration", None)  # PyAV >= 13
        if frame_duration and frame.time_base:
            step = float(frame_duration * frame.time_base)
        self._prev = (t, frame)
        self._prev_end = t + step

    def finish(self, last_error: str | None = None) -> None:
        if self._prev is None:
            detail = f": {last_error}" if last_error else ""
            raise MediaError(f"video has no decodable frames{detail}", 400)
        # Targets after the last frame: that frame is still on screen until
        # prev_end; targets beyond it lie past the content (metadata durations
        # are often rounded up, or cover a longer audio track).
        while not self.done:
            if self._targets[self._next] + 1e-3 < self._prev_end:
                self._pick(*self._prev)
            self._next += 1
        if not self.frames:
            self._pick(*self._prev)
        self._prev = None


def decode_video(
    data: bytes,
    limits: MediaLimits = DEFAULT_LIMITS,
    *,
    fps: float = 1.0,
    max_frames: int = 8,
) -> DecodedVideo:
    """Decode a video, sampling frames at `fps` (at most `max_frames`) plus its audio.

    Frames are taken at 0, 1/fps, 2/fps, ... (the decoded frame nearest each
    time); when that would exceed `max_frames`, `max_frames` times are spread
    evenly over the clip instead.
    """
    # fps / max_frames may come straight from a request, so bad values are a
    # client error (400), not a programming error.
    valid_fps = isinstance(fps, numbers.Real) and not isinstance(fps, bool)
    if not (valid_fps and math.isfinite(fps) and fps > 0):
        raise MediaError(f"fps must be a positive number, got {fps!r}", 400)
    valid_count = isinstance(max_frames, numbers.Integral) and not isinstance(max_frames, bool)
    if not (valid_count and max_frames >= 1):
        raise MediaError(f"max_frames must be a positive integer, got {max_frames!r}", 400)
    data = check_input(data, limits, "video")
    with only_media_errors("video"):
        return _decode_video(data, limits, float(fps), int(max_frames))


def _decode_video(data: bytes, limits: MediaLimits, fps: float, max_frames: int) -> DecodedVideo:
    # Animated GIF is the one image format FFmpeg may read as a video.
    if has_image_signature(data) and not data.startswith((b"GIF87a", b"GIF89a")):
        raise MediaError("expected a video but got image data", 415)

    with open_container(data, "video") as container:
        duration = _inspect_video(container, limits)
        if duration is not None:
            return _sample_video(container, limits, _plan_targets(duration, fps, max_frames))
        # No duration in the metadata: measure it from packet timestamps
        # (demuxing only, no decoding) so frames can be spread over the clip.
        duration = _scan_video_duration(container, limits)
    # The scan consumed the container; a fresh one is cheaper and more reliable
    # than seeking back in an arbitrary format.
    with open_container(data, "video") as container:
        return _sample_video(container, limits, _plan_targets(duration, fps, max_frames))


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    """The first real video stream (cover art in audio files is not a video)."""
    for stream in container.streams.video:
        disposition = getattr(stream, "disposition", 0)
        flags = getattr(disposition, "value", disposition)  # PyAV < 18: an enum.Flag, not an int
        if not int(flags) & _ATTACHED_PIC:
            return stream
    raise MediaError("no video stream found", 400)


def _inspect_video(container: av.container.InputContainer, limits: MediaLimits) -> float | None:
    """Validate streams and metadata limits; return the video duration if known."""
    stream = _video_stream(container)
    check_demuxer(container, VIDEO_DEMUXERS, "video")
    ctx = stream.codec_context
    if ctx is None:
        raise MediaError("unsupported video codec (no decoder available)", 415)
    _check_resolution(ctx.width, ctx.height, limits)
    clip = container_seconds(container)
    video = stream_seconds(stream)
    for seconds in (clip, video):
        if seconds is not None:
            check_duration(seconds, limits.max_video_seconds, "video")
    return video if video is not None else clip


def _scan_video_duration(container: av.container.InputContainer, limits: MediaLimits) -> float:
    stream = _video_stream(container)
    start = stream_start(stream)
    end = 0.0
    for packet in container.demux(stream):
        if packet.pts is None or packet.time_base is None:
            continue
        t = float((packet.pts + (packet.duration or 0)) * packet.time_base) - start
        end = max(end, t)
        if end > limits.max_video_seconds:
            raise MediaError(
                f"video is longer than the limit of {limits.max_video_seconds:g} s", 413
            )
    return end


def _sample_video(
    container: av.container.InputContainer, limits: MediaLimits, targets: list[float]
) -> DecodedVideo:
    vstream = _video_stream(container)
    astream = container.streams.audio[0] if container.streams.audio else None
    if astream is not None and astream.codec_context is None:
        logger.warning("ignoring audio track: no decoder for its codec")
        astream = None
    vstream.codec_context.thread_type = "AUTO"
    vstream.codec_context.thread_count = _VIDEO_DECODER_THREADS
    rate = vstream.average_rate or vstream.base_rate
    default_step = float(1 / rate) if rate else 1 / 25

    start = stream_start(vstream)
    picker = _FramePicker(targets, start, limits)
    vdecoder = PacketDecoder("video")
    sink = AudioSink(limits.max_video_seconds, "video") if astream is not None else None
    adecoder = PacketDecoder("video audio track")
    starts = {s.index: stream_start(s) for s in (vstream, astream) if s is not None}
    streams = [s for s in (vstream, astream) if s is not None]

    for packet in container.demux(*streams):
        # Metadata can understate the length: check the real timestamps too.
        if packet.pts is not None and packet.time_base is not None:
            t = float(packet.pts * packet.time_base) - starts.get(packet.stream.index, 0.0)
            if t > limits.max_video_seconds + DURATION_SLACK_S:
                raise MediaError(
                    f"video is longer than the limit of {limits.max_video_seconds:g} s", 413
                )
        if packet.stream.index == vstream.index:
            if picker.done:
                if sink is None:
                    break  # nothing left to do: skip decoding the rest
                continue
            for frame in vdecoder.decode(packet):
                picker.offer(frame, default_step)
                if picker.done:
                    break
        elif sink is not None:
            try:
                for frame in adecoder.decode(packet):
                    sink.add_frame(frame)
            except MediaError as exc:
                if exc.status == 413:
                    raise
                # A broken audio track should not cost the user the video.
                logger.warning("dropping undecodable audio track: %s", exc.message)
                sink = None
            except Exception as exc:
                # E.g. no decoder for the audio codec.
                logger.warning("dropping undecodable audio track: %s", describe(exc))
                sink = None

    picker.finish(vdecoder.last_error)
    audio = sink.finish() if sink is not None else None
    if audio is not None and audio.size == 0:
        audio = None
    return DecodedVideo(frames=picker.frames, timestamps=picker.timestamps, audio=audio)
