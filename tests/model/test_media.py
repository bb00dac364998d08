"""Tests for xllm.model.media: decoding of untrusted image / audio / video bytes.

Every sample is generated here (Pillow, soundfile, PyAV encoders), kept tiny so
the whole file runs in seconds on a small CPU.
"""

from __future__ import annotations

import io
import pickle
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from xllm.model.media import (
    SAMPLE_RATE,
    DecodedVideo,
    MediaError,
    MediaLimits,
    decode_audio,
    decode_image,
    decode_video,
    load_media_file,
    sniff_kind,
)
from xllm.model.media.writer import encode_video as write_video
from xllm.model.media.writer import mux_audio

RED, GREEN, BLUE = (230, 20, 20), (20, 230, 20), (20, 20, 230)

# --------------------------------------------------------------------------------------
# Generators
# --------------------------------------------------------------------------------------


def encode_image(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def solid(color: tuple[int, ...], size: tuple[int, int] = (40, 30), mode: str = "RGB"):
    return Image.new(mode, size, color)


def png_with_header_size(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height (pixel data stays 1x1)."""
    d = bytearray(encode_image(Image.new("1", (1, 1)), "PNG"))
    # Signature (8), then the IHDR chunk: length (4), b"IHDR", 13 data bytes, CRC.
    assert d[12:16] == b"IHDR"
    d[16:20] = width.to_bytes(4, "big")
    d[20:24] = height.to_bytes(4, "big")
    d[29:33] = zlib.crc32(bytes(d[12:29])).to_bytes(4, "big")
    return bytes(d)


def sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encode_sf(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    """samples: (n,) or (n, channels) float32."""
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def need_encoder(name: str) -> None:
    """Skip (rather than fail) where a PyAV build lacks an encoder used to make samples."""
    try:
        av.Codec(name, "w")
    except Exception:
        pytest.skip(f"PyAV build has no {name} encoder")


def encode_av_audio(fmt: str, codec: str, planar: np.ndarray, rate: int) -> bytes:
    """Encode (channels, n) float32 at `rate` with a PyAV encoder."""
    need_encoder(codec)
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        layout = "mono" if planar.shape[0] == 1 else "stereo"
        stream = container.add_stream(codec, rate=rate, layout=layout)
        mux_audio(container, stream, planar, rate)
    return buf.getvalue()


def encode_video(
    fmt: str,
    codec: str,
    *,
    seconds: float = 3.0,
    rate: int = 10,
    size: tuple[int, int] = (64, 48),
    color: Callable[[float], tuple[int, int, int]] = lambda t: RED,
    audio_codec: str | None = None,
    rotation: int | None = None,
    options: dict[str, str] | None = None,
) -> bytes:
    """A `seconds` clip of `size` (W, H) whose colour at time t is color(t); with `rotation`, the
    left half is BLUE (to check orientation); with `audio_codec`, a 440 Hz tone track."""
    need_encoder(codec)
    if audio_codec is not None:
        need_encoder(audio_codec)
    if rotation is not None and not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
        pytest.skip(f"PyAV {av.__version__} cannot write a display rotation (18 can)")
    frames = np.empty((round(seconds * rate), size[1], size[0], 3), np.uint8)  # (T, H, W, 3)
    for i, img in enumerate(frames):
        img[:] = color(i / rate)
        if rotation is not None:
            img[:, : size[0] // 2] = BLUE
    audio_rate = 48000 if audio_codec is not None and "opus" in audio_codec else 44100
    return write_video(
        frames,
        rate,
        codec=codec,
        container=fmt,
        audio=None if audio_codec is None else sine(440, seconds, audio_rate, 0.3),
        audio_rate=audio_rate,
        audio_codec=audio_codec or "aac",
        rotation=rotation,
        options=options,
    )


def by_second(t: float) -> tuple[int, int, int]:
    return (RED, GREEN, BLUE, (230, 230, 20), (20, 230, 230))[int(t) % 5]


def dominant_frequency(x: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


def close(a, b, tol: int) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b, strict=True))


def expect_error(fn: Callable[[], object], status: int, *words: str) -> MediaError:
    with pytest.raises(MediaError) as info:
        fn()
    err = info.value
    assert err.status == status, (err.status, err.message)
    for word in words:
        assert word.lower() in err.message.lower(), err.message
    return err


# --------------------------------------------------------------------------------------
# Shared samples
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mp4_av() -> bytes:
    """3 s, 10 fps H.264 + AAC mono 440 Hz, colour changes every second."""
    return encode_video("mp4", "libx264", color=by_second, audio_codec="aac")


@pytest.fixture(scope="module")
def m4a() -> bytes:
    x = sine(440, 1.0, 44100)
    return encode_av_audio("ipod", "aac", np.stack([x, x]), 44100)


@pytest.fixture(scope="module")
def png() -> bytes:
    return encode_image(solid(RED), "PNG")


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "kwargs", "tol"),
    [
        ("PNG", {}, 0),
        ("JPEG", {"quality": 95}, 6),
        ("WEBP", {"quality": 95}, 8),
        ("WEBP", {"lossless": True}, 0),
        ("GIF", {}, 0),
        ("BMP", {}, 0),
    ],
)
def test_image_formats(fmt: str, kwargs: dict, tol: int) -> None:
    im = decode_image(encode_image(solid(RED, (40, 30)), fmt, **kwargs))
    assert im.mode == "RGB"
    assert im.size == (40, 30)
    assert close(im.getpixel((20, 15)), RED, tol)


def test_image_exif_orientation_applied() -> None:
    im = Image.new("RGB", (40, 20), RED)
    im.paste(BLUE, (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = decode_image(encode_image(im, "JPEG", quality=95, exif=exif.tobytes()))
    assert out.size == (20, 40)  # width and height swapped
    # Rotating clockwise puts the left (red) half on top.
    assert close(out.getpixel((10, 5)), RED, 10)
    assert close(out.getpixel((10, 35)), BLUE, 10)


def test_image_alpha_flattened_on_white() -> None:
    im = Image.new("RGBA", (40, 20), (0, 0, 0, 0))  # transparent black
    im.paste((200, 0, 0, 255), (20, 0, 40, 10))  # opaque red
    im.paste((0, 0, 0, 128), (20, 10, 40, 20))  # half-transparent black
    out = decode_image(encode_image(im, "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((5, 5)) == (255, 255, 255)
    assert out.getpixel((30, 5)) == (200, 0, 0)
    assert close(out.getpixel((30, 15)), (127, 127, 127), 2)


def test_image_la_and_palette_transparency() -> None:
    la = Image.new("LA", (8, 8), (0, 0))
    assert decode_image(encode_image(la, "PNG")).getpixel((1, 1)) == (255, 255, 255)
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    pal.paste(0, (0, 0, 4, 8))  # left half: index 0, declared transparent
    out = decode_image(encode_image(pal, "GIF", transparency=0))
    assert out.getpixel((1, 1)) == (255, 255, 255)
    assert out.getpixel((6, 1)) == (200, 0, 0)


def test_image_gif_first_frame() -> None:
    frames = [solid(c, (16, 16)) for c in (RED, GREEN, BLUE)]
    data = encode_image(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    out = decode_image(data)
    assert close(out.getpixel((8, 8)), RED, 4)


def test_image_16bit_grayscale_scaled() -> None:
    arr = np.zeros((4, 8), np.uint16)
    arr[:, 4:] = 65535
    arr[:, :4] = 32896  # 128 * 257
    im = Image.fromarray(arr)
    out = decode_image(encode_image(im, "PNG"))
    assert out.getpixel((6, 1)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (128, 128, 128)


@pytest.mark.parametrize(
    ("data", "status", "word"),
    [
        (b"", 400, "empty"),
        (b"\x00" * 100, 400, ""),
        (np.random.default_rng(1).bytes(5000), 400, ""),
        (b"\x89PNG\r\n\x1a\n", 400, ""),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', 415, "SVG"),
        (b'  <svg width="10" height="10"></svg>', 415, "SVG"),
        (b"%PDF-1.4\n%...", 415, "PDF"),
    ],
)
def test_image_bad_inputs(data: bytes, status: int, word: str) -> None:
    expect_error(lambda: decode_image(data), status, word)


def test_image_truncated_png_and_jpeg() -> None:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    for fmt in ("PNG", "JPEG"):
        data = encode_image(noise, fmt)
        for cut in (len(data) // 2, len(data) - 40, 30):
            expect_error(lambda d=data[:cut]: decode_image(d), 400)


def test_image_unsupported_formats_415() -> None:
    expect_error(lambda: decode_image(encode_image(solid(RED), "TIFF")), 415, "TIFF", "PNG")
    expect_error(lambda: decode_image(encode_image(solid(RED), "ICO")), 415, "ICO")
    wav = encode_sf(sine(440, 0.1, 16000), 16000, "WAV")
    expect_error(lambda: decode_image(wav), 415, "audio")


def test_image_pixel_limit_checked_before_decoding(monkeypatch) -> None:
    from PIL import ImageFile

    def no_pixels(self):  # Pillow decodes pixel data in load(): it must not be reached
        raise AssertionError("pixels were decoded for an image refused by its header")

    with monkeypatch.context() as patch:
        patch.setattr(ImageFile.ImageFile, "load", no_pixels)
        # Far beyond Pillow's own bomb threshold (Pillow refuses it while parsing the header).
        expect_error(lambda: decode_image(png_with_header_size(20000, 20000)), 413, "400000000")
        # Over our 40 MP limit but under Pillow's: our guard, which names the size.
        expect_error(
            lambda: decode_image(png_with_header_size(8000, 8000)), 413, "8000x8000", "40000000"
        )
    # A real, fully valid image that compresses tiny: still refused, not decoded.
    small = MediaLimits(max_image_pixels=1_000_000)
    bomb = encode_image(Image.new("1", (2000, 2000)), "PNG")
    assert len(bomb) < 10_000
    expect_error(lambda: decode_image(bomb, small), 413, "2000x2000", "1000000")


def test_image_custom_limits() -> None:
    data = encode_image(solid(RED, (40, 30)), "PNG")
    expect_error(lambda: decode_image(data, MediaLimits(max_image_pixels=1000)), 413, "40x30")
    expect_error(lambda: decode_image(data, MediaLimits(max_bytes=10)), 413, "bytes")
    # A limit above Pillow's default bomb threshold must not trip Pillow's check.
    big = MediaLimits(max_image_pixels=400_000_000)
    expect_error(lambda: decode_image(png_with_header_size(20000, 20000), big), 400)


# --------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------


def _stereo(x: np.ndarray) -> np.ndarray:
    return np.stack([x, x], axis=1)


AUDIO_CASES: dict[str, Callable[[], bytes]] = {
    "wav-44k-stereo": lambda: encode_sf(_stereo(sine(440, 1.0, 44100)), 44100, "WAV", "PCM_16"),
    "wav-8k": lambda: encode_sf(sine(440, 1.0, 8000), 8000, "WAV", "PCM_16"),
    "wav-96k-float": lambda: encode_sf(sine(440, 1.0, 96000), 96000, "WAV", "FLOAT"),
    "wav-16k-u8": lambda: encode_sf(sine(440, 1.0, 16000), 16000, "WAV", "PCM_U8"),
    "flac-48k": lambda: encode_sf(sine(440, 1.0, 48000), 48000, "FLAC"),
    "ogg-vorbis": lambda: encode_sf(_stereo(sine(440, 1.0, 44100)), 44100, "OGG", "VORBIS"),
    "ogg-opus": lambda: encode_av_audio("ogg", "libopus", sine(440, 1.0, 48000)[None], 48000),
    "mp3": lambda: encode_av_audio("mp3", "libmp3lame", sine(440, 1.0, 44100)[None], 44100),
    "m4a-aac": lambda: encode_av_audio("ipod", "aac", np.stack([sine(440, 1.0, 22050)] * 2), 22050),
    "adts-aac": lambda: encode_av_audio("adts", "aac", sine(440, 1.0, 44100)[None], 44100),
}


@pytest.mark.parametrize("name", list(AUDIO_CASES))
def test_audio_formats_resampled_to_16k_mono(name: str) -> None:
    data = AUDIO_CASES[name]()
    assert sniff_kind(data) == "audio"
    out = decode_audio(data)
    assert out.dtype == np.float32
    assert out.ndim == 1
    # 1 s of audio; lossy codecs add up to a few tens of ms of padding.
    assert abs(len(out) - SAMPLE_RATE) <= 0.06 * SAMPLE_RATE, len(out)
    assert abs(dominant_frequency(out) - 440) < 3
    middle = out[2000:-2000]
    rms = float(np.sqrt(np.mean(middle**2)))
    assert 0.5 / np.sqrt(2) * 0.85 < rms < 0.5 / np.sqrt(2) * 1.15, rms
    assert np.all(np.abs(out) <= 1.0)


@pytest.mark.parametrize("path", ["soundfile", "pyav"])
def test_audio_stereo_is_averaged(path: str) -> None:
    left = sine(440, 1.0, 44100, 0.6)
    right = sine(440, 1.0, 44100, 0.2)
    if path == "soundfile":
        data = encode_sf(np.stack([left, right], axis=1), 44100, "WAV", "FLOAT")
    else:
        data = encode_av_audio("ipod", "aac", np.stack([left, right]), 44100)
    out = decode_audio(data)[2000:-2000]
    peak = float(np.sqrt(2) * np.sqrt(np.mean(out**2)))
    assert abs(peak - 0.4) < 0.03, peak  # mean of 0.6 and 0.2, not a 0.707-weighted sum


def test_audio_resampling_keeps_pitch_and_length() -> None:
    for rate, freq in ((22050, 1000.0), (48000, 3000.0), (11025, 300.0)):
        out = decode_audio(encode_sf(sine(freq, 2.0, rate), rate, "WAV", "PCM_16"))
        assert abs(len(out) - 2 * SAMPLE_RATE) <= 2
        assert abs(dominant_frequency(out) - freq) < 2


def test_audio_passthrough_at_16k() -> None:
    x = sine(440, 0.5, 16000)
    out = decode_audio(encode_sf(x, 16000, "WAV", "FLOAT"))
    np.testing.assert_allclose(out, x, atol=1e-6)


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"", 400),
        (np.random.default_rng(2).bytes(20000), 400),
        (b"RIFF\x00\x00\x00\x00WAVE" + np.random.default_rng(3).bytes(2000), 400),
        (b"OggS" + np.random.default_rng(4).bytes(2000), 400),
        (b"ID3\x03\x00" + np.random.default_rng(5).bytes(2000), 400),
        (b"\x00\x00\x00\x18ftypM4A " + np.random.default_rng(6).bytes(2000), 400),
    ],
)
def test_audio_garbage(data: bytes, status: int) -> None:
    expect_error(lambda: decode_audio(data), status)


def test_audio_no_samples() -> None:
    empty_wav = encode_sf(np.zeros((0, 1), np.float32), 16000, "WAV", "PCM_16")
    expect_error(lambda: decode_audio(empty_wav), 400, "no samples")


def test_audio_image_is_415(png: bytes) -> None:
    expect_error(lambda: decode_audio(png), 415, "image")


def test_audio_duration_limit() -> None:
    limits = MediaLimits(max_audio_seconds=0.5)
    wav = encode_sf(sine(440, 1.0, 16000), 16000, "WAV", "PCM_16")
    expect_error(lambda: decode_audio(wav, limits), 413, "1.0 s", "0.5 s")
    mp3 = AUDIO_CASES["mp3"]()
    expect_error(lambda: decode_audio(mp3, limits), 413, "0.5 s")


def test_audio_lying_header_is_bounded() -> None:
    wav = bytearray(encode_sf(sine(440, 1.0, 16000), 16000, "WAV", "PCM_16"))
    pos = wav.find(b"data")
    wav[pos + 4 : pos + 8] = struct.pack("<I", 2_000_000_000)  # ~17 hours of samples
    wav[4:8] = struct.pack("<I", 2_000_000_036)
    tracemalloc.start()
    try:
        out = decode_audio(bytes(wav))
    except MediaError as err:
        assert err.status in (400, 413)
    else:
        assert abs(len(out) - SAMPLE_RATE) <= 16  # decoded what is really there
        assert abs(dominant_frequency(out) - 440) < 3
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 100 * 1024 * 1024, peak


def test_audio_length_checked_while_decoding_when_header_is_short() -> None:
    # A header may also claim *less* than is there: the streaming guard catches it.
    wav = bytearray(encode_sf(sine(440, 3.0, 16000), 16000, "WAV", "PCM_16"))
    out = decode_audio(bytes(wav), MediaLimits(max_audio_seconds=3.0))
    assert abs(len(out) - 3 * SAMPLE_RATE) <= 2
    expect_error(lambda: decode_audio(bytes(wav), MediaLimits(max_audio_seconds=2.0)), 413)


# --------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------

VIDEO_CASES: dict[str, Callable[[], bytes]] = {
    "mp4-h264": lambda: encode_video("mp4", "libx264", color=by_second),
    "mp4-h264-alias": lambda: encode_video("mp4", "h264", color=by_second),
    "webm-vp8": lambda: encode_video("webm", "libvpx", color=by_second),
    "webm-vp9-opus": lambda: encode_video(
        "webm", "libvpx-vp9", color=by_second, audio_codec="libopus"
    ),
    "mov-h264": lambda: encode_video("mov", "libx264", color=by_second),
    "mkv-h264": lambda: encode_video("matroska", "libx264", color=by_second),
    "avi-mpeg4": lambda: encode_video("avi", "mpeg4", color=by_second),
}


@pytest.mark.parametrize("name", list(VIDEO_CASES))
def test_video_formats_one_frame_per_second(name: str) -> None:
    data = VIDEO_CASES[name]()
    assert sniff_kind(data) == "video"
    out = decode_video(data, fps=1.0)
    assert isinstance(out, DecodedVideo)
    assert len(out.frames) == 3
    assert out.timestamps == pytest.approx([0.0, 1.0, 2.0], abs=0.06)
    for frame, want in zip(out.frames, (RED, GREEN, BLUE), strict=True):
        assert frame.mode == "RGB"
        assert frame.size == (64, 48)
        assert close(frame.getpixel((32, 24)), want, 30), (name, frame.getpixel((32, 24)))
    if "opus" in name:
        assert out.audio is not None
    else:
        assert out.audio is None


def test_video_frames_follow_a_colour_ramp() -> None:
    # Red grows with time: each picked frame must show the value of its timestamp.
    data = encode_video("mp4", "libx264", color=lambda t: (round(80 * t), 40, 40))
    out = decode_video(data, fps=2.0, max_frames=100)
    assert out.timestamps == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5], abs=0.06)
    reds = [f.getpixel((32, 24))[0] for f in out.frames]
    for red, t in zip(reds, out.timestamps, strict=True):
        assert abs(red - 80 * t) <= 8, (reds, out.timestamps)
    assert reds == sorted(reds)


def test_video_max_frames_spread_over_long_clip() -> None:
    data = encode_video("mp4", "libx264", seconds=20, rate=4, size=(32, 32), color=by_second)
    out = decode_video(data, fps=1.0, max_frames=4)
    assert out.timestamps == pytest.approx([0.0, 5.0, 10.0, 15.0], abs=0.13)
    for frame, t in zip(out.frames, out.timestamps, strict=True):
        assert close(frame.getpixel((16, 16)), by_second(t), 30)
    # Fewer frames than max_frames at the requested rate: fps wins.
    assert len(decode_video(data, fps=0.25, max_frames=8).frames) == 5


def test_video_audio_track(mp4_av: bytes) -> None:
    out = decode_video(mp4_av)
    assert len(out.frames) == 3
    assert out.audio is not None
    assert out.audio.dtype == np.float32
    assert out.audio.ndim == 1
    assert abs(len(out.audio) - 3 * SAMPLE_RATE) <= 0.05 * SAMPLE_RATE
    assert abs(dominant_frequency(out.audio) - 440) < 3
    # The same bytes through decode_audio give the same track.
    assert abs(len(decode_audio(mp4_av)) - len(out.audio)) <= 16


def test_video_opus_audio_track() -> None:
    data = VIDEO_CASES["webm-vp9-opus"]()
    out = decode_video(data)
    assert out.audio is not None
    assert abs(len(out.audio) - 3 * SAMPLE_RATE) <= 0.05 * SAMPLE_RATE
    assert abs(dominant_frequency(out.audio) - 440) < 3


def test_video_display_rotation_applied() -> None:
    data = encode_video("mp4", "libx264", seconds=1, size=(64, 32), rotation=90)
    frame = decode_video(data).frames[0]
    assert frame.size == (32, 64)
    # 90 degrees counter-clockwise: the blue left half ends up at the bottom.
    assert close(frame.getpixel((16, 56)), BLUE, 30)
    assert close(frame.getpixel((16, 8)), RED, 30)


def test_video_without_duration_metadata() -> None:
    live = encode_video("webm", "libvpx", color=by_second, options={"live": "1"})
    with av.open(io.BytesIO(live)) as c:
        assert c.duration is None  # the path under test
    out = decode_video(live, fps=1.0)
    assert out.timestamps == pytest.approx([0.0, 1.0, 2.0], abs=0.06)
    assert close(out.frames[2].getpixel((32, 24)), BLUE, 30)
    expect_error(lambda: decode_video(live, MediaLimits(max_video_seconds=2.0)), 413)


def test_video_short_clip_gives_at_least_one_frame() -> None:
    data = encode_video("mp4", "libx264", seconds=0.1, rate=10)
    out = decode_video(data, fps=1.0)
    assert len(out.frames) == 1
    assert out.timestamps == [0.0]


def test_video_densely_packed_frames_are_capped() -> None:
    # 2000 frames in 2 s: within the duration limit, but past the frame budget.
    data = encode_video("mp4", "libx264", seconds=2.0, rate=1000, size=(16, 16))
    out = decode_video(data, fps=1.0)  # stops decoding once the last target is reached
    assert out.timestamps == pytest.approx([0.0, 1.0])
    expect_error(
        lambda: decode_video(data, MediaLimits(max_video_seconds=3), fps=8.0), 413, "frames"
    )


def test_video_limits(mp4_av: bytes) -> None:
    expect_error(
        lambda: decode_video(mp4_av, MediaLimits(max_video_seconds=2.0)), 413, "3.0 s", "2 s"
    )
    expect_error(lambda: decode_video(mp4_av, MediaLimits(max_video_side=32)), 413, "64x48")
    expect_error(lambda: decode_video(mp4_av, MediaLimits(max_bytes=100)), 413, "bytes")


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"", 400),
        (np.random.default_rng(7).bytes(30000), 400),
        (b"\x1a\x45\xdf\xa3" + np.random.default_rng(8).bytes(3000), 400),
        (b"\x00\x00\x00\x18ftypisom" + np.random.default_rng(9).bytes(3000), 400),
    ],
)
def test_video_garbage(data: bytes, status: int) -> None:
    expect_error(lambda: decode_video(data), status)


def test_video_wrong_kinds(m4a: bytes, png: bytes) -> None:
    expect_error(lambda: decode_video(m4a), 400, "no video stream")
    expect_error(lambda: decode_video(png), 415, "image")


def test_audio_file_with_cover_art_is_not_a_video() -> None:
    need_encoder("libmp3lame")
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp3") as container:
        audio = container.add_stream("libmp3lame", rate=44100, layout="mono")
        cover = container.add_stream("mjpeg")
        cover.width, cover.height, cover.pix_fmt = 16, 16, "yuvj420p"
        try:
            cover.disposition = av.stream.Disposition.attached_pic
        except (AttributeError, TypeError):
            pytest.skip(f"PyAV {av.__version__} cannot write a stream disposition (18 can)")
        pic = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 200, np.uint8), format="rgb24")
        container.mux(cover.encode(pic.reformat(format="yuvj420p")))
        container.mux(cover.encode(None))
        mux_audio(container, audio, sine(440, 1.0, 44100)[None], 44100)
    data = buf.getvalue()
    assert abs(len(decode_audio(data)) - SAMPLE_RATE) <= 0.06 * SAMPLE_RATE
    expect_error(lambda: decode_video(data), 400, "no video stream")


def test_video_truncated(mp4_av: bytes) -> None:
    # PyAV writes the moov index last, so a cut file has no index at all.
    expect_error(lambda: decode_video(mp4_av[: len(mp4_av) // 2]), 400)


def test_video_bad_arguments(mp4_av: bytes) -> None:
    for kwargs in ({"fps": 0}, {"fps": float("nan")}, {"max_frames": 0}):
        expect_error(lambda kw=kwargs: decode_video(mp4_av, **kw), 400)


# --------------------------------------------------------------------------------------
# Robustness, sniffing, files
# --------------------------------------------------------------------------------------


def test_only_media_errors_escape_for_damaged_files(mp4_av: bytes, m4a: bytes) -> None:
    """Flip bytes and cut files at random: results are either decoded or MediaError."""
    rng = np.random.default_rng(1234)
    samples = [
        (decode_image, encode_image(solid(RED, (32, 32)), "PNG")),
        (decode_image, encode_image(solid(RED, (32, 32)), "JPEG")),
        (decode_image, encode_image(solid(RED, (32, 32)), "GIF")),
        (decode_audio, AUDIO_CASES["wav-8k"]()),
        (decode_audio, AUDIO_CASES["ogg-vorbis"]()),
        (decode_audio, m4a),
        (decode_video, mp4_av),
        (decode_video, VIDEO_CASES["webm-vp8"]()),
    ]
    for decode, data in samples:
        for i in range(12):
            damaged = bytearray(data)
            if i % 3 == 0:
                damaged = damaged[: int(rng.integers(1, len(data)))]
            else:
                for pos in rng.integers(0, len(data), size=8):
                    damaged[pos] = int(rng.integers(0, 256))
            try:
                decode(bytes(damaged))
            except MediaError as err:
                assert err.status in (400, 413, 415)


def test_thread_safety(mp4_av: bytes) -> None:
    wav = AUDIO_CASES["wav-44k-stereo"]()
    img = encode_image(solid(GREEN, (50, 40)), "WEBP", lossless=True)
    jobs = [(decode_audio, wav), (decode_image, img), (decode_video, mp4_av)] * 6
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda job: job[0](job[1]), jobs))
    for i in range(0, len(jobs), 3):
        np.testing.assert_array_equal(results[i], results[0])
        assert results[i + 1].tobytes() == results[1].tobytes()
        assert results[i + 2].timestamps == results[2].timestamps


def test_sniff_kind(mp4_av: bytes, m4a: bytes, png: bytes) -> None:
    assert sniff_kind(png) == "image"
    assert sniff_kind(encode_image(solid(RED), "JPEG")) == "image"
    assert sniff_kind(encode_image(solid(RED), "WEBP")) == "image"
    assert sniff_kind(encode_image(solid(RED), "GIF")) == "image"
    assert sniff_kind(encode_image(solid(RED), "BMP")) == "image"
    assert sniff_kind(b"<svg xmlns='http://www.w3.org/2000/svg'></svg>") == "image"
    assert sniff_kind(mp4_av) == "video"
    assert sniff_kind(m4a) == "audio"
    assert sniff_kind(AUDIO_CASES["wav-8k"]()) == "audio"
    assert sniff_kind(AUDIO_CASES["flac-48k"]()) == "audio"
    assert sniff_kind(AUDIO_CASES["mp3"]()) == "audio"
    assert sniff_kind(AUDIO_CASES["adts-aac"]()) == "audio"
    assert sniff_kind(encode_av_audio("webm", "libopus", sine(440, 0.2, 48000)[None], 48000)) == (
        "audio"
    )
    assert sniff_kind(VIDEO_CASES["avi-mpeg4"]()) == "video"
    assert sniff_kind(b"") is None
    assert sniff_kind(b"hello world") is None
    assert sniff_kind(np.random.default_rng(0).bytes(1000)) is None


def test_load_media_file(tmp_path, png: bytes, mp4_av: bytes) -> None:
    (tmp_path / "a.png").write_bytes(png)
    (tmp_path / "v.mp4").write_bytes(mp4_av)
    assert load_media_file(tmp_path / "a.png", "image").size == (40, 30)
    assert isinstance(load_media_file(str(tmp_path / "a.png"), "auto"), Image.Image)
    video = load_media_file(tmp_path / "v.mp4", "video", fps=2.0, max_frames=3)
    assert len(video.frames) == 3
    assert len(load_media_file(tmp_path / "v.mp4", "audio")) > SAMPLE_RATE
    missing = tmp_path / "nope.wav"
    expect_error(lambda: load_media_file(missing, "audio"), 400, str(missing))
    expect_error(lambda: load_media_file(tmp_path, "image"), 400, str(tmp_path))
    expect_error(lambda: load_media_file(tmp_path / "a.png", "audio"), 415, "a.png")
    expect_error(
        lambda: load_media_file(tmp_path / "v.mp4", "video", MediaLimits(max_bytes=100)), 413
    )
    expect_error(lambda: load_media_file(tmp_path / "a.png", "text"), 400, "kind")


def test_media_error_pickles_with_status() -> None:
    err = pickle.loads(pickle.dumps(MediaError("too big", 413)))
    assert (err.message, err.status, str(err)) == ("too big", 413, "too big")
    assert MediaError("x").status == 400


def test_absurd_sample_rate_in_header_is_refused_before_any_sample_is_read(monkeypatch):
    """A 1 s WAV whose header claims ~923 MHz must not be resampled (seconds, hundreds of MB)."""
    import xllm.model.media.audio as audio
    from tests.media import make_wav

    class NoSampleSink:  # the sink every decoded sample goes through: it must never be made
        def __init__(self, *args, **kwargs) -> None:
            raise AssertionError("samples were read from a file refused by its header")

    monkeypatch.setattr(audio, "AudioSink", NoSampleSink)
    wav = bytearray(make_wav(1.0))
    wav[24:28] = struct.pack("<I", 922_762_880)  # the fmt chunk's sample rate
    with pytest.raises(MediaError) as info:
        decode_audio(bytes(wav))
    assert info.value.status == 400 and "Hz" in info.value.message
