"""Frozen speech encoder: Whisper's encoder, applied window by window so long audio is never cut."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from xllm.model.config import ModelConfigError
from xllm.model.encoders.vision import read_model_type

# Whisper: 100 mel frames per second; two convs (the second with stride 2) give 50 frames/s.
MEL_FRAMES_PER_ENCODER_FRAME = 2
ENCODER_FRAMES_PER_SECOND = 50


class SpeechFeatures:
    """Waveform -> Whisper log-mel windows: the speech encoder's preprocessing, without weights.

    Whisper's encoder only takes fixed windows (30 s for real checkpoints: `max_source_positions`
    1500 frames). Longer audio is cut into consecutive windows; `frames` says how many encoder
    frames cover real audio, so the padding frames of the last window can be dropped later.
    """

    def __init__(self, feature_extractor: WhisperFeatureExtractor) -> None:
        self.feature_extractor = feature_extractor

    @property
    def window_samples(self) -> int:
        return self.feature_extractor.n_samples

    @property
    def samples_per_frame(self) -> int:
        return self.feature_extractor.hop_length * MEL_FRAMES_PER_ENCODER_FRAME

    @classmethod
    def from_pretrained(cls, path: Path, config: WhisperConfig | None = None) -> SpeechFeatures:
        """The feature extractor saved with a Whisper checkpoint, checked against its encoder."""
        config = config or WhisperConfig.from_pretrained(path)
        extractor = WhisperFeatureExtractor.from_pretrained(path)
        expected = config.max_source_positions * MEL_FRAMES_PER_ENCODER_FRAME
        if extractor.nb_max_frames != expected:
            raise ModelConfigError(
                f"{path}: feature extractor windows ({extractor.nb_max_frames} mel frames) do not "
                f"match the encoder ({expected})"
            )
        return cls(extractor)

    def __call__(self, waveform: np.ndarray) -> tuple[torch.Tensor, int]:
        """Waveform (S,) -> (log-mel windows (W, n_mels, window_frames), encoder frames to keep)."""
        window = self.window_samples
        n_windows = max(1, math.ceil(len(waveform) / window))
        chunks = [waveform[i * window : (i + 1) * window] for i in range(n_windows)]
        features = self.feature_extractor(
            chunks, sampling_rate=self.feature_extractor.sampling_rate, return_tensors="pt"
        )["input_features"]
        frames = max(1, math.ceil(len(waveform) / self.samples_per_frame))
        return features, frames


class SpeechEncoder(nn.Module):
    """Log-mel windows (W, n_mels, window_frames) -> encoder frames at 50 frames/s.

    `features` turns a 16 kHz waveform of any length into windows; `encode_clips` runs them and
    puts each clip's windows back together in time, so long audio is never cut.

    window="trimmed" runs a window only over its real audio, rounded up to whole seconds, instead
    of the padded 30 s: HF's `WhisperEncoder.forward` refuses shorter inputs, so `_run_trimmed`
    calls its modules with the first T absolute position embeddings (as whisper.cpp's
    `audio_ctx` does). The log-mel of the padded window is sliced, which equals the log-mel of
    the trimmed audio (Whisper normalises by the window's maximum, never reached by padding).
    """

    def __init__(
        self,
        model: WhisperEncoder,
        feature_extractor: WhisperFeatureExtractor,
        window: str = "full",
    ) -> None:
        super().__init__()
        self.model = model
        self.features = SpeechFeatures(feature_extractor)
        self.window = window

    @property
    def hidden_size(self) -> int:
        return self.model.config.d_model

    @classmethod
    def from_pretrained(cls, path: Path, window: str = "full") -> SpeechEncoder:
        """Load a saved `WhisperEncoder`, or the encoder of a full Whisper checkpoint."""
        model_type = read_model_type(path)
        if model_type != "whisper":
            raise ModelConfigError(f"{path}: expected a Whisper checkpoint, found '{model_type}'")
        config = WhisperConfig.from_pretrained(path)
        architectures = config.architectures or []
        if any(a in ("WhisperForConditionalGeneration", "WhisperModel") for a in architectures):
            encoder = WhisperModel.from_pretrained(path, dtype=torch.float32).get_encoder()
        else:
            encoder = WhisperEncoder.from_pretrained(path, dtype=torch.float32)
        features = SpeechFeatures.from_pretrained(path, encoder.config)
        return cls(encoder.eval().requires_grad_(False), features.feature_extractor, window)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (W, n_mels, window_frames) -> (W, P, d_model); W may mix several clips."""
        dtype = self.model.conv1.weight.dtype
        return self.model(input_features=features.to(dtype)).last_hidden_state

    def encode_clips(
        self, features: torch.Tensor, windows: list[int], frames: list[int]
    ) -> list[torch.Tensor]:
        """Windows of several clips (W, n_mels, window_frames) -> per clip (frames[i], D).

        windows[i] windows and frames[i] real encoder frames belong to clip i.
        """
        if self.window == "full":
            return self.join_windows(self(features), windows, frames)
        full = features.shape[-1] // MEL_FRAMES_PER_ENCODER_FRAME  # P, encoder frames a window
        # Encoder frames each window runs over: its real audio, rounded up to whole seconds.
        lengths = []
        for count, keep in zip(windows, frames, strict=True):
            for w in range(count):
                real = min(full, keep - w * full)
                seconds = math.ceil(real / ENCODER_FRAMES_PER_SECOND)
                lengths.append(min(full, seconds * ENCODER_FRAMES_PER_SECOND))
        hidden: list[torch.Tensor | None] = [None] * len(lengths)
        for length in sorted(set(lengths)):  # one batch per length: results never depend on
            chosen = [i for i, n in enumerate(lengths) if n == length]  # what else is batched
            mel = features[chosen, :, : length * MEL_FRAMES_PER_ENCODER_FRAME]
            for i, h in zip(chosen, self._run_trimmed(mel), strict=True):
                hidden[i] = h
        out, start = [], 0
        for count, keep in zip(windows, frames, strict=True):
            clip = torch.cat([h for h in hidden[start : start + count] if h is not None])
            out.append(clip[:keep])
            start += count
        return out

    def _run_trimmed(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (W, n_mels, 2T) -> (W, T, D): WhisperEncoder's forward for T <= its window."""
        m = self.model
        x = F.gelu(m.conv1(mel.to(m.conv1.weight.dtype)))
        x = F.gelu(m.conv2(x)).permute(0, 2, 1)  # (W, T, D)
        x = x + m.embed_positions.weight[: x.shape[1]]
        for layer in m.layers:
            x = layer(x, None)
            x = x[0] if isinstance(x, tuple) else x
        return m.layer_norm(x)

    @staticmethod
    def join_windows(
        hidden: torch.Tensor, windows: list[int], frames: list[int]
    ) -> list[torch.Tensor]:
        """Split a batch of windows (W, P, D) back per clip and join each clip's windows in time.

        windows[i] windows and frames[i] real frames belong to clip i; returns [(frames[i], D)].
        """
        out = []
        for chunk, keep in zip(hidden.split(windows), frames, strict=True):
            out.append(chunk.reshape(-1, chunk.shape[-1])[:keep])
        return out


def whisper_encoder_config(
    d_model: int, layers: int, heads: int, window_seconds: int, ffn_dim: int | None = None
) -> WhisperConfig:
    """A Whisper config for the encoder alone, with windows of `window_seconds` (50 frames/s)."""
    ffn_dim = ffn_dim or 4 * d_model
    return WhisperConfig(
        d_model=d_model,
        encoder_layers=layers,
        encoder_attention_heads=heads,
        encoder_ffn_dim=ffn_dim,
        decoder_layers=1,
        decoder_attention_heads=heads,
        decoder_ffn_dim=ffn_dim,
        num_mel_bins=80,
        max_source_positions=50 * window_seconds,
        # The decoder is never used; its token ids only have to lie inside its vocabulary.
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        decoder_start_token_id=1,
    )


def tiny_whisper_config(window_seconds: int = 5) -> WhisperConfig:
    return whisper_encoder_config(32, 2, 2, window_seconds, ffn_dim=64)
