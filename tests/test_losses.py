import math

import torch
import torch.nn.functional as F

from napari_m3hl.method.losses import high_level_loss, low_level_loss, masked_ce, masked_dice, mix_loss, seg_loss


def test_masked_ce_is_mean_over_region():
    logits = torch.randn(2, 3, 5, 5)
    target = torch.randint(0, 3, (2, 5, 5))
    region = torch.zeros(2, 5, 5)
    region[0, :2] = 1
    full = F.cross_entropy(logits, target, reduction="none")
    assert torch.isclose(masked_ce(logits, target, region), full[0, :2].mean())
    assert torch.isclose(masked_ce(logits, target, torch.ones(2, 5, 5)), full.mean())


def test_dice_perfect_and_worst():
    target = torch.tensor([[[0, 1], [2, 2]]])
    onehot = F.one_hot(target, 3).movedim(-1, 1).float()
    region = torch.ones(1, 2, 2)
    assert masked_dice(onehot, target, region).item() < 1e-5
    wrong = F.one_hot((target + 1) % 3, 3).movedim(-1, 1).float()
    assert abs(masked_dice(wrong, target, region).item() - 1.0) < 1e-4


def test_dice_hand_value():
    # one class map: p = [1, 0.5], y = [1, 1] for class 1; background p = [0, 0.5], y = [0, 0]
    probs = torch.tensor([[[[0.0, 0.5]], [[1.0, 0.5]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[1, 1]]])
    region = torch.ones(1, 1, 2)
    d1 = 1 - (2 * 1.5) / (1.25 + 2)
    d0 = 1 - (0 + 1e-5) / (0.25 + 1e-5)
    assert math.isclose(masked_dice(probs, target, region).item(), (d0 + d1) / 2, rel_tol=1e-4)


def test_mix_loss_region_weights():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8)
    target = torch.randint(0, 4, (2, 8, 8))
    mask = torch.zeros(2, 8, 8)
    mask[:, :, :4] = 1
    probs = torch.softmax(logits, 1)
    a = masked_ce(logits, target, mask) + masked_dice(probs, target, mask)
    b = masked_ce(logits, target, 1 - mask) + masked_dice(probs, target, 1 - mask)
    assert torch.isclose(mix_loss(logits, target, mask, 0.5, 1.0), 0.5 * a + b)
    assert torch.isclose(mix_loss(logits, target, mask, 1.0, 0.5), a + 0.5 * b)
    # full mask: only the first term counts
    assert torch.isclose(mix_loss(logits, target, torch.ones(2, 8, 8), 1.0, 0.5), seg_loss(logits, target), atol=1e-5)


def test_low_level_loss_pairs():
    m = [torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)]
    u = [torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 3.0)]
    # pairs: |0-0|=0, |0-3|=3, |1-0|=1, |1-3|=2 → mean 1.5
    assert math.isclose(low_level_loss(m, u).item(), 1.5)


def test_high_level_loss_cosine():
    x = torch.randn(3, 8, 2, 2)
    assert low_level_loss([x], [x]).item() == 0
    assert abs(high_level_loss([x], [x]).item()) < 1e-6
    assert abs(high_level_loss([x], [2 * x]).item()) < 1e-6  # scale invariant
    assert abs(high_level_loss([x], [-x]).item() - 2.0) < 1e-6
    # orthogonal features: cos 0 → loss 1
    a = torch.zeros(1, 2, 1, 1); a[0, 0] = 1
    b = torch.zeros(1, 2, 1, 1); b[0, 1] = 1
    assert abs(high_level_loss([a, a], [b, a]).item() - 0.5) < 1e-6


def test_losses_backpropagate():
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randint(0, 4, (2, 8, 8))
    mask = (torch.rand(2, 8, 8) > 0.5).float()
    mix_loss(logits, target, mask, 0.5, 1.0).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_mix_loss_dice_pooling():
    """``dice="regions"`` (default) scores Dice inside M and inside 1−M apart;
    ``"whole"`` scores one Dice over the image with pixel weights
    w_M·M + w_rest·(1−M), scaled by w_M + w_rest; ``"none"`` leaves CE only.
    A confident (not saturated) right prediction of a structure that lies
    in M only scores a near-perfect whole-image Dice, while the region Dice
    of 1−M, which does not hold it, is near 1 (no overlap can score there)."""
    import pytest

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 16, 16)
    target = torch.randint(0, 4, (2, 16, 16))
    mask = torch.zeros(2, 16, 16)
    mask[:, :8] = 1.0
    probs = torch.softmax(logits, 1)
    ce = 0.5 * masked_ce(logits, target, mask) + 1.0 * masked_ce(logits, target, 1 - mask)
    assert torch.allclose(mix_loss(logits, target, mask, 0.5, 1.0, "none"), ce)
    regions = ce + 0.5 * masked_dice(probs, target, mask) + 1.0 * masked_dice(probs, target, 1 - mask)
    assert torch.allclose(mix_loss(logits, target, mask, 0.5, 1.0), regions)
    whole = ce + 1.5 * masked_dice(probs, target, 0.5 * mask + (1 - mask))
    assert torch.allclose(mix_loss(logits, target, mask, 0.5, 1.0, "whole"), whole)
    # a right prediction (probability 0.95) of a structure lying in the top half (M = 1) only
    t = torch.zeros(1, 16, 16, dtype=torch.long)
    t[0, 2:6, 4:10] = 1
    confident = 3.0 * F.one_hot(t, 2).movedim(-1, 1).float()
    m = mask[:1]
    none = mix_loss(confident, t, m, 1.0, 1.0, "none")
    assert mix_loss(confident, t, m, 1.0, 1.0, "whole") - none < 0.05
    assert mix_loss(confident, t, m, 1.0, 1.0, "regions") - none > 0.45  # class 1's Dice term in 1−M is ~1
    with pytest.raises(ValueError, match="regions, whole or none"):
        mix_loss(logits, target, mask, 0.5, 1.0, "pooled")
