"""Shapes and behaviour of the X2L interfaces: Q-Former (image, video), C-Former, frame stacking."""

from __future__ import annotations

import math

import pytest
import torch

from xllm.model.x2l.cformer import CFormer
from xllm.model.x2l.projector import FrameStackProjector
from xllm.model.x2l.qformer import ImageInterface, VideoInterface, build_qformer

VISION_HIDDEN, QFORMER_HIDDEN, LLM_HIDDEN, QUERIES, PATCHES = 24, 32, 40, 4, 17
QFORMER_KWARGS = {
    "hidden_size": QFORMER_HIDDEN,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "cross_attention_frequency": 1,
    "vocab_size": 64,
}


@pytest.fixture(scope="module")
def interfaces() -> tuple[ImageInterface, VideoInterface]:
    torch.manual_seed(0)
    image = ImageInterface(build_qformer(QFORMER_KWARGS, VISION_HIDDEN), QUERIES, LLM_HIDDEN)
    video = VideoInterface(
        build_qformer(QFORMER_KWARGS, VISION_HIDDEN), QUERIES, max_frames=6, llm_hidden=LLM_HIDDEN
    )
    return image.eval(), video.eval()


def patches(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, PATCHES, VISION_HIDDEN, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_image_interface_shape_and_per_image_independence(interfaces) -> None:
    image, _ = interfaces
    batch = patches(3)
    out = image(batch)
    assert out.shape == (3, QUERIES, LLM_HIDDEN)
    assert image.num_query_tokens == QUERIES
    # Each image is queried on its own: batching does not mix images.
    torch.testing.assert_close(out[1:2], image(batch[1:2]), atol=1e-5, rtol=1e-5)
    # Different images give different tokens.
    assert not torch.allclose(out[0], out[1])


@torch.no_grad()
def test_video_interface_shape_and_frame_order(interfaces) -> None:
    _, video = interfaces
    frames = patches(4, seed=1)
    out = video(frames)
    assert out.shape == (4 * QUERIES, LLM_HIDDEN)

    perm = torch.tensor([2, 0, 3, 1])
    per_frame = out.reshape(4, QUERIES, LLM_HIDDEN)
    # Frame-position weights start at zero: a permuted clip is then just permuted tokens.
    permuted = video(frames[perm]).reshape(4, QUERIES, LLM_HIDDEN)
    torch.testing.assert_close(permuted, per_frame[perm], atol=1e-5, rtol=1e-5)

    # With learned (non-zero) temporal embeddings the order of the frames matters.
    original = video.frame_position.weight.detach().clone()
    try:
        video.frame_position.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
        ordered = video(frames).reshape(4, QUERIES, LLM_HIDDEN)
        shuffled = video(frames[perm]).reshape(4, QUERIES, LLM_HIDDEN)
        # frame t's tokens depend on its position: moving frame 2 to slot 0 changes its tokens
        assert (shuffled - ordered[perm]).abs().max() > 1e-2
        assert not torch.allclose(ordered, per_frame)  # the temporal table is really added
    finally:
        video.frame_position.weight.copy_(original)


@torch.no_grad()
def test_video_interface_owns_its_qformer_queries_and_projection(interfaces) -> None:
    image, video = interfaces
    frames = patches(2, seed=4)
    as_images = image(frames)  # (2, Q, H)
    as_video = video(frames).reshape(2, QUERIES, LLM_HIDDEN)
    assert not torch.allclose(as_images, as_video)
    # Video trains its own Q-Former (xllm's deviation from X-LLM): no weight is shared.
    image_storage = {p.data_ptr() for p in image.parameters()}
    assert video.qformer is not image.qformer
    assert not image_storage & {p.data_ptr() for p in video.parameters()}
    # A video Q-Former with the image one's weights (and zero frame positions) is the image path
    # run per frame; changing only the video Q-Former changes only the video tokens.
    copy = VideoInterface(
        build_qformer(QFORMER_KWARGS, VISION_HIDDEN), QUERIES, max_frames=6, llm_hidden=LLM_HIDDEN
    ).eval()
    copy.load_state_dict(
        {**image.state_dict(), "frame_position.weight": torch.zeros(6, QFORMER_HIDDEN)}
    )
    torch.testing.assert_close(copy(frames).reshape(2, QUERIES, LLM_HIDDEN), as_images)
    for param in copy.qformer.parameters():
        param.add_(0.05)
    assert not torch.allclose(copy(frames).reshape(2, QUERIES, LLM_HIDDEN), as_images)
    torch.testing.assert_close(image(frames), as_images)


def test_video_interface_rejects_too_many_frames(interfaces) -> None:
    _, video = interfaces
    video(patches(video.max_frames))  # exactly max_frames is fine
    with pytest.raises(ValueError, match="at most 6"):
        video(patches(video.max_frames + 1))


@pytest.mark.parametrize("stack", [1, 3, 5])
@torch.no_grad()
def test_frame_stack_projector_lengths(stack: int) -> None:
    torch.manual_seed(0)
    projector = FrameStackProjector(16, LLM_HIDDEN, stack_frames=stack, mlp_hidden=32)
    lengths = [1, 4, 5, 6, 11, 50]
    clips = [torch.randn(n, 16) for n in lengths]
    tokens, quantities = projector(clips)
    assert [t.shape for t in tokens] == [(math.ceil(n / stack), LLM_HIDDEN) for n in lengths]
    assert quantities.shape == (len(lengths),)
    # Token j is made of frames j*k .. j*k+k-1 in that order (stacked, not pooled), each frame
    # layer-normed first: a frame's scale and offset do not change its token.
    clip = clips[-1]
    expected = projector.mlp(projector.norm(clip[:stack]).reshape(1, -1))[0]
    torch.testing.assert_close(tokens[-1][0], expected)
    shifted = clip * 100 + 40  # Whisper's decoder states: large, offset
    torch.testing.assert_close(projector([shifted])[0][0][0], expected, atol=1e-3, rtol=1e-3)
    if stack > 1:
        swapped = clip.clone()
        swapped[[0, 1]] = swapped[[1, 0]]
        assert not torch.allclose(projector([swapped])[0][0][0], tokens[-1][0])


@torch.no_grad()
def test_cformer_output_lengths_follow_the_firing_weights() -> None:
    torch.manual_seed(0)
    cformer = CFormer(16, LLM_HIDDEN, hidden_size=32, num_layers=1, num_heads=2).eval()
    clips = [torch.randn(n, 16) for n in (1, 7, 40, 100)]
    tokens, quantities = cformer(clips)
    assert quantities.shape == (4,)
    for clip, out, quantity in zip(clips, tokens, quantities, strict=True):
        alpha = cformer.firing_weights(clip)
        torch.testing.assert_close(quantity, alpha.sum())
        assert out.shape == (max(1, round(alpha.sum().item())), LLM_HIDDEN)
    # Longer audio fires more.
    assert tokens[3].shape[0] > tokens[2].shape[0] > tokens[1].shape[0]

    # Training: exactly target_len tokens per clip.
    targets = [3, 1, 12, 9]
    tokens, _ = cformer(clips, targets)
    assert [t.shape[0] for t in tokens] == targets


@torch.no_grad()
def test_cformer_batching_matches_single_clips() -> None:
    """Padding in the batched transformer stack must not leak into the shorter clips."""
    torch.manual_seed(1)
    cformer = CFormer(16, LLM_HIDDEN, hidden_size=32, num_layers=2, num_heads=2).eval()
    clips = [torch.randn(n, 16) for n in (12, 60)]
    batched, _ = cformer(clips)
    for clip, out in zip(clips, batched, strict=True):
        alone, _ = cformer([clip])
        torch.testing.assert_close(out, alone[0], atol=1e-5, rtol=1e-4)
