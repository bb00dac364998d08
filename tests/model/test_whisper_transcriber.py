"""speech_states="decoder": Whisper's frozen decoder transcribes each window greedily and the
speech interface reads its states, one per written token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.model.test_encoder_options import encode
from xllm.model.checkpoint import load_model
from xllm.model.config import ModelConfigError, XLLMConfig, resolve
from xllm.model.encoders.speech import SpeechEncoder, repeated_tail
from xllm.model.tiny import init_tiny, save_tiny_whisper


@pytest.fixture(scope="module")
def whole_whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny whole Whisper (encoder and decoder, random weights) with its feature extractor."""
    out = tmp_path_factory.mktemp("whisper")
    torch.manual_seed(0)
    save_tiny_whisper(out, decoder=True)
    return out


def test_a_loop_is_cut_where_it_starts() -> None:
    assert repeated_tail([5, 6, 7, 8, 6, 7, 8]) == 4  # "6 7 8" written twice
    assert repeated_tail([5, 9, 9, 9, 9]) == 2  # one token four times
    assert repeated_tail([5, 9, 9, 9]) is None  # three times: "no, no, no" is speech
    assert repeated_tail([1, 2, 3, 4, 5]) is None
    assert repeated_tail([]) is None


@pytest.mark.parametrize("window", ["full", "trimmed"])
def test_states_are_the_decoders_own_greedy_transcription(
    whole_whisper_dir: Path, media, window: str
) -> None:
    """Each state is the decoder's last hidden state where it wrote a token: run again without a
    cache over the prompt and the written tokens, the decoder gives the same states, and each
    state's read-out through Whisper's output layer is the token written next."""
    speech = SpeechEncoder.from_pretrained(whole_whisper_dir, window=window, states="decoder")
    transcriber = speech.transcriber
    assert transcriber is not None
    clip = media.waveform(1.3, seed=4)
    (states,) = encode(speech, [clip])
    assert states.ndim == 2 and states.shape[1] == speech.hidden_size and len(states) >= 1

    features, frames = speech.features(clip)
    with torch.no_grad():
        lengths = speech._window_lengths([features.shape[0]], [frames], 50)
        (encoded,) = speech._run_windows(features, lengths)
        table = transcriber.decoder.embed_tokens.weight
        written = (states @ table.T).argmax(-1).tolist()
        sequence = torch.tensor([transcriber.prompt.tolist() + written])
        hidden = transcriber.decoder(
            input_ids=sequence, encoder_hidden_states=encoded[None]
        ).last_hidden_state[0]
    start = len(transcriber.prompt) - 1  # the prompt's last position writes the first token
    torch.testing.assert_close(hidden[start : start + len(states)], states, atol=1e-5, rtol=1e-5)
    assert repeated_tail(written[:-1]) is None  # nothing before the end was a loop


def test_a_long_clip_is_transcribed_window_by_window_and_batching_changes_nothing(
    whole_whisper_dir: Path, media
) -> None:
    speech = SpeechEncoder.from_pretrained(whole_whisper_dir, window="trimmed", states="decoder")
    short, long = media.waveform(0.7, seed=2), media.waveform(11.5, seed=3)  # long: 3 windows
    together = encode(speech, [short, long])
    alone = [encode(speech, [clip])[0] for clip in (short, long)]
    for a, b in zip(together, alone, strict=True):
        torch.testing.assert_close(a, b)
    features, frames = speech.features(long)
    with torch.no_grad():
        lengths = speech._window_lengths([features.shape[0]], [frames], 50)
        windows = speech._run_windows(features, lengths)
        per_window = [speech.transcriber.transcribe([h])[0] for h in windows]
    assert len(per_window) == 3
    torch.testing.assert_close(together[1], torch.cat(per_window))


def test_windows_of_one_length_decode_together_as_they_would_alone(
    whole_whisper_dir: Path,
) -> None:
    """Windows of one length are one batch of greedy decoding: each gets the tokens and states
    it gets alone, wherever it stops (rows that end early are carried along, unused). Encoder
    frames of large random values make the tiny random decoder write varied transcriptions."""
    speech = SpeechEncoder.from_pretrained(whole_whisper_dir, window="trimmed", states="decoder")
    transcriber = speech.transcriber
    assert transcriber is not None
    generator = torch.Generator().manual_seed(0)
    frames = 100 * torch.randn(6, 100, speech.hidden_size, generator=generator)  # 6 windows, 2 s
    together = transcriber(frames)
    table = transcriber.decoder.embed_tokens.weight
    for row, states in zip(frames, together, strict=True):
        (alone,) = transcriber(row[None])
        assert (states @ table.T).argmax(-1).tolist() == (alone @ table.T).argmax(-1).tolist()
        torch.testing.assert_close(states, alone, atol=1e-4, rtol=1e-4)
    assert len({len(states) for states in together}) > 1  # the rows stopped at different steps
    windows = [frames[0], frames[1, :50], frames[2]]  # two lengths: two batches, order kept
    for states, window in zip(transcriber.transcribe(windows), windows, strict=True):
        torch.testing.assert_close(states, transcriber(window[None])[0], atol=1e-4, rtol=1e-4)


def test_decoder_states_need_a_whole_whisper(tiny_model_dir: Path) -> None:
    config = XLLMConfig.load(tiny_model_dir)
    encoder_only = resolve(tiny_model_dir, config.speech, "speech")
    with pytest.raises(ModelConfigError, match="whole Whisper checkpoint"):
        SpeechEncoder.from_pretrained(encoder_only, states="decoder")


def test_a_model_with_decoder_states_reads_one_token_per_written_token(
    tmp_path: Path, media
) -> None:
    """xllm.json's speech_states="decoder" loads the decoder, and a frame-stacking interface of
    one state per token gives the LLM exactly one embedding per written token."""
    model = load_model(init_tiny(tmp_path / "model", speech_states="decoder"), device="cpu")
    assert model.speech is not None and model.speech.transcriber is not None
    item = model.prepare("audio", media.waveform(2.2, seed=5))
    with torch.inference_mode():
        (states,) = model.speech_frames([item])
        ((kind, tokens),) = model.encode([item])[0]
    assert kind == "audio"
    assert tokens.shape == (len(states), model.llm.config.hidden_size)
