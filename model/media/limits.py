"""What media may cost, and how a refusal is reported: `MediaLimits` and `MediaError`.

Every public ``decode_*`` function lets only ``MediaError`` escape, whose ``status`` is the HTTP
status the server answers with: 400 (empty, corrupt, undecodable), 413 (over a configured limit)
or 415 (recognised but unsupported type).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import av.error


class MediaError(Exception):
    """A user-caused media problem.

    ``status`` is the HTTP status the server maps it to: 400 (undecodable,
    corrupt or empty), 413 (over a size/pixel/duration/resolution limit) or
    415 (unsupported type).
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def __reduce__(self) -> tuple[type[MediaError], tuple[str, int]]:
        # Keep `status` when the error crosses a process boundary (pickling only
        # replays `args`, which would silently reset it to 400).
        return (type(self), (self.message, self.status))


@dataclass(frozen=True)
class MediaLimits:
    """Per-item resource limits; exceeding one yields ``MediaError(413)``."""

    max_image_pixels: int = 40_000_000
    max_audio_seconds: float = 600.0
    max_video_seconds: float = 600.0
    max_video_side: int = 4096  # width or height
    max_bytes: int = 50 * 1024 * 1024  # per item

    def __post_init__(self) -> None:
        for name in (
            "max_image_pixels",
            "max_audio_seconds",
            "max_video_seconds",
            "max_video_side",
            "max_bytes",
        ):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"MediaLimits.{name} must be a positive number, got {value!r}")


DEFAULT_LIMITS = MediaLimits()

# Decoded audio/video may legitimately run a little past the duration stated in
# the header (encoder padding, rounding of the last frame), so the streaming
# guards allow this much slack beyond the configured limit; header checks are
# exact.
DURATION_SLACK_S = 0.5


def describe(exc: BaseException) -> str:
    """A short human description of a library exception."""
    # str() of FFmpeg errors includes errno and the (meaningless) file name.
    text = (exc.strerror or str(exc)) if isinstance(exc, av.error.FFmpegError) else str(exc)
    return text.strip() or type(exc).__name__


@contextmanager
def only_media_errors(what: str) -> Iterator[None]:
    """Turn any exception into MediaError: the public contract of decode_*."""
    try:
        yield
    except MediaError:
        raise
    except MemoryError:
        raise MediaError(f"{what} is too large to decode", 413) from None
    except Exception as exc:
        # Libraries raise many types; none may escape.
        raise MediaError(f"could not decode {what}: {describe(exc)}", 400) from exc


def check_input(data: object, limits: MediaLimits, what: str) -> bytes:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MediaError(f"{what} data must be bytes, not {type(data).__name__}", 400)
    data = bytes(data)
    if not data:
        raise MediaError(f"empty {what} data", 400)
    if len(data) > limits.max_bytes:
        raise MediaError(
            f"{what} is {len(data)} bytes, over the limit of {limits.max_bytes} bytes", 413
        )
    return data


def check_duration(seconds: float, limit: float, what: str) -> None:
    if seconds > limit:
        raise MediaError(f"{what} is {seconds:.1f} s long, over the limit of {limit:g} s", 413)
