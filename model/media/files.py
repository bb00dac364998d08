"""Local files: read one within the byte limit and decode it as its kind (or sniffed)."""

from __future__ import annotations

import os
import stat

import numpy as np
from PIL import Image

from xllm.model.media.audio import decode_audio
from xllm.model.media.image import decode_image
from xllm.model.media.limits import DEFAULT_LIMITS, MediaError, MediaLimits
from xllm.model.media.sniff import sniff_kind
from xllm.model.media.video import DecodedVideo, decode_video


def load_media_file(
    path: str | os.PathLike[str],
    kind: str,
    limits: MediaLimits = DEFAULT_LIMITS,
    **video_kwargs: object,
) -> Image.Image | np.ndarray | DecodedVideo:
    """Read a local file and decode it as `kind` ("image", "audio", "video" or "auto").

    `video_kwargs` (fps, max_frames) are passed to decode_video and ignored for
    other kinds.  Errors are MediaError with the path in the message.
    """
    if kind not in ("image", "audio", "video", "auto"):
        raise MediaError(f"unknown media kind {kind!r}; expected image, audio, video or auto", 400)
    name = os.fspath(path)
    try:
        with open(name, "rb") as fh:
            info = os.fstat(fh.fileno())
            if stat.S_ISREG(info.st_mode) and info.st_size > limits.max_bytes:
                raise MediaError(
                    f"{name}: file is {info.st_size} bytes, over the limit of "
                    f"{limits.max_bytes} bytes",
                    413,
                )
            # Bounded read: pipes and special files have no trustworthy size.
            data = fh.read(limits.max_bytes + 1)
    except OSError as exc:
        raise MediaError(f"cannot read media file {name}: {exc.strerror or exc}", 400) from None
    if len(data) > limits.max_bytes:
        raise MediaError(f"{name}: file is over the limit of {limits.max_bytes} bytes", 413)

    if kind == "auto":
        sniffed = sniff_kind(data)
        if sniffed is None:
            raise MediaError(f"{name}: unrecognised media type", 415)
        kind = sniffed
    try:
        if kind == "image":
            return decode_image(data, limits)
        if kind == "audio":
            return decode_audio(data, limits)
        return decode_video(data, limits, **video_kwargs)  # type: ignore[arg-type]
    except MediaError as exc:
        raise MediaError(f"{name}: {exc.message}", exc.status) from exc
