"""Audio: WAV / FLAC / OGG / MP3 / M4A bytes -> 1-D float32 mono at ``SAMPLE_RATE`` (16 kHz).

Audio is read in bounded blocks and its accumulated duration checked on every block, so nothing
is allocated on a header's word.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence

import av
import numpy as np
import soundfile as sf

from xllm.model.media.container import (
    AUDIO_DEMUXERS,
    PacketDecoder,
    check_demuxer,
    container_seconds,
    open_container,
    stream_seconds,
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


#: Sample rate (Hz) of every audio array this module returns.
SAMPLE_RATE = 16_000
#: Sample rates accepted from files (telephony 1 kHz up to studio 768 kHz).
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1_000, 768_000


# Per-block budget when reading audio with soundfile: ~4 MB of float32 whatever
# the channel count claimed by the header.
_AUDIO_BLOCK_SAMPLES = 1 << 20


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


class AudioSink:
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
        if self._seconds > self._max_seconds + DURATION_SLACK_S:
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


def decode_audio(data: bytes, limits: MediaLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode WAV / FLAC / OGG (Vorbis, Opus) / MP3 / M4A (AAC) to 16 kHz mono float32."""
    data = check_input(data, limits, "audio")
    with only_media_errors("audio"):
        samples = _decode_audio(data, limits.max_audio_seconds)
    if samples.size == 0:
        raise MediaError("audio has no samples", 400)
    return samples


def _decode_audio(data: bytes, max_seconds: float) -> np.ndarray:
    if has_image_signature(data):
        raise MediaError("expected audio but got image data", 415)
    if _looks_like_soundfile_input(data):
        try:
            samples = _decode_audio_soundfile(data, max_seconds)
        except MediaError:
            raise
        except Exception as exc:
            # Any libsndfile failure: let FFmpeg try.
            logger.debug("soundfile could not decode audio (%s); trying PyAV", describe(exc))
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
            check_duration(frames / rate, max_seconds, "audio")
        sink = AudioSink(max_seconds, "audio")
        # Block size comes from our budget, never from the header's frame count.
        block = max(256, _AUDIO_BLOCK_SAMPLES // channels)
        while True:
            chunk = f.read(block, dtype="float32", always_2d=True)
            if chunk.shape[0] == 0:
                break
            sink.add_mono(chunk.mean(axis=1, dtype=np.float32), rate)
        return sink.finish()


def _decode_audio_pyav(data: bytes, max_seconds: float) -> np.ndarray:
    with open_container(data, "audio") as container:
        if not container.streams.audio:
            raise MediaError("no audio stream found", 400)
        check_demuxer(container, AUDIO_DEMUXERS, "audio")
        stream = container.streams.audio[0]
        if stream.codec_context is None:
            raise MediaError("unsupported audio codec (no decoder available)", 415)
        duration = stream_seconds(stream) or container_seconds(container)
        if duration is not None:
            check_duration(duration, max_seconds, "audio")
        sink = AudioSink(max_seconds, "audio")
        decoder = PacketDecoder("audio")
        for packet in container.demux(stream):
            for frame in decoder.decode(packet):
                sink.add_frame(frame)
        samples = sink.finish()
    if samples.size == 0 and decoder.last_error:
        raise MediaError(f"could not decode audio: {decoder.last_error}", 400)
    return samples
