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
