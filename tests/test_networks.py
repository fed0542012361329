import pytest
import torch

from napari_m3hl.method.networks import UNet2D, VNet3D, build_network


def test_unet_shapes_and_taps():
    net = UNet2D(in_channels=1, num_classes=4)
    assert 1.80e6 < sum(p.numel() for p in net.parameters()) < 1.83e6  # the literature's 1.81 M
    out = net(torch.randn(2, 1, 96, 80))
    assert out.logits.shape == (2, 4, 96, 80)
    assert out.features["low_enc"].shape == (2, 32, 48, 40)  # after the first down-sampling
    assert out.features["low_dec"].shape == (2, 16, 96, 80)  # last decoder map
    assert out.features["high"].shape == (2, 256, 6, 5)  # bottleneck


def test_unet_odd_size():
    out = UNet2D(num_classes=3)(torch.randn(1, 1, 75, 41))
    assert out.logits.shape == (1, 3, 75, 41)


def test_vnet_shapes_and_taps():
    net = VNet3D(num_classes=2)
    out = net(torch.randn(1, 1, 32, 32, 16))
    assert out.logits.shape == (1, 2, 32, 32, 16)
    assert out.features["low_enc"].shape == (1, 32, 16, 16, 8)
    assert out.features["low_dec"].shape == (1, 16, 32, 32, 16)
    assert out.features["high"].shape == (1, 256, 2, 2, 1)


def test_build_network():
    assert isinstance(build_network("unet2d", 1, 4), UNet2D)
    assert isinstance(build_network("vnet3d", 1, 2), VNet3D)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_network("resnet", 1, 2)


def test_cpu_dropout_keeps_each_activation_with_probability_1_minus_p_and_rescales():
    """The U-Net's CPU dropout draws an i.i.d. keep-mask at the rate asked (p rounded
    to 1/65536), scales the kept activations by 1/(1 − p), keeps the input's
    memory layout, passes the same mask to the gradient, is repeatable under a
    seed, and is the identity in eval mode and at p = 0."""
    from napari_m3hl.method.networks import Dropout, keep_mask

    x = torch.rand(4, 16, 64, 64).add_(0.5).contiguous(memory_format=torch.channels_last)
    for p in (0.05, 0.3, 0.5):
        torch.manual_seed(0)
        keep, p_used = keep_mask(x, p)
        assert abs(p_used - p) <= 0.5 / 65536 and keep.shape == x.shape and keep.dtype == torch.bool
        assert keep.stride() == x.stride()  # the input's (channels_last) layout
        n = keep.numel()
        rate = 1.0 - keep.float().mean().item()
        assert abs(rate - p) < 5 * (p * (1 - p) / n) ** 0.5  # 5 standard deviations of the dropped share
        k = keep.reshape(-1).float()
        assert abs(torch.corrcoef(torch.stack([k[:-1], k[1:]]))[0, 1].item()) < 0.01  # neighbours independent

    drop = Dropout(0.3).train()
    xg = x.clone().requires_grad_(True)
    torch.manual_seed(1)
    y = drop(xg)
    torch.manual_seed(1)
    keep, p_used = keep_mask(x, 0.3)
    assert torch.allclose(y, torch.where(keep, x / (1 - p_used), torch.zeros(())))
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.sum().backward()
    assert torch.allclose(xg.grad, keep.float() / (1 - p_used))
    torch.manual_seed(1)
    assert torch.equal(drop(x), y.detach())  # same seed, same mask
    assert not torch.equal(drop(x), y.detach())  # the next draw differs
    assert torch.equal(drop.eval()(x), x) and torch.equal(Dropout(0.0).train()(x), x)


def test_unet_uses_the_cpu_dropout_at_its_encoder_rates():
    from napari_m3hl.method.networks import Dropout

    rates = [m.p for m in UNet2D().modules() if isinstance(m, Dropout)]
    assert rates == [0.05, 0.1, 0.2, 0.3, 0.5, 0.0, 0.0, 0.0, 0.0]
