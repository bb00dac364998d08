"""Images: PNG / JPEG / WebP / GIF / BMP bytes -> an upright RGB ``PIL.Image.Image``."""

from __future__ import annotations

import functools
import io
import logging
import re
import threading

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from xllm.model.media.limits import (
    DEFAULT_LIMITS,
    MediaError,
    MediaLimits,
    check_input,
    describe,
    only_media_errors,
)
from xllm.model.media.sniff import markup_type, sniff_kind

logger = logging.getLogger(__name__)


# Pillow format names accepted.  MPO is what Pillow calls the multi-picture
# JPEGs many phone cameras write; it opens through the JPEG plugin.
_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_ACCEPTED_IMAGE_FORMATS = frozenset((*_IMAGE_FORMATS, "MPO"))
_SUPPORTED_IMAGES_TEXT = "PNG, JPEG, WebP, GIF, BMP"
_ALPHA_MODES = frozenset(("RGBA", "LA", "La", "RGBa", "PA"))
_WIDE_GRAY_MODES = frozenset(("I", "I;16", "I;16L", "I;16B", "I;16N", "F"))

_pillow_limit_lock = threading.Lock()


@functools.cache
def _available_image_formats() -> tuple[str, ...]:
    # Image.open(formats=...) fails with KeyError on a name whose plugin this
    # Pillow build lacks (e.g. WebP without libwebp), so ask the registry.
    Image.init()
    return tuple(fmt for fmt in _IMAGE_FORMATS if fmt in Image.OPEN)


def _ensure_pillow_allows(pixels: int) -> None:
    """Make sure Pillow's own bomb check never rejects what our limit allows.

    Our guard (exact, configurable, checked before decoding) is the authority.
    Pillow's process-wide threshold is only ever raised, so concurrent callers
    with different limits cannot weaken each other's checks.
    """
    with _pillow_limit_lock:
        current = Image.MAX_IMAGE_PIXELS
        if current is not None and current < pixels:
            Image.MAX_IMAGE_PIXELS = pixels


def _bomb_error(exc: Exception, limits: MediaLimits) -> MediaError:
    match = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{match.group(1)} pixels" if match else "too many pixels"
    return MediaError(f"image has {size}, over the limit of {limits.max_image_pixels} pixels", 413)


def _unidentified_image(data: bytes) -> MediaError:
    """Explain why Pillow could not open the bytes as one of the accepted formats."""
    fmt: str | None = None
    try:
        # Header parse only (Image.open is lazy): enough to name the format.
        with Image.open(io.BytesIO(data)) as probe:
            fmt = probe.format
    except Exception:
        # Unidentifiable by any plugin: handled below.
        fmt = None
    if fmt and fmt not in _ACCEPTED_IMAGE_FORMATS:
        return MediaError(f"unsupported image type {fmt}; supported: {_SUPPORTED_IMAGES_TEXT}", 415)
    kind = sniff_kind(data)
    if kind in ("audio", "video"):
        return MediaError(f"expected an image but got {kind} data", 415)
    if kind == "image":
        # Right signature but Pillow cannot read even the header: damaged file.
        return MediaError("corrupt or truncated image", 400)
    return MediaError(f"not a recognised image (supported: {_SUPPORTED_IMAGES_TEXT})", 400)


def _wide_gray_to_l(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float grayscale to 8-bit, scaling instead of clipping."""
    arr = np.asarray(im)
    if im.mode == "F":
        arr8 = np.clip(arr, 0, 255)
    else:
        # Integer modes come from 16-bit sources (PNG, TIFF): map 0..65535 to 0..255.
        arr8 = np.clip(arr.astype(np.float64) / 257.0, 0, 255)
    return Image.fromarray(np.rint(arr8).astype(np.uint8), mode="L")


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB copy of `im`, with any transparency composited onto white."""
    if im.mode in _WIDE_GRAY_MODES:
        im = _wide_gray_to_l(im)
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _exif_upright(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception as exc:
        # A damaged EXIF block must not lose the image.
        logger.debug("ignoring unreadable EXIF orientation: %s", describe(exc))
        return im


def decode_image(data: bytes, limits: MediaLimits = DEFAULT_LIMITS) -> Image.Image:
    """Decode PNG / JPEG / WebP / GIF (first frame) / BMP bytes to an upright RGB image."""
    data = check_input(data, limits, "image")
    with only_media_errors("image"):
        return _decode_image(data, limits)


def _decode_image(data: bytes, limits: MediaLimits) -> Image.Image:
    markup = markup_type(data)
    if markup is not None:
        raise MediaError(
            f"unsupported image type {markup}; supported: {_SUPPORTED_IMAGES_TEXT}", 415
        )
    if data.startswith(b"%PDF-"):
        raise MediaError(f"unsupported image type PDF; supported: {_SUPPORTED_IMAGES_TEXT}", 415)

    _ensure_pillow_allows(limits.max_image_pixels)
    bomb = (Image.DecompressionBombError, Image.DecompressionBombWarning)
    try:
        # Restricting the plugins keeps exotic parsers away from untrusted bytes.
        im = Image.open(io.BytesIO(data), formats=_available_image_formats())
    except UnidentifiedImageError:
        raise _unidentified_image(data) from None
    except bomb as exc:
        raise _bomb_error(exc, limits) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise MediaError(f"corrupt image: {describe(exc)}", 400) from None

    with im:
        fmt = im.format or "unknown"
        if fmt not in _ACCEPTED_IMAGE_FORMATS:
            raise MediaError(
                f"unsupported image type {fmt}; supported: {_SUPPORTED_IMAGES_TEXT}", 415
            )
        width, height = im.size
        if width <= 0 or height <= 0:
            raise MediaError(f"image has invalid size {width}x{height}", 400)
        # Image.open only parsed the header: refuse before allocating pixels.
        if width * height > limits.max_image_pixels:
            raise MediaError(
                f"image is {width}x{height} = {width * height} pixels, "
                f"over the limit of {limits.max_image_pixels} pixels",
                413,
            )
        try:
            im.load()  # first frame for GIF / animated WebP / APNG / MPO
        except bomb as exc:
            raise _bomb_error(exc, limits) from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
            raise MediaError(f"corrupt or truncated {fmt} image: {describe(exc)}", 400) from None
        return _to_rgb(_exif_upright(im))
