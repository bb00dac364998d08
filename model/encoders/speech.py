"""Frozen speech encoder: Whisper's encoder, applied window by window so long audio is never cut."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperModel,
    WhisperTokenizerFast,
)
from transformers.models.whisper.modeling_whisper import WhisperDecoder, WhisperEncoder

from xllm.model.config import ModelConfigError
from xllm.model.encoders.vision import read_model_type

# Whisper: 100 mel frames per second; two convs (the second with stride 2) give 50 frames/s.
MEL_FRAMES_PER_ENCODER_FRAME = 2
ENCODER_FRAMES_PER_SECOND = 50
# Silence kept after the speech when the decoder transcribes a trimmed window: cut at the last
# word, Whisper's decoder does not see the audio end and repeats the sentence.
DECODER_CONTEXT_FRAMES = ENCODER_FRAMES_PER_SECOND
# The decoder writes at most this many tokens per second of audio (English speech: ~3-4).
MAX_TOKENS_PER_SECOND = 5


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


def repeated_tail(tokens: list[int]) -> int | None:
    """Where a greedy transcription's loop starts, or None: the length to cut `tokens` to.

    A loop is a span of 3+ tokens written twice in a row at the end, or a span of 1-2 tokens
    written four times (short repeats such as "no, no" are real speech).
    """
    n = len(tokens)
    for span in range(1, n // 2 + 1):
        copies = 2 if span >= 3 else 4
        if span * copies > n:
            continue
        tail = tokens[n - span :]
        if all(tokens[n - (c + 1) * span : n - c * span] == tail for c in range(1, copies)):
            return n - (copies - 1) * span
    return None


def equal_length_groups(lengths: Sequence[int]) -> list[list[int]]:
    """Indices of windows grouped by length: each group is one batch, so a window's result
    never depends on what else is batched (no padding, no masks)."""
    return [[i for i, n in enumerate(lengths) if n == length] for length in sorted(set(lengths))]


class WhisperTranscriber(nn.Module):
    """Whisper's frozen decoder, greedy, as a token-level speech module.

    Encoder frames of a window (T, D) -> the decoder's last hidden states (N, D) at the N
    positions that wrote the N tokens of its English transcription (at least one: an empty
    transcription keeps the state that wrote end-of-text). Each state is what Whisper's own
    output layer reads a written token from, so the speech interface gets one vector per word
    piece, as the C-Former of X-LLM (taken from a pretrained ASR model) gives the LLM.
    """

    def __init__(
        self,
        decoder: WhisperDecoder,
        prompt: list[int],
        end_of_text: int,
        tokenizer: WhisperTokenizerFast | None = None,
    ) -> None:
        super().__init__()
        self.decoder = decoder
        self.register_buffer("prompt", torch.tensor(prompt), persistent=False)
        self.end_of_text = end_of_text
        self.tokenizer = tokenizer  # what the written tokens say (speech stage 1's targets)

    def written(self, states: torch.Tensor) -> list[int]:
        """The token each state (N, D) wrote: Whisper's output layer, tied to its embeddings."""
        return (states @ self.decoder.embed_tokens.weight.T).argmax(-1).tolist()

    @classmethod
    def from_model(
        cls,
        model: WhisperForConditionalGeneration,
        generation: GenerationConfig | None,
        tokenizer: WhisperTokenizerFast | None = None,
    ) -> WhisperTranscriber:
        """The prompt Whisper's `generate` writes for English transcription without timestamps."""
        config = model.config
        prompt = [config.decoder_start_token_id]
        if generation is not None and getattr(generation, "is_multilingual", False):
            prompt += [generation.lang_to_id["<|en|>"], generation.task_to_id["transcribe"]]
        no_timestamps = getattr(generation, "no_timestamps_token_id", None)
        if no_timestamps is not None:
            prompt.append(no_timestamps)
        return cls(model.model.decoder, prompt, config.eos_token_id, tokenizer)

    def transcribe(self, windows: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Windows [(T_w, D)] -> their states [(N_w, D)]; windows of one length decode together
        (a row's states do not depend on the others': tests/model/test_whisper_transcriber.py)."""
        states: dict[int, torch.Tensor] = {}
        for chosen in equal_length_groups([w.shape[0] for w in windows]):
            batch = torch.stack([windows[i] for i in chosen])
            states.update(zip(chosen, self(batch), strict=True))
        return [states[i] for i in range(len(windows))]

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> list[torch.Tensor]:
        """frames (B, T, D) of B windows of one length -> per window (N_b, D) states, N_b >= 1.

        Greedy, one decoder step for all B rows at a time; a row that has ended (end-of-text, a
        loop cut, the limit) keeps being fed end-of-text until every row has, its outputs unused.
        """
        rows, length = frames.shape[0], frames.shape[1]
        seconds = length / ENCODER_FRAMES_PER_SECOND
        limit = min(
            int(8 + MAX_TOKENS_PER_SECOND * seconds),
            self.decoder.config.max_target_positions - len(self.prompt),
        )
        inputs, cache = self.prompt[None].expand(rows, -1), None
        written: list[list[int]] = [[] for _ in range(rows)]
        states: list[list[torch.Tensor]] = [[] for _ in range(rows)]
        running = set(range(rows))
        for _ in range(limit):
            out = self.decoder(
                input_ids=inputs, encoder_hidden_states=frames, cache=cache, use_cache=True
            )
            cache = out.cache
            last = out.last_hidden_state[:, -1]  # (B, D)
            tokens = self.written(last)
            for row in sorted(running):
                states[row].append(last[row])
                if tokens[row] == self.end_of_text:
                    running.discard(row)
                    continue
                written[row].append(tokens[row])
                loop = repeated_tail(written[row])
                if loop is not None:
                    del written[row][loop:], states[row][loop:]
                    running.discard(row)
            if not running:
                break
            fed = [t if r in running else self.end_of_text for r, t in enumerate(tokens)]
            inputs = torch.tensor(fed, device=frames.device)[:, None]
        return [torch.stack(s[: max(1, len(w))]) for s, w in zip(states, written, strict=True)]


class SpeechEncoder(nn.Module):
    """Log-mel windows (W, n_mels, window_frames) -> encoder frames at 50 frames/s.

    `features` turns a 16 kHz waveform of any length into windows; `encode_clips` runs them and
    puts each clip's windows back together in time, so long audio is never cut.

    window="trimmed" runs a window only over its real audio, rounded up to whole seconds, instead
    of the padded 30 s: HF's `WhisperEncoder.forward` refuses shorter inputs, so `_run_trimmed`
    calls its modules with the first T absolute position embeddings (as whisper.cpp's
    `audio_ctx` does). The log-mel of the padded window is sliced, which equals the log-mel of
    the trimmed audio (Whisper normalises by the window's maximum, never reached by padding).

    With a `transcriber` (states="decoder"), a clip's output is instead the states of Whisper's
    decoder transcribing each window (`WhisperTranscriber`), one per written token, windows
    joined in time.
    """

    def __init__(
        self,
        model: WhisperEncoder,
        feature_extractor: WhisperFeatureExtractor,
        window: str = "full",
        transcriber: WhisperTranscriber | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.features = SpeechFeatures(feature_extractor)
        self.window = window
        self.transcriber = transcriber

    @property
    def hidden_size(self) -> int:
        return self.model.config.d_model

    @classmethod
    def from_pretrained(
        cls, path: Path, window: str = "full", states: str = "encoder"
    ) -> SpeechEncoder:
        """Load a saved `WhisperEncoder`, or the encoder of a full Whisper checkpoint; with
        states="decoder", a full checkpoint's decoder as well."""
        model_type = read_model_type(path)
        if model_type != "whisper":
            raise ModelConfigError(f"{path}: expected a Whisper checkpoint, found '{model_type}'")
        config = WhisperConfig.from_pretrained(path)
        architectures = config.architectures or []
        transcriber = None
        if states == "decoder":
            if "WhisperForConditionalGeneration" not in architectures:
                raise ModelConfigError(
                    f"{path}: 'speech_interface.speech_states' is 'decoder', which needs a whole "
                    f"Whisper checkpoint (WhisperForConditionalGeneration), not {architectures}"
                )
            whole = WhisperForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
            generation = (
                GenerationConfig.from_pretrained(path)
                if (path / "generation_config.json").is_file()
                else None
            )
            tokenizer = (
                WhisperTokenizerFast.from_pretrained(path)
                if (path / "tokenizer.json").is_file()
                else None
            )
            encoder = whole.model.get_encoder()
            transcriber = WhisperTranscriber.from_model(whole, generation, tokenizer)
            transcriber.eval().requires_grad_(False)
        elif any(a in ("WhisperForConditionalGeneration", "WhisperModel") for a in architectures):
            encoder = WhisperModel.from_pretrained(path, dtype=torch.float32).get_encoder()
        else:
            encoder = WhisperEncoder.from_pretrained(path, dtype=torch.float32)
        features = SpeechFeatures.from_pretrained(path, encoder.config)
        return cls(
            encoder.eval().requires_grad_(False), features.feature_extractor, window, transcriber
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (W, n_mels, window_frames) -> (W, P, d_model); W may mix several clips."""
        dtype = self.model.conv1.weight.dtype
        return self.model(input_features=features.to(dtype)).last_hidden_state

    def encode_clips(
        self, features: torch.Tensor, windows: list[int], frames: list[int]
    ) -> list[torch.Tensor]:
        """Windows of several clips (W, n_mels, window_frames) -> per clip (N_i, D).

        windows[i] windows and frames[i] real encoder frames belong to clip i. N_i is frames[i]
        (encoder frames), or with a transcriber the number of tokens its windows were written as.
        """
        context = 0 if self.transcriber is None else DECODER_CONTEXT_FRAMES
        hidden = self._run_windows(features, self._window_lengths(windows, frames, context))
        if self.transcriber is None:
            return self.join_windows(hidden, windows, frames)
        return self.join_windows(self.transcriber.transcribe(hidden), windows)

    def _window_lengths(self, windows: list[int], frames: list[int], context: int) -> list[int]:
        """Encoder frames each window runs over: a full window, or (trimmed) its real audio and
        `context` frames more, rounded up to whole seconds."""
        full = self.model.config.max_source_positions
        if self.window == "full":
            return [full] * sum(windows)
        lengths = []
        for count, keep in zip(windows, frames, strict=True):
            for w in range(count):
                real = min(full, keep - w * full + context)
                seconds = math.ceil(real / ENCODER_FRAMES_PER_SECOND)
                lengths.append(min(full, seconds * ENCODER_FRAMES_PER_SECOND))
        return lengths

    def _run_windows(self, features: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
        """features (W, n_mels, window_frames) -> per window (lengths[w], D)."""
        if self.window == "full":
            return list(self(features))
        hidden: dict[int, torch.Tensor] = {}
        for chosen in equal_length_groups(lengths):
            length = lengths[chosen[0]]
            mel = features[chosen, :, : length * MEL_FRAMES_PER_ENCODER_FRAME]
            hidden.update(zip(chosen, self._run_trimmed(mel), strict=True))
        return [hidden[i] for i in range(len(lengths))]

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
        hidden: Sequence[torch.Tensor] | torch.Tensor,
        windows: list[int],
        frames: list[int] | None = None,
    ) -> list[torch.Tensor]:
        """Per-window outputs ([(P_w, D)], or a batch (W, P, D)) back per clip, each clip's
        windows joined in time.

        windows[i] windows belong to clip i; with `frames`, clip i keeps its first frames[i]
        (its real audio; the last window's padding is dropped).
        """
        out, start = [], 0
        for i, count in enumerate(windows):
            clip = torch.cat(list(hidden[start : start + count]))
            out.append(clip if frames is None else clip[: frames[i]])
            start += count
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
