"""Continuous integrate-and-fire (x2l/cformer.py): fire counts, the split frame, quantity loss."""

from __future__ import annotations

import pytest
import torch

from xllm.model.x2l.cformer import CFormer, cif, cif_weights, quantity_loss


def test_hand_made_example_splits_the_crossing_frame() -> None:
    alpha = torch.tensor([0.6, 0.6, 0.6, 0.2])
    frames = torch.eye(4)  # frame t is one-hot at t, so a fire shows its weight per frame
    fires, quantity = cif(frames, alpha)
    torch.testing.assert_close(quantity, torch.tensor(2.0))
    assert fires.shape == (2, 4)
    # Fire 1: all of f0, then 0.4 of f1 completes the threshold; f1's other 0.2 starts fire 2.
    torch.testing.assert_close(fires[0], torch.tensor([0.6, 0.4, 0.0, 0.0]))
    torch.testing.assert_close(fires[1], torch.tensor([0.0, 0.2, 0.6, 0.2]))
    # Every frame's weight is fully distributed (it sums to exactly 2 fires' worth).
    torch.testing.assert_close(fires.sum(0), alpha)


def test_frame_spanning_several_fires() -> None:
    # A single heavy weight (after threshold scaling alphas may exceed 1) feeds several fires.
    alpha = torch.tensor([0.5, 2.0, 0.5])
    weights = cif_weights(alpha, 3)
    expected = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.5, 0.5]])
    torch.testing.assert_close(weights, expected)


@pytest.mark.parametrize(
    ("alpha", "fires"),
    [
        ([0.3, 0.3, 0.3], 1),  # 0.9 -> 1
        ([0.1, 0.1], 1),  # 0.2 rounds to 0, but at least one vector fires
        ([0.4, 0.4, 0.4, 0.4], 2),  # 1.6 -> 2: the partly covered tail fires
        ([0.7, 0.7, 0.7, 0.7], 3),  # 2.8 -> 3
        ([0.9] * 5 + [0.2], 5),  # 4.7 -> 5
        ([0.55] * 10, 6),  # 5.5 -> round half to even: 6
        ([0.33] * 10, 3),  # 3.3 -> 3: the 0.3 remainder does not fire
    ],
)
def test_fires_equal_rounded_weight_sum_at_inference(alpha: list[float], fires: int) -> None:
    alpha_t = torch.tensor(alpha, dtype=torch.float64)
    out, quantity = cif(torch.randn(len(alpha), 5, dtype=torch.float64), alpha_t)
    assert out.shape == (fires, 5)
    assert fires == max(1, round(quantity.item()))


def test_random_fires_are_alpha_weighted_sums() -> None:
    gen = torch.Generator().manual_seed(0)
    alpha = torch.rand(37, generator=gen, dtype=torch.float64)
    frames = torch.randn(37, 8, generator=gen, dtype=torch.float64)
    out, quantity = cif(frames, alpha)
    n = max(1, round(quantity.item()))
    assert out.shape == (n, 8)
    # Reference: walk the frames, integrating and firing at each crossing of 1.0.
    expected, acc, state = [], 0.0, torch.zeros(8, dtype=torch.float64)
    for a, f in zip(alpha.tolist(), frames, strict=True):
        while a > 0:
            take = min(a, 1.0 - acc)
            state = state + take * f
            acc += take
            a -= take
            if acc >= 1.0 - 1e-12:
                expected.append(state)
                acc, state = 0.0, torch.zeros(8, dtype=torch.float64)
    if acc > 0:
        expected.append(state)  # the tail
    torch.testing.assert_close(out, torch.stack(expected[:n]))


@pytest.mark.parametrize("target_len", [1, 4, 9, 20])
def test_target_len_sets_the_number_of_fires(target_len: int) -> None:
    gen = torch.Generator().manual_seed(target_len)
    alpha = torch.rand(30, generator=gen) * 0.5  # sum ~7.5, i.e. not the target
    frames = torch.randn(30, 6, generator=gen)
    out, quantity = cif(frames, alpha, target_len)
    assert out.shape == (target_len, 6)
    torch.testing.assert_close(quantity, alpha.sum())  # the unscaled sum, for the loss
    # All of the (rescaled) weight lands in the target_len fires, each a full fire.
    weights = cif_weights(alpha * target_len / alpha.sum(), target_len)
    torch.testing.assert_close(weights.sum(1), torch.ones(target_len), atol=1e-4, rtol=0)
    torch.testing.assert_close(out, weights @ frames)


def test_cformer_target_lens_give_exact_fire_counts() -> None:
    torch.manual_seed(0)
    cformer = CFormer(12, 20, hidden_size=16, num_layers=1, num_heads=2)
    clips = [torch.randn(n, 12) for n in (5, 30, 80)]
    fires = [cformer.compress(c, t)[0] for c, t in zip(clips, (2, 7, 31), strict=True)]
    assert [f.shape[0] for f in fires] == [2, 7, 31]


@pytest.mark.parametrize("too_many", [True, False])
def test_quantity_loss_gradient_reaches_the_weight_predictor(too_many: bool) -> None:
    torch.manual_seed(0)
    cformer = CFormer(12, 20, hidden_size=16, num_layers=1, num_heads=2)
    frames = torch.randn(40, 12)
    quantity = cformer.firing_weights(frames).sum()
    target = int(quantity.item()) - 5 if too_many else int(quantity.item()) + 5
    loss = quantity_loss(quantity, target)
    loss.backward()
    grad = cformer.weight_out.bias.grad
    assert grad is not None and cformer.weight_conv.weight.grad.abs().sum() > 0
    # d loss / d bias = sign(sum - target) * sum(sigmoid'): a descent step moves every alpha
    # (and so the sum) toward the target.
    assert (grad.item() > 0) == too_many and abs(grad.item()) > 1e-3
    with torch.no_grad():
        cformer.weight_out.bias -= 0.1 * grad
        after = cformer.firing_weights(frames).sum()
    assert abs(after.item() - target) < abs(quantity.item() - target)
    assert (after < quantity).item() == too_many


def test_quantity_loss_gradient_flows_through_cformer_forward() -> None:
    """In training the loss uses the quantities returned by forward (with target_lens given)."""
    torch.manual_seed(0)
    cformer = CFormer(12, 20, hidden_size=16, num_layers=1, num_heads=2)
    clips = [torch.randn(30, 12), torch.randn(50, 12)]
    targets = [2, 3]  # far below the sums (~15, ~25): every alpha should go down
    tokens, quantities = cformer(clips, targets)
    assert [t.shape[0] for t in tokens] == targets
    loss = quantity_loss(quantities, torch.tensor(targets)).sum()
    loss.backward()
    assert cformer.weight_out.bias.grad.item() > 0
    assert cformer.weight_out.weight.grad.abs().sum() > 0
