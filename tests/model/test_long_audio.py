"""Audio longer than Whisper's window is encoded window by window, never truncated."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

from xllm.model.config import ModelConfigError
from xllm.model.encoders.speech import SpeechEncoder

RATE = 16_000


def encode(speech: SpeechEncoder, waveform: np.ndarray) -> tuple[torch.Tensor, int]:
    features, frames = speech.features(waveform)
    with torch.no_grad():
        hidden = speech(features)
    (joined,) = speech.join_windows(hidden, [features.shape[0]], [frames])
    return joined, features.shape[0]


def test_tiny_whisper_windows(tiny_model, media) -> None:
    speech = tiny_model.speech
    assert speech.features.window_samples == 5 * RATE and speech.features.samples_per_frame == 320
    audio = media.waveform(12.0, seed=4)
    frames, windows = encode(speech, audio)
    assert windows == 3
    assert frames.shape == (math.ceil(len(audio) / 320), speech.hidden_size) == (600, 32)
    # Each window's frames are those of encoding that window on its own.
    window = speech.features.window_samples
    for w in range(3):
        alone, n = encode(speech, audio[w * window : (w + 1) * window])
        assert n == 1
        keep = min(250, 600 - 250 * w)
        torch.testing.assert_close(frames[250 * w : 250 * w + keep], alone[:keep])
    # Sound in the last window reaches the output: the tail is not cut.
    silent_tail = audio.copy()
    silent_tail[11 * RATE :] = 0
    changed, _ = encode(speech, silent_tail)
    assert (changed[550:] - frames[550:]).abs().max() > 1e-3
    torch.testing.assert_close(changed[:500], frames[:500])


@pytest.mark.parametrize(
    ("seconds", "windows", "frames"),
    [(0.01, 1, 1), (4.99, 1, 250), (5.0, 1, 250), (5.01, 2, 251), (10.0, 2, 500)],
)
def test_window_and_frame_counts(tiny_model, seconds: float, windows: int, frames: int) -> None:
    audio = np.zeros(round(seconds * RATE), np.float32)
    features, keep = tiny_model.speech.features(audio)
    assert features.shape == (windows, 80, 500)
    assert keep == frames == math.ceil(len(audio) / 320)


def test_long_audio_through_the_model(tiny_model, media) -> None:
    """The speech interface sees all the frames: 12 s of audio gives more tokens than 5 s."""
    short = tiny_model.prepare("audio", media.waveform(5.0, seed=1))
    long = tiny_model.prepare("audio", media.waveform(12.0, seed=1))
    assert long.audio_features.shape[0] == 3 and long.audio_frames == 600
    with torch.inference_mode():
        encoded = tiny_model.encode([short, long])
        frames = tiny_model.speech.join_windows(
            tiny_model.speech(torch.cat([short.audio_features, long.audio_features])),
            [1, 3],
            [short.audio_frames, long.audio_frames],
        )
        alpha = tiny_model.speech_interface.firing_weights(frames[1])
    assert [f.shape[0] for f in frames] == [250, 600]
    assert encoded[1][0][1].shape[0] == max(1, round(alpha.sum().item()))
    assert encoded[1][0][1].shape[0] > encoded[0][0][1].shape[0]


@pytest.fixture(scope="module")
def whisper_30s_dir(tmp_path_factory) -> Path:
    """A full Whisper checkpoint with real 30 s windows (1500 positions) at toy width."""
    torch.manual_seed(0)
    config = WhisperConfig(
        d_model=16,
        encoder_layers=1,
        encoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=32,
        num_mel_bins=80,
        max_source_positions=1500,
        max_target_positions=16,
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        decoder_start_token_id=1,
    )
    path = tmp_path_factory.mktemp("whisper30")
    WhisperForConditionalGeneration(config).save_pretrained(path)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(path)  # chunk_length 30 s
    return path


def test_real_30s_windows(whisper_30s_dir: Path, media) -> None:
    speech = SpeechEncoder.from_pretrained(whisper_30s_dir)
    assert speech.features.window_samples == 30 * RATE
    audio = media.waveform(65.0, seed=5)
    frames, windows = encode(speech, audio)
    assert windows == 3
    assert frames.shape == (math.ceil(len(audio) / 320), 16) == (3250, 16)
    # The third window holds the last 5 s: its frames are that window encoded alone.
    tail, _ = encode(speech, audio[60 * RATE :])
    torch.testing.assert_close(frames[3000:], tail)


def test_mismatched_feature_extractor_is_refused(whisper_30s_dir: Path, tmp_path: Path) -> None:
    import shutil

    bad = Path(shutil.copytree(whisper_30s_dir, tmp_path / "bad"))
    WhisperFeatureExtractor(feature_size=80, chunk_length=5).save_pretrained(bad)
    with pytest.raises(ModelConfigError, match="do not match"):
        SpeechEncoder.from_pretrained(bad)
