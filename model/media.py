"""Decoding of user-supplied images, audio and video into model-ready form.

Everything here handles untrusted bytes (uploads, data URIs, files named on the
command line), so the module is built around three rules:

* **Only ``MediaError`` escapes.**  Every public ``decode_*`` function turns any
  failure into a ``MediaError`` whose ``status`` is the HTTP status the server
  answers with: 400 (empty, corrupt, undecodable), 413 (over a configured
  limit) or 415 (recognised but unsupported type).
* **Limits are checked on header metadata before any pixel/sample is decoded,
  and enforced again while decoding**, because headers can lie.  Nothing is ever
  allocated on a header's word: audio is read in bounded blocks, video is
  decoded frame by frame keeping only the sampled frames.
* **No shared mutable state**, so the server may call these functions from a
  thread pool.  (The one process-wide setting touched, Pillow's decompression
  bomb threshold, is only ever raised, under a lock, to the configured limit.)

Outputs: images are RGB ``PIL.Image.Image``; audio is a 1-D float32 numpy array,
mono, at ``SAMPLE_RATE`` (16 kHz); video is a ``DecodedVideo`` with sampled RGB
frames, their timestamps and the audio track in the same audio form.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import numbers
import os
import re
import stat
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import av
import av.error
import numpy as np
import soundfile as sf
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "SAMPLE_RATE",
    "DecodedVideo",
    "MediaError",
    "MediaLimits",
    "decode_audio",
    "decode_image",
    "decode_video",
    "load_media_file",
    "sniff_kind",
]

logger = logging.getLogger(__name__)

#: Sample rate (Hz) of every audio array this module returns.
SAMPLE_RATE = 16_000
#: Sample rates accepted from files (telephony 1 kHz up to studio 768 kHz).
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1_000, 768_000


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


@dataclass
class DecodedVideo:
    """Frames sampled from a video, plus its audio track."""

    frames: list[Image.Image]  # RGB, sampled frames in time order
    timestamps: list[float]  # seconds from the start of the video, one per frame
    # float32 mono SAMPLE_RATE audio of the whole clip; None when there is no
    # audio track or it has no (decodable) samples.
    audio: np.ndarray | None


_DEFAULT_LIMITS = MediaLimits()

# Decoded audio/video may legitimately run a little past the duration stated in
# the header (encoder padding, rounding of the last frame), so the streaming
# guards allow this much slack beyond the configured limit; header checks are
# exact.
_DURATION_SLACK_S = 0.5

# Per-block budget when reading audio with soundfile: ~4 MB of float32 whatever
# the channel count claimed by the header.
_AUDIO_BLOCK_SAMPLES = 1 << 20

# A few corrupt packets are common in real files (damaged downloads, streams cut
# mid-GOP); past this many we give up rather than grind through garbage.
_MAX_DECODE_ERRORS = 64

# Frames are decoded sequentially up to the last sampled time, so a clip whose
# timestamps are packed densely (thousands of tiny frames per second) could cost
# far more decoding than its duration suggests.  Cap the decoded frame count at
# this average rate over the duration limit.
_MAX_VIDEO_FPS = 240

# Upper bound on decoder threads per video, so a thread pool of concurrent
# decodes does not oversubscribe the CPU by a factor of cpu_count.
_VIDEO_DECODER_THREADS = min(4, os.cpu_count() or 1)

# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    """A short human description of a library exception."""
    # str() of FFmpeg errors includes errno and the (meaningless) file name.
    text = (exc.strerror or str(exc)) if isinstance(exc, av.error.FFmpegError) else str(exc)
    return text.strip() or type(exc).__name__


@contextmanager
def _only_media_errors(what: str) -> Iterator[None]:
    """Turn any exception into MediaError: the public contract of decode_*."""
    try:
        yield
    except MediaError:
        raise
    except MemoryError:
        raise MediaError(f"{what} is too large to decode", 413) from None
    except Exception as exc:
        # Libraries raise many types; none may escape.
        raise MediaError(f"could not decode {what}: {_describe(exc)}", 400) from exc


def _check_input(data: object, limits: MediaLimits, what: str) -> bytes:
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


def _check_duration(seconds: float, limit: float, what: str) -> None:
    if seconds > limit:
        raise MediaError(f"{what} is {seconds:.1f} s long, over the limit of {limit:g} s", 413)


# --------------------------------------------------------------------------------------
# Type sniffing
# --------------------------------------------------------------------------------------

_ISO_IMAGE_BRANDS = frozenset(
    {
        b"heic",
        b"heix",
        b"heim",
        b"heis",
        b"hevc",
        b"mif1",
        b"msf1",
        b"avif",
        b"avis",
    }
)
_ISO_AUDIO_BRANDS = frozenset({b"M4A ", b"M4B ", b"M4P ", b"F4A ", b"F4B "})
# Track handler types in ISO-BMFF/QuickTime 'hdlr' boxes: size, 'hdlr',
# version+flags (4), pre_defined/component type (4), then the handler type.
_HDLR_VIDEO = re.compile(rb"hdlr.{8}vide", re.DOTALL)
_HDLR_SOUND = re.compile(rb"hdlr.{8}soun", re.DOTALL)
# Matroska CodecID element (0x86, 1-byte size) whose value starts with V_ / A_.
_MKV_VIDEO_CODEC = re.compile(rb"\x86[\x81-\xbf]V_")
_MKV_AUDIO_CODEC = re.compile(rb"\x86[\x81-\xbf]A_")
_ASF_HEADER = b"\x30\x26\xb2\x75\x8e\x66\xcf\x11\xa6\xd9\x00\xaa\x00\x62\xce\x6c"
_ASF_VIDEO_MEDIA = b"\xc0\xef\x19\xbc\x4d\x5b\xcf\x11\xa8\xfd\x00\x80\x5f\x5c\x44\x2b"
_BMP_DIB_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})


def _markup_type(data: bytes) -> str | None:
    """'SVG', 'XML' or 'HTML' when the bytes are markup text, else None.

    Pillow cannot rasterise SVG; detecting it explicitly gives a precise 415
    instead of a vague "cannot identify image".
    """
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if not head.startswith(b"<"):
        return None
    if b"<svg" in head:
        return "SVG"
    if head.startswith((b"<!doctype html", b"<html")):
        return "HTML"
    if head.startswith((b"<?xml", b"<!doctype", b"<!--")):
        return "XML"
    return None


def _sniff_isobmff(data: bytes) -> str:
    brand = data[8:12]
    if brand in _ISO_IMAGE_BRANDS:
        return "image"
    if brand in _ISO_AUDIO_BRANDS:
        return "audio"
    # Generic brands (isom, mp42, qt, ...) are used for both; decide from the
    # track handlers.  The moov box may sit at the end, so search everything.
    if _HDLR_VIDEO.search(data):
        return "video"
    if _HDLR_SOUND.search(data):
        return "audio"
    return "video"


# Bitrates (kbit/s) by bitrate index, for (MPEG-1?, layer); MPEG-2/2.5 share tables.
_MPEG_BITRATES = {
    (True, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 3): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
# Sample rates by MPEG version bits (0: 2.5, 2: 2, 3: 1) and rate index.
_MPEG_RATES = {0: (11025, 12000, 8000), 2: (22050, 24000, 16000), 3: (44100, 48000, 32000)}


def _mpeg_frame_length(data: bytes, pos: int) -> int | None:
    """Length of the MPEG audio or ADTS frame whose header is at `pos`, or None."""
    h = data[pos : pos + 7]
    if len(h) < 4 or h[0] != 0xFF or (h[1] & 0xE0) != 0xE0:
        return None
    if (h[1] & 0xF6) == 0xF0:  # ADTS (AAC): 12-bit sync, layer '00', length in header
        if len(h) < 7:
            return None
        length = ((h[3] & 0x03) << 11) | (h[4] << 3) | (h[5] >> 5)
        return length if length >= 7 else None
    version, layer_bits = (h[1] >> 3) & 3, (h[1] >> 1) & 3
    bitrate_index, rate_index, padding = h[2] >> 4, (h[2] >> 2) & 3, (h[2] >> 1) & 1
    if version == 1 or layer_bits == 0 or bitrate_index in (0, 15) or rate_index == 3:
        return None
    layer = 4 - layer_bits
    mpeg1 = version == 3
    bitrate = _MPEG_BITRATES[(mpeg1, layer)][bitrate_index] * 1000
    rate = _MPEG_RATES[version][rate_index]
    if layer == 1:
        return (12 * bitrate // rate + padding) * 4
    per_frame = 144 if (mpeg1 or layer == 2) else 72
    return per_frame * bitrate // rate + padding


def _sniff_mpeg_audio(data: bytes) -> bool:
    """True for bare MPEG audio (MP1/2/3) or AAC ADTS: two consecutive frames.

    A single 11-bit frame sync matches about one random input in a thousand, so
    the header must also predict where the next frame starts.
    """
    length = _mpeg_frame_length(data, 0)
    if length is None:
        return False
    if length >= len(data):
        return length == len(data)  # a file of exactly one frame
    return _mpeg_frame_length(data, length) is not None


def _has_image_signature(data: bytes) -> bool:
    """Cheap check (first bytes only) for the image formats sniff_kind knows."""
    head = data[:64]
    if head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a")):
        return True
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    if head[:2] == b"BM" and len(head) >= 18:
        return int.from_bytes(head[14:18], "little") in _BMP_DIB_HEADER_SIZES
    if head[:4] in (b"II*\x00", b"MM\x00*"):  # TIFF
        return True
    if head[4:8] == b"ftyp" and head[8:12] in _ISO_IMAGE_BRANDS:  # HEIF / AVIF
        return True
    return _markup_type(data) == "SVG"


def sniff_kind(data: bytes) -> str | None:
    """Classify bytes as "image", "audio" or "video" from magic numbers, or None.

    Used to route data URIs and files whose type is not stated.  Recognised but
    unsupported images (TIFF, SVG, HEIC/AVIF) still report "image" so that
    decode_image can answer with a precise 415.
    """
    if not data:
        return None
    data = bytes(data)
    head = data[:64]
    if _has_image_signature(data):
        return "image"
    # --- RIFF family: WAV / AVI
    if head[:4] in (b"RIFF", b"RIFX", b"RF64", b"BW64"):
        if head[8:12] == b"WAVE":
            return "audio"
        if head[8:12] in (b"AVI ", b"AVIX"):
            return "video"
        return None
    # --- other audio containers
    if head[:4] in (b"fLaC", b".snd", b"caff") or head.startswith((b"#!AMR", b"ID3")):
        return "audio"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "audio"
    if head[:4] == b"OggS":
        # All beginning-of-stream pages come first, so a Theora video stream
        # announces itself in the first few KB even when audio is listed first.
        return "video" if b"\x80theora" in data[:16384] else "audio"
    # --- video containers
    if head[4:8] == b"ftyp":
        return _sniff_isobmff(data)
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: Matroska / WebM
        tracks = data[: 1 << 20]
        if _MKV_VIDEO_CODEC.search(tracks):
            return "video"
        return "audio" if _MKV_AUDIO_CODEC.search(tracks) else "video"
    if head[:16] == _ASF_HEADER:  # WMV / WMA
        return "video" if _ASF_VIDEO_MEDIA in data[: 1 << 16] else "audio"
    if head[:3] == b"FLV" or head[:4] == b"\x00\x00\x01\xba":  # FLV, MPEG-PS
        return "video"
    if len(data) > 376 and data[0] == data[188] == data[376] == 0x47:  # MPEG-TS
        return "video"
    # --- bare MPEG audio / ADTS (weakest signature, so last)
    if _sniff_mpeg_audio(data):
        return "audio"
    return None


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------

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
        logger.debug("ignoring unreadable EXIF orientation: %s", _describe(exc))
        return im


def decode_image(data: bytes, limits: MediaLimits = _DEFAULT_LIMITS) -> Image.Image:
    """Decode PNG / JPEG / WebP / GIF (first frame) / BMP bytes to an upright RGB image."""
    data = _check_input(data, limits, "image")
    with _only_media_errors("image"):
        return _decode_image(data, limits)


def _decode_image(data: bytes, limits: MediaLimits) -> Image.Image:
    markup = _markup_type(data)
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
        raise MediaError(f"corrupt image: {_describe(exc)}", 400) from None

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
            raise MediaError(f"corrupt or truncated {fmt} image: {_describe(exc)}", 400) from None
        return _to_rgb(_exif_upright(im))


# --------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------

# Demuxers (FFmpeg short names) allowed to feed the audio / video decoders.
# FFmpeg can probe hundreds of formats, including raw elementary streams that
# "recognise" random bytes; an allow-list keeps garbage out and rarely used
# parsers away from untrusted input.
_ISO_DEMUXERS = ("mov", "mp4", "m4a", "3gp", "3g2", "mj2")
_AUDIO_DEMUXERS = frozenset(
    (
        *_ISO_DEMUXERS,
        *("wav", "w64", "rf64", "flac", "ogg", "mp3", "aac", "matroska", "webm", "aiff"),
        *("caf", "au", "amr", "avi", "asf", "mpegts", "mpeg", "flv"),
    )
)
_VIDEO_DEMUXERS = frozenset(
    (*_ISO_DEMUXERS, "matroska", "webm", "avi", "asf", "mpegts", "mpeg", "flv", "ogg", "gif")
)


def _looks_like_soundfile_input(data: bytes) -> bool:
    """Containers libsndfile reads well; everything else goes straight to PyAV.

    Routing by signature (rather than trying libsndfile on everything) avoids
    its MP3 probe scanning through megabytes of junk, and a second decode
    attempt for the common M4A/MP4 case it cannot read at all.
    """
    head = data[:16]
    if head[:4] in (b"RIFF", b"RIFX", b"RF64", b"BW64") and head[8:12] == b"WAVE":
        return True
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return True
    return head[:4] in (b"fLaC", b"OggS", b".snd", b"caff") or head[:4] == b"riff"  # riff: W64


def _pcm_to_float(arr: np.ndarray) -> np.ndarray:
    """Scale integer PCM to float32 in [-1, 1)."""
    if arr.dtype.kind == "f":
        return arr.astype(np.float32, copy=False)
    if arr.dtype == np.uint8:
        return (arr.astype(np.float32) - 128.0) / 128.0
    scale = float(2 ** (8 * arr.dtype.itemsize - 1))
    return (arr.astype(np.float64) / scale).astype(np.float32)


def _frame_to_mono(frame: av.AudioFrame) -> np.ndarray:
    """Average the channels of a decoded frame into float32 mono at its own rate."""
    arr = frame.to_ndarray()
    channels = max(1, len(frame.layout.channels))
    if channels == 1:
        return _pcm_to_float(arr.reshape(-1))
    if not frame.format.is_planar:
        # Packed formats come back as one interleaved row.
        arr = arr.reshape(-1, channels).T
    return _pcm_to_float(arr).mean(axis=0, dtype=np.float32)


class _AudioSink:
    """Collects audio blocks of any rate/channel count as 16 kHz mono float32.

    Downmixing is a plain channel average (FFmpeg's own stereo->mono matrix
    sums at 0.707 each, which can clip).  Resampling goes through libswresample,
    a proper band-limited resampler, so tones keep their frequency.  The
    accumulated input duration is checked on every block, so audio longer than
    the limit is rejected after decoding at most limit + one block of it.
    """

    # Codec frames are small (1024 samples for AAC); batching them before the
    # resampler cuts the per-call overhead that otherwise dominates.
    _BATCH_SAMPLES = 1 << 16

    def __init__(self, max_seconds: float, what: str) -> None:
        self._max_seconds = max_seconds
        self._what = what
        self._seconds = 0.0
        self._rate: int | None = None
        self._resampler: av.AudioResampler | None = None
        self._pending: list[np.ndarray] = []  # input-rate samples not yet resampled
        self._pending_samples = 0
        self._chunks: list[np.ndarray] = []  # output (16 kHz) samples

    def add_frame(self, frame: av.AudioFrame) -> None:
        if frame.samples and frame.sample_rate:
            self.add_mono(_frame_to_mono(frame), frame.sample_rate)

    def add_mono(self, samples: np.ndarray, rate: int) -> None:
        if samples.size == 0:
            return
        if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
            raise MediaError(f"{self._what} has an invalid sample rate {rate}", 400)
        self._seconds += samples.size / rate
        if self._seconds > self._max_seconds + _DURATION_SLACK_S:
            raise MediaError(
                f"{self._what} is longer than the limit of {self._max_seconds:g} s", 413
            )
        if rate != self._rate:
            # A stream may change rate mid-way (chained Ogg, HE-AAC switches):
            # finish the old resampler so no buffered samples are lost or reordered.
            self._flush()
            self._rate = rate
        samples = np.ascontiguousarray(samples, dtype=np.float32)
        if rate == SAMPLE_RATE:
            self._chunks.append(samples)
            return
        self._pending.append(samples)
        self._pending_samples += samples.size
        if self._pending_samples >= self._BATCH_SAMPLES:
            self._resample_pending()

    def _resample_pending(self) -> None:
        if not self._pending or self._rate is None:
            return
        block = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending, self._pending_samples = [], 0
        if self._resampler is None:
            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        frame = av.AudioFrame.from_ndarray(block.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = self._rate
        self._collect(self._resampler.resample(frame))

    def _collect(self, frames: Sequence[av.AudioFrame | None]) -> None:
        for out in frames:
            if out is not None and out.samples:
                self._chunks.append(out.to_ndarray().reshape(-1).astype(np.float32, copy=False))

    def _flush(self) -> None:
        self._resample_pending()
        if self._resampler is not None:
            self._collect(self._resampler.resample(None))
            self._resampler = None

    def finish(self) -> np.ndarray:
        self._flush()
        if not self._chunks:
            return np.zeros(0, dtype=np.float32)
        out = np.concatenate(self._chunks)
        self._chunks = []
        # Lossy decoders overshoot slightly; clip to the [-1, 1] range that
        # 16-bit based pipelines (and the audio encoders' training data) assume.
        return np.clip(out, -1.0, 1.0, out=out)


def decode_audio(data: bytes, limits: MediaLimits = _DEFAULT_LIMITS) -> np.ndarray:
    """Decode WAV / FLAC / OGG (Vorbis, Opus) / MP3 / M4A (AAC) to 16 kHz mono float32."""
    data = _check_input(data, limits, "audio")
    with _only_media_errors("audio"):
        samples = _decode_audio(data, limits.max_audio_seconds)
    if samples.size == 0:
        raise MediaError("audio has no samples", 400)
    return samples


def _decode_audio(data: bytes, max_seconds: float) -> np.ndarray:
    if _has_image_signature(data):
        raise MediaError("expected audio but got image data", 415)
    if _looks_like_soundfile_input(data):
        try:
            samples = _decode_audio_soundfile(data, max_seconds)
        except MediaError:
            raise
        except Exception as exc:
            # Any libsndfile failure: let FFmpeg try.
            logger.debug("soundfile could not decode audio (%s); trying PyAV", _describe(exc))
        else:
            if samples.size:
                return samples
            # libsndfile gives up on some damaged files without an error
            # (e.g. a truncated last Ogg page); FFmpeg may recover them.
            logger.debug("soundfile decoded no samples; trying PyAV")
            try:
                return _decode_audio_pyav(data, max_seconds)
            except MediaError as exc:
                if exc.status == 413:
                    raise
                return samples  # reported as "audio has no samples"
    return _decode_audio_pyav(data, max_seconds)


def _decode_audio_soundfile(data: bytes, max_seconds: float) -> np.ndarray:
    with sf.SoundFile(io.BytesIO(data)) as f:
        rate, channels, frames = f.samplerate, f.channels, f.frames
        # A header may claim any rate; resampling from an absurd one costs seconds and hundreds
        # of MB before anything useful comes out, so only real-world rates are decoded.
        if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE or channels <= 0:
            raise MediaError(f"audio header is invalid ({rate} Hz, {channels} channels)", 400)
        # libsndfile reports the maximum count for streams of unknown length.
        if 0 < frames < 2**62:
            _check_duration(frames / rate, max_seconds, "audio")
        sink = _AudioSink(max_seconds, "audio")
        # Block size comes from our budget, never from the header's frame count.
        block = max(256, _AUDIO_BLOCK_SAMPLES // channels)
        while True:
            chunk = f.read(block, dtype="float32", always_2d=True)
            if chunk.shape[0] == 0:
                break
            sink.add_mono(chunk.mean(axis=1, dtype=np.float32), rate)
        return sink.finish()


def _open_container(data: bytes, what: str) -> av.container.InputContainer:
    try:
        # Metadata is free-form bytes; a bad encoding must not fail the decode.
        return av.open(io.BytesIO(data), mode="r", metadata_errors="replace")
    except av.error.FFmpegError as exc:
        raise MediaError(f"could not read {what}: {_describe(exc)}", 400) from None


def _check_demuxer(
    container: av.container.InputContainer, allowed: frozenset[str], what: str
) -> None:
    names = set(container.format.name.split(","))
    if not names & allowed:
        raise MediaError(f"unsupported {what} container {container.format.name}", 415)


def _container_seconds(container: av.container.InputContainer) -> float | None:
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    return None


def _stream_seconds(stream: av.stream.Stream) -> float | None:
    if stream.duration is not None and stream.duration > 0 and stream.time_base:
        return float(stream.duration * stream.time_base)
    return None


def _stream_start(stream: av.stream.Stream) -> float:
    if stream.start_time is not None and stream.time_base:
        return float(stream.start_time * stream.time_base)
    return 0.0


class _Decoder:
    """Decodes packets of one stream, tolerating a bounded number of bad packets."""

    def __init__(self, what: str) -> None:
        self._what = what
        self.errors = 0
        self.last_error: str | None = None

    def decode(self, packet: av.Packet) -> list[av.frame.Frame]:
        try:
            return packet.decode()
        except (av.error.FFmpegError, ValueError) as exc:
            # Decoders report damaged input with assorted error codes (AAC even
            # uses EPERM), so any decoding error counts as a bad packet.
            self.errors += 1
            self.last_error = _describe(exc)
            if self.errors > _MAX_DECODE_ERRORS:
                raise MediaError(f"{self._what} is corrupt: {self.last_error}", 400) from None
            return []


def _decode_audio_pyav(data: bytes, max_seconds: float) -> np.ndarray:
    with _open_container(data, "audio") as container:
        if not container.streams.audio:
            raise MediaError("no audio stream found", 400)
        _check_demuxer(container, _AUDIO_DEMUXERS, "audio")
        stream = container.streams.audio[0]
        if stream.codec_context is None:
            raise MediaError("unsupported audio codec (no decoder available)", 415)
        duration = _stream_seconds(stream) or _container_seconds(container)
        if duration is not None:
            _check_duration(duration, max_seconds, "audio")
        sink = _AudioSink(max_seconds, "audio")
        decoder = _Decoder("audio")
        for packet in container.demux(stream):
            for frame in decoder.decode(packet):
                sink.add_frame(frame)
        samples = sink.finish()
    if samples.size == 0 and decoder.last_error:
        raise MediaError(f"could not decode audio: {decoder.last_error}", 400)
    return samples


# --------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------


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
        if t > self._limits.max_video_seconds + _DURATION_SLACK_S:
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
    limits: MediaLimits = _DEFAULT_LIMITS,
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
    data = _check_input(data, limits, "video")
    with _only_media_errors("video"):
        return _decode_video(data, limits, float(fps), int(max_frames))


def _decode_video(data: bytes, limits: MediaLimits, fps: float, max_frames: int) -> DecodedVideo:
    # Animated GIF is the one image format FFmpeg may read as a video.
    if _has_image_signature(data) and not data.startswith((b"GIF87a", b"GIF89a")):
        raise MediaError("expected a video but got image data", 415)

    with _open_container(data, "video") as container:
        duration = _inspect_video(container, limits)
        if duration is not None:
            return _sample_video(container, limits, _plan_targets(duration, fps, max_frames))
        # No duration in the metadata: measure it from packet timestamps
        # (demuxing only, no decoding) so frames can be spread over the clip.
        duration = _scan_video_duration(container, limits)
    # The scan consumed the container; a fresh one is cheaper and more reliable
    # than seeking back in an arbitrary format.
    with _open_container(data, "video") as container:
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
    _check_demuxer(container, _VIDEO_DEMUXERS, "video")
    ctx = stream.codec_context
    if ctx is None:
        raise MediaError("unsupported video codec (no decoder available)", 415)
    _check_resolution(ctx.width, ctx.height, limits)
    clip = _container_seconds(container)
    video = _stream_seconds(stream)
    for seconds in (clip, video):
        if seconds is not None:
            _check_duration(seconds, limits.max_video_seconds, "video")
    return video if video is not None else clip


def _scan_video_duration(container: av.container.InputContainer, limits: MediaLimits) -> float:
    stream = _video_stream(container)
    start = _stream_start(stream)
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

    start = _stream_start(vstream)
    picker = _FramePicker(targets, start, limits)
    vdecoder = _Decoder("video")
    sink = _AudioSink(limits.max_video_seconds, "video") if astream is not None else None
    adecoder = _Decoder("video audio track")
    starts = {s.index: _stream_start(s) for s in (vstream, astream) if s is not None}
    streams = [s for s in (vstream, astream) if s is not None]

    for packet in container.demux(*streams):
        # Metadata can understate the length: check the real timestamps too.
        if packet.pts is not None and packet.time_base is not None:
            t = float(packet.pts * packet.time_base) - starts.get(packet.stream.index, 0.0)
            if t > limits.max_video_seconds + _DURATION_SLACK_S:
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
                logger.warning("dropping undecodable audio track: %s", _describe(exc))
                sink = None

    picker.finish(vdecoder.last_error)
    audio = sink.finish() if sink is not None else None
    if audio is not None and audio.size == 0:
        audio = None
    return DecodedVideo(frames=picker.frames, timestamps=picker.timestamps, audio=audio)


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def load_media_file(
    path: str | os.PathLike[str],
    kind: str,
    limits: MediaLimits = _DEFAULT_LIMITS,
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
