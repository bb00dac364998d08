"""Kind detection: "image", "audio" or "video" from magic numbers, before any decoder runs."""

from __future__ import annotations

import re

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


def markup_type(data: bytes) -> str | None:
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


def has_image_signature(data: bytes) -> bool:
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
    return markup_type(data) == "SVG"


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
    if has_image_signature(data):
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
