"""A saved BLIP-2 checkpoint's vision tower and Q-Former load into xllm unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from xllm.model.checkpoint import load_model, save_interfaces
from xllm.model.config import ModelConfigError
from xllm.model.encoders.vision import VisionEncoder, tiny_vision_config

QUERIES = 4


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Blip2ForConditionalGeneration saved like a Salesforce/blip2-* checkpoint."""
    torch.manual_seed(7)
    config = Blip2Config(
        vision_config=tiny_vision_config().to_dict(),
        qformer_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 48,
            "cross_attention_frequency": 2,  # as in BLIP-2: cross-attention every 2nd layer
            "vocab_size": 64,
            "max_position_embeddings": 64,
        },
        text_config=OPTConfig(
            vocab_size=64,
            hidden_size=16,
            word_embed_proj_dim=16,
            num_hidden_layers=1,
            ffn_dim=32,
            num_attention_heads=2,
            max_position_embeddings=64,
        ).to_dict(),
        num_query_tokens=QUERIES,
    )
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():  # make every weight distinct from a fresh init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("blip2")
    model.save_pretrained(path)
    BlipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def blip2(blip2_dir: Path) -> Blip2ForConditionalGeneration:
    return Blip2ForConditionalGeneration.from_pretrained(blip2_dir, dtype=torch.float32).eval()


def write_xllm_dir(root: Path, blip2_dir: Path, llm_dir: Path, num_query_tokens: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "llm": {"path": str(llm_dir)},
        "vision": {"path": str(blip2_dir)},
        "image_interface": {
            "num_query_tokens": num_query_tokens,
            "max_frames": 4,
            "init_from": str(blip2_dir),
        },
    }
    (root / "xllm.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def xllm_dir(tmp_path_factory, blip2_dir: Path, tiny_model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("xllm-from-blip2")
    return write_xllm_dir(root, blip2_dir, tiny_model_dir / "llm", QUERIES)


def test_vision_tower_and_qformer_equal_blip2(xllm_dir: Path, blip2) -> None:
    model = load_model(xllm_dir, device="cpu", require_interfaces=False)
    assert model.modalities == ("image", "video")

    # Vision tower: the same weights, the same features.
    ours = model.vision.model.state_dict()
    theirs = blip2.vision_model.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=key)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_patches = blip2.vision_model(pixel_values=pixels).last_hidden_state
        patches = model.vision(pixels)
    torch.testing.assert_close(patches, expected_patches)

    # Q-Former with BLIP-2's own queries: the same query outputs.
    interface = model.image_interface
    assert interface.num_query_tokens == QUERIES
    torch.testing.assert_close(interface.query_tokens, blip2.query_tokens, rtol=0, atol=0)
    with torch.no_grad():
        expected = blip2.qformer(
            query_embeds=blip2.query_tokens.expand(2, -1, -1),
            encoder_hidden_states=expected_patches,
            encoder_attention_mask=torch.ones(expected_patches.shape[:2], dtype=torch.long),
        ).last_hidden_state
        got = interface.query(patches, interface.query_tokens)
    assert got.shape == (2, QUERIES, 32)
    torch.testing.assert_close(got, expected)
    # The LLM-facing tokens are that output through the (new) projection.
    with torch.no_grad():
        torch.testing.assert_close(interface(patches), interface.projection(expected))

    # X-LLM: the video queries start as a copy of the image queries; so does video's Q-Former.
    torch.testing.assert_close(model.video_interface.query_tokens, blip2.query_tokens)
    assert model.video_interface.query_tokens.data_ptr() != interface.query_tokens.data_ptr()
    video_qformer = model.video_interface.qformer.state_dict()
    for key, value in blip2.qformer.state_dict().items():
        torch.testing.assert_close(video_qformer[key], value, rtol=0, atol=0)


def test_image_preprocessing_is_the_checkpoints(xllm_dir: Path, blip2_dir: Path, media) -> None:
    model = load_model(xllm_dir, device="cpu", require_interfaces=False)
    image = media.image(seed=3, size=(50, 37))
    expected = BlipImageProcessorPil.from_pretrained(blip2_dir)(images=[image], return_tensors="pt")
    prepared = model.prepare("image", image)
    assert prepared.pixels.shape == (1, 3, 32, 32)
    torch.testing.assert_close(prepared.pixels, expected["pixel_values"])


def test_vision_encoder_reads_only_the_vision_weights(blip2_dir: Path, blip2) -> None:
    encoder = VisionEncoder.from_pretrained(blip2_dir)
    assert encoder.hidden_size == blip2.config.vision_config.hidden_size
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder.model.training


def test_saved_interfaces_keep_the_blip2_reference(
    xllm_dir: Path, blip2, tmp_path: Path, media
) -> None:
    model = load_model(xllm_dir, device="cpu", require_interfaces=False)
    with torch.no_grad():
        model.image_interface.projection.weight.normal_()
    save_interfaces(model, tmp_path / "out", base_dir=xllm_dir)
    again = load_model(tmp_path / "out", device="cpu")
    pixels = model.prepare("image", media.image(seed=1)).pixels
    with torch.no_grad():
        torch.testing.assert_close(
            again.image_interface(again.vision(pixels)), model.image_interface(model.vision(pixels))
        )


def test_query_count_mismatch_is_a_config_error(tmp_path: Path, blip2_dir, tiny_model_dir) -> None:
    root = write_xllm_dir(tmp_path / "bad", blip2_dir, tiny_model_dir / "llm", QUERIES * 2)
    with pytest.raises(ModelConfigError, match="num_query_tokens"):
        load_model(root, device="cpu", require_interfaces=False)
