"""transcript_prior_top_k: a decoder-state interface starts from the LLM's own embeddings of
what Whisper wrote, and trains only a correction."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from xllm.model.checkpoint import load_model, save_interfaces
from xllm.model.config import CONFIG_NAME, INTERFACES_NAME, ModelConfigError, XLLMConfig
from xllm.model.tiny import init_tiny
from xllm.model.x2l.transcript_prior import WhisperPieces
from xllm.model.xllm import XLLM, speech_pieces


def with_prior(model_dir: Path, top_k: int) -> Path:
    """The decoder-state tiny model with a transcript prior and no trained interfaces yet."""
    raw = json.loads((model_dir / CONFIG_NAME).read_text())
    raw["speech_interface"]["transcript_prior_top_k"] = top_k
    (model_dir / CONFIG_NAME).write_text(json.dumps(raw))
    (model_dir / INTERFACES_NAME).unlink()
    return model_dir


@pytest.fixture(scope="module")
def decoder_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_tiny(tmp_path_factory.mktemp("decoder-model"), speech_states="decoder")


def fresh(decoder_model_dir: Path, tmp_path: Path, top_k: int) -> XLLM:
    model_dir = shutil.copytree(decoder_model_dir, tmp_path / "model")
    return load_model(with_prior(model_dir, top_k), device="cpu", require_interfaces=False)


def clip_states(model: XLLM, media) -> torch.Tensor:
    item = model.prepare("audio", media.waveform(2.2, seed=5))
    (states,) = model.speech_frames([item])
    return states  # (N, D): one per written token


def clip_tokens(
    model: XLLM, media
) -> tuple[torch.Tensor, torch.Tensor, WhisperPieces, torch.Tensor]:
    """A clip's decoder states (N, D), the model's tokens for them (N, H), the piece map and the
    LLM's embedding table: what the expected tokens are computed from."""
    assert model.speech is not None
    states = clip_states(model, media)
    (tokens,) = model.speech_tokens([states])
    pieces = speech_pieces(model.speech, model.tokenizer)
    return states, tokens, pieces, model.llm.get_input_embeddings().weight.float()


def test_whisper_pieces_map_each_text_token_to_the_llms_tokens_of_its_text(
    decoder_model_dir: Path,
) -> None:
    model = load_model(decoder_model_dir, device="cpu")
    assert model.speech is not None and model.speech.transcriber is not None
    whisper = model.speech.transcriber.tokenizer
    pieces = speech_pieces(model.speech, model.tokenizer)
    end = model.speech.transcriber.end_of_text
    for token in range(end):
        text = whisper.decode([token])
        assert pieces[token] == model.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any(len(pieces[t]) > 1 for t in range(end))  # the LLM splits some of Whisper's words
    assert pieces[end] == [] and pieces[end + 1] == []  # special tokens write no text


def test_untrained_each_token_is_the_llms_embedding_of_the_piece_whisper_wrote(
    decoder_model_dir: Path, tmp_path: Path, media
) -> None:
    """top_k 1 and the correction at its start (zero): the LLM reads exactly its own embedding
    of each written piece (the mean of its tokens' embeddings where it splits the piece)."""
    model = fresh(decoder_model_dir, tmp_path, top_k=1)
    assert model.speech is not None and model.speech.transcriber is not None
    states, tokens, pieces, table = clip_tokens(model, media)
    written = model.speech.transcriber.written(states)
    want = torch.stack([table[pieces[t]].mean(0) for t in written])
    assert tokens.shape == want.shape
    torch.testing.assert_close(tokens.float(), want)


def test_top_k_blends_whispers_candidates_by_their_probabilities(
    decoder_model_dir: Path, tmp_path: Path, media
) -> None:
    model = fresh(decoder_model_dir, tmp_path, top_k=3)
    assert model.speech is not None and model.speech.transcriber is not None
    states, tokens, pieces, table = clip_tokens(model, media)
    head = model.speech.transcriber.decoder.embed_tokens.weight
    logits = states @ head[: model.speech.transcriber.end_of_text].T
    for token, row in zip(tokens, logits, strict=True):
        top = row.topk(3)
        candidates = [table[pieces[v]].mean(0) for v in top.indices.tolist()]
        want = sum(p * e for p, e in zip(top.values.softmax(-1), candidates, strict=True))
        torch.testing.assert_close(token.float(), want)
    one = fresh(decoder_model_dir, tmp_path / "k1", top_k=1)
    (first,) = one.speech_tokens([states])
    assert not torch.allclose(first, tokens)  # the blend is not the top piece alone


def test_the_correction_trains_and_the_prior_is_never_stored(
    decoder_model_dir: Path, tmp_path: Path, media
) -> None:
    model = fresh(decoder_model_dir, tmp_path, top_k=2)
    assert all("pieces" not in key for key in model.interface_state_dict())
    states = clip_states(model, media)
    (before,) = model.speech_tokens([states])
    assert model.speech_interface is not None
    with torch.no_grad():  # what training does to the correction's last layer
        model.speech_interface.mlp[-1].bias.fill_(0.25)
    save_interfaces(model, tmp_path / "model")
    loaded = load_model(tmp_path / "model", device="cpu")
    (after,) = loaded.speech_tokens([states])
    torch.testing.assert_close(after, before + 0.25)


@pytest.mark.parametrize(
    "interface",
    [
        {"type": "frame_stack", "stack_frames": 1, "speech_states": "encoder"},
        {"type": "frame_stack", "stack_frames": 5, "speech_states": "decoder"},
        {"type": "cformer", "speech_states": "decoder"},
    ],
)
def test_a_prior_needs_one_token_per_decoder_state(interface: dict) -> None:
    raw = {"llm": {"path": "llm"}, "speech_interface": {**interface, "transcript_prior_top_k": 3}}
    with pytest.raises(ModelConfigError, match="transcript_prior_top_k"):
        XLLMConfig.from_dict(raw)


def with_quote(decoder_model_dir: Path, tmp_path: Path, quote: list[str]) -> XLLM:
    model_dir = with_prior(shutil.copytree(decoder_model_dir, tmp_path / "quoted"), 1)
    raw = json.loads((model_dir / CONFIG_NAME).read_text())
    raw["speech_interface"]["quote"] = quote
    (model_dir / CONFIG_NAME).write_text(json.dumps(raw))
    return load_model(model_dir, device="cpu", require_interfaces=False)


def test_quote_tokens_enclose_every_clip_starting_as_the_llms_embeddings_of_the_texts(
    decoder_model_dir: Path, tmp_path: Path, media
) -> None:
    model = with_quote(decoder_model_dir, tmp_path, ['Speech: "', '"'])
    table = model.llm.get_input_embeddings().weight.float()
    opening = model.tokenizer('Speech: "', add_special_tokens=False)["input_ids"]
    closing = model.tokenizer('"', add_special_tokens=False)["input_ids"]
    clips = [media.waveform(2.2, seed=5), media.waveform(1.4, seed=6)]
    items = [model.prepare("audio", clip) for clip in clips]
    pieces = model.speech_tokens(model.speech_frames(items))  # one token per written piece
    encoded = model.encode(items)
    for (kind, tokens), inner in zip((e[0] for e in encoded), pieces, strict=True):
        assert kind == "audio"
        assert tokens.shape[0] == len(opening) + inner.shape[0] + len(closing)
        torch.testing.assert_close(tokens[: len(opening)].float(), table[opening])
        torch.testing.assert_close(tokens[len(opening) : -len(closing)], inner)
        torch.testing.assert_close(tokens[-len(closing) :].float(), table[closing])


def test_quote_tokens_train_and_are_stored_with_the_interface(
    decoder_model_dir: Path, tmp_path: Path, media
) -> None:
    model = with_quote(decoder_model_dir, tmp_path, ["<<", ">>"])
    interface = model.speech_interface
    assert interface is not None and interface.opening is not None
    assert {"speech_interface.opening", "speech_interface.closing"} <= set(
        model.interface_state_dict()
    )
    interface.requires_grad_(True)  # as `xllm train` marks the speech interface trainable
    item = model.prepare("audio", media.waveform(2.2, seed=5))
    ((_, tokens),) = model.encode([item])[0]
    tokens.float().pow(2).sum().backward()  # gradients reach the quote tokens
    assert interface.opening.grad is not None and interface.opening.grad.abs().sum() > 0
    with torch.no_grad():
        interface.opening.add_(1.0)
    save_interfaces(model, tmp_path / "quoted")
    loaded = load_model(tmp_path / "quoted", device="cpu")
    assert loaded.speech_interface is not None and loaded.speech_interface.opening is not None
    torch.testing.assert_close(loaded.speech_interface.opening, interface.opening.detach())


@pytest.mark.parametrize("quote", [['"'], ["", '"'], ['"', '"', '"']])
def test_a_quote_is_two_non_empty_texts(quote: list[str]) -> None:
    raw = {"llm": {"path": "llm"}, "speech_interface": {"type": "frame_stack", "quote": quote}}
    with pytest.raises(ModelConfigError, match="quote"):
        XLLMConfig.from_dict(raw)
