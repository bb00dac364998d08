"""The one way in from raw media (`MediaPreparer.prepare_bytes` / `prepare_file`) and the one
model entry (`XLLM.prompt_embeddings`): each the same as its parts composed by hand."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import xllm.model.preprocess as preprocess
from tests.media import make_mp4, make_png, make_wav
from xllm.model.media import MediaError, MediaLimits, decode_audio, decode_image, decode_video
from xllm.model.prompt import PromptError, bind_media


def same(a: preprocess.PreparedMedia, b: preprocess.PreparedMedia) -> bool:
    tensors = ("pixels", "audio_features")
    return (a.kind, a.digest, a.audio_frames) == (b.kind, b.digest, b.audio_frames) and all(
        (getattr(a, t) is None and getattr(b, t) is None)
        or torch.equal(getattr(a, t), getattr(b, t))
        for t in tensors
    )


def test_prepare_bytes_is_decode_then_prepare_with_the_models_video_sampling(tiny_model) -> None:
    # Not the decoder's defaults (1 fps, 8 frames), so a preparer ignoring its config would fail.
    interface = replace(tiny_model.config.image_interface, video_fps=10.0, max_frames=4)
    config = replace(tiny_model.config, image_interface=interface)
    tiny = tiny_model.preparer
    preparer = preprocess.MediaPreparer(config, tiny.image_processor, tiny.speech_features)
    video = make_mp4(frames=30, fps=10, audio=True)
    by_hand = {
        "image": preparer.prepare("image", decode_image(make_png())),
        "audio": preparer.prepare("audio", decode_audio(make_wav(0.5))),
        "video": preparer.prepare(
            "video", decode_video(video, fps=interface.video_fps, max_frames=interface.max_frames)
        ),
    }
    data = {"image": make_png(), "audio": make_wav(0.5), "video": video}
    for kind, expected in by_hand.items():
        assert same(preparer.prepare_bytes(kind, data[kind]), expected), kind


def test_video_audio_can_be_left_out(tiny_model) -> None:
    video = make_mp4(audio=True)
    with_track = tiny_model.preparer.prepare_bytes("video", video)
    frames_only = tiny_model.preparer.prepare_bytes("video", video, video_audio=False)
    assert with_track.audio_features is not None and frames_only.audio_features is None
    assert torch.equal(with_track.pixels, frames_only.pixels)
    assert with_track.digest != frames_only.digest


def test_stages_are_timed_apart(tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:
    """One clock tick before decoding, one after, one after preprocessing."""
    ticks = itertools.count()
    monkeypatch.setattr(preprocess.time, "perf_counter", lambda: float(next(ticks)))
    prepared = tiny_model.preparer.prepare_bytes("image", make_png())
    assert (prepared.decode_seconds, prepared.preprocess_seconds) == (1.0, 1.0)


def test_prepare_file_names_the_path_and_applies_the_limits(tiny_model, tmp_path: Path) -> None:
    path = tmp_path / "tone.wav"
    path.write_bytes(make_wav(1.0))
    preparer = tiny_model.preparer
    assert same(preparer.prepare_file(path, "audio"), preparer.prepare_bytes("audio", make_wav()))
    with pytest.raises(MediaError) as info:
        preparer.prepare_file(path, "audio", MediaLimits(max_audio_seconds=0.5))
    assert info.value.status == 413 and str(path) in info.value.message
    with pytest.raises(MediaError) as info:
        preparer.prepare_bytes("image", make_wav())
    assert info.value.status == 415


def test_prompt_embeddings_is_encode_layout_embed(tiny_model) -> None:
    model = tiny_model
    items = [
        model.preparer.prepare_bytes("image", make_png()),
        model.preparer.prepare_bytes("video", make_mp4(audio=True)),
    ]
    turns = [("user", "Compare <video> with <image>.")]
    with torch.inference_mode():
        prompt = model.prompt_embeddings(turns, items)
        encoded = model.encode(items)
        layout = model.layout(bind_media(turns, ["image", "video"]), encoded)
        embeds = model.embed(layout, encoded)
    assert prompt.layout == layout and len(prompt) == len(layout)
    assert torch.equal(prompt.embeds, embeds)
    assert [[kind for kind, _ in item] for item in prompt.encoded] == [
        ["image"],
        ["video", "audio"],
    ]


def test_prompt_embeddings_binds_before_encoding(tiny_model, monkeypatch) -> None:
    def no_encoding(items):
        raise AssertionError("media were encoded for a prompt that cannot bind them")

    monkeypatch.setattr(tiny_model, "encode", no_encoding)
    image = tiny_model.preparer.prepare_bytes("image", make_png())
    with pytest.raises(PromptError):
        tiny_model.prompt_embeddings([("user", "<image> <image>")], [image])
