"""Audio of any length -> utterance-sized segments, split at pauses by frame energy.

The speech interface was trained on single utterances of a few seconds, so a long recording is
transcribed piece by piece. Frames (20 ms) louder than a threshold between the recording's quiet
floor and its loud peak are speech; a run of quieter frames at least `min_silence` long is a
pause between utterances. A segment starts where its utterance's sound starts: from its first
loud frame back over the frames still audible above the floor (a soft onset), at most `pad`
seconds, to the first audible sample. It ends `pad` seconds after its last loud frame. (Training
clips start with their speech or a little silence; the toy-world model answered differently when a
clip starts even 10 ms earlier, so the onset is found to the sample.) A segment still longer
than `max_seconds` (speech without pauses) is cut at its quietest frame in the second half of
the allowed length, again and again. A recording with no contrast between quiet and loud (a
tone, constant noise) is one run of speech; one without any sound, none. A recording of one
utterance that fits `max_seconds` is one segment, the whole of it (as a chat request sends it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xllm.model.media.audio import SAMPLE_RATE

FRAME_S = 0.02
# Frames quieter than this (dBFS) are silence whatever the recording: digital zero, dither.
SILENCE_DB = -60.0
# Speech is louder than floor + this share of (peak - floor), in dB.
THRESHOLD_SHARE = 0.35
# Below this spread between the quiet floor and the peak the recording has no pauses to find.
MIN_CONTRAST_DB = 12.0
# Sound (an onset before the loud part) is this much above the floor, in dB.
AUDIBLE_DB = 6.0


@dataclass(frozen=True)
class AudioSegment:
    """Samples [start, end) of the recording, at SAMPLE_RATE."""

    start: int
    end: int

    @property
    def start_seconds(self) -> float:
        return self.start / SAMPLE_RATE

    @property
    def end_seconds(self) -> float:
        return self.end / SAMPLE_RATE


def frame_levels(samples: np.ndarray, frame: int) -> np.ndarray:
    """RMS level in dBFS of each whole frame of `frame` samples (the last, partial, included)."""
    count = -(-samples.size // frame)
    padded = np.zeros(count * frame, np.float32)
    padded[: samples.size] = samples
    rms = np.sqrt(np.mean(np.square(padded.reshape(count, frame), dtype=np.float64), axis=1))
    return 20 * np.log10(np.maximum(rms, 1e-10))


def split_speech(
    samples: np.ndarray,
    *,
    max_seconds: float = 30.0,
    min_silence: float = 0.4,
    pad: float = 0.3,
) -> list[AudioSegment]:
    """The utterance-sized segments of 16 kHz mono `samples`, in order and apart; [] when it is
    silent."""
    if max_seconds <= pad + FRAME_S:
        raise ValueError(f"max_seconds must exceed the padding ({pad:g} s)")
    frame = round(FRAME_S * SAMPLE_RATE)
    levels = frame_levels(samples, frame)
    if levels.size == 0 or levels.max() <= SILENCE_DB:
        return []
    floor, peak = np.percentile(levels, [10, 99])
    if peak - floor < MIN_CONTRAST_DB:
        loud = np.ones_like(levels, dtype=bool)
    else:
        loud = levels > max(SILENCE_DB, floor + THRESHOLD_SHARE * (peak - floor))
    audible = levels > floor + AUDIBLE_DB
    audible_amplitude = 10 ** ((floor + AUDIBLE_DB) / 20)
    pad_frames = round(pad / FRAME_S)
    max_frames = round(max_seconds / FRAME_S)
    runs = _speech_runs(loud, round(min_silence / FRAME_S))
    segments: list[AudioSegment] = []
    taken = 0  # frames before this belong to earlier segments
    for n, (first, last) in enumerate(runs):
        start = first
        while start > max(taken, first - pad_frames) and audible[start - 1]:
            start -= 1
        following = runs[n + 1][0] if n + 1 < len(runs) else levels.size
        end = min(following, last + pad_frames)
        taken = end
        for i, (a, b) in enumerate(_cut_long(levels, start, end, max_frames)):
            onset = a * frame
            if i == 0:  # to the first audible sample of the frame
                above = np.flatnonzero(np.abs(samples[onset : onset + frame]) > audible_amplitude)
                onset += int(above[0]) if above.size else 0
            segments.append(AudioSegment(onset, min(b * frame, samples.size)))
    if len(segments) == 1 and samples.size <= max_seconds * SAMPLE_RATE:
        return [AudioSegment(0, samples.size)]  # one utterance that fits: as recorded
    return segments


def _speech_runs(loud: np.ndarray, min_gap: int) -> list[tuple[int, int]]:
    """[first, last) frame ranges of speech, joined across quiet gaps shorter than min_gap."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], loud.astype(np.int8), [0]])))
    starts, ends = edges[0::2], edges[1::2]
    runs: list[tuple[int, int]] = []
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        if runs and start - runs[-1][1] < min_gap:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))
    return runs


def _cut_long(levels: np.ndarray, start: int, end: int, max_frames: int) -> list[tuple[int, int]]:
    """[start, end) in pieces of at most max_frames, each cut at the quietest frame of the
    second half of the piece it ends (the last such frame: pieces as long as they may be)."""
    pieces = []
    while end - start > max_frames:
        window = levels[start + max_frames // 2 : start + max_frames]
        cut = start + max_frames - 1 - int(np.argmin(window[::-1]))
        pieces.append((start, cut))
        start = cut
    pieces.append((start, end))
    return pieces
