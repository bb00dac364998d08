"""Long audio -> utterance segments (`split_speech`): one segment per utterance, cut at pauses,
never longer than the encoder window, nothing for silence."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from tests.media import SAMPLE_RATE, speak, speech_with_pauses
from xllm.model.media.segments import FRAME_S, split_speech

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a red circle and a green square",
    "large language models can hear speech",
    "the shape moves to the left",
]


def spans(segments) -> list[tuple[float, float]]:
    return [(s.start_seconds, s.end_seconds) for s in segments]


@pytest.mark.parametrize("noise", [0.0, 0.003])
def test_one_segment_per_utterance_each_holding_its_sound(noise: float) -> None:
    samples, sounds = speech_with_pauses(SENTENCES, pause_s=1.0)
    samples = samples + noise * np.random.default_rng(0).standard_normal(samples.size)
    segments = spans(split_speech(samples.astype(np.float32)))
    assert len(segments) == len(sounds)
    # each starts where its sound starts (to within a frame: the first samples are faint)
    for (start, end), (sound_start, sound_end) in zip(segments, sounds, strict=True):
        assert abs(start - sound_start) <= FRAME_S and sound_end <= end
    assert all(a[1] <= b[0] for a, b in pairwise(segments))  # in order, apart


def test_speech_without_pauses_is_cut_within_the_limit() -> None:
    voice = speak(" ".join(SENTENCES))
    samples = np.concatenate([voice, voice])  # ~10 s of speech, no pause of 0.4 s
    segments = split_speech(samples, max_seconds=3.0)
    assert len(segments) >= 3
    assert all(s.end - s.start <= 3.0 * SAMPLE_RATE for s in segments)
    for before, after in pairwise(segments):
        assert after.start >= before.end  # in order, no overlap


def test_one_utterance_that_fits_is_the_whole_recording() -> None:
    samples, _ = speech_with_pauses(SENTENCES[:1], pause_s=1.0)
    assert spans(split_speech(samples)) == [(0.0, samples.size / SAMPLE_RATE)]
    assert len(split_speech(samples, max_seconds=1.0)) > 1  # longer than a segment may be


def test_silence_has_no_segments_and_a_tone_is_speech() -> None:
    assert split_speech(np.zeros(5 * SAMPLE_RATE, np.float32)) == []
    t = np.arange(70 * SAMPLE_RATE) / SAMPLE_RATE
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    segments = split_speech(tone, max_seconds=30.0)
    assert segments[0].start == 0 and segments[-1].end == tone.size
    assert all(a.end == b.start for a, b in pairwise(segments))
    assert max(s.end - s.start for s in segments) <= 30 * SAMPLE_RATE
