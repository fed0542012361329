"""Tests of napari_m3hl.inference.slices2d with tiny dummy models."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy.ndimage import zoom

from napari_m3hl.errors import M3HLInputError
from napari_m3hl.method.components import largest_component
from napari_m3hl.inference.slices2d import predict_volume_2d
from napari_m3hl.inference.window3d import predict_volume_3d, sliding_window_starts


@dataclass
class Out:
    logits: torch.Tensor


class BinModel(torch.nn.Module):
    """Logits ``-(x - c)^2 * k``: class = intensity rounded to the nearest c.

    Works for 2D and 3D inputs; records its training flag at each call.
    """

    def __init__(self, num_classes: int = 4, sharp: float = 20.0) -> None:
        super().__init__()
        self.register_buffer("centers", torch.arange(num_classes, dtype=torch.float32))
        self.sharp = sharp
        self.drop = torch.nn.Dropout(0.5)  # a submodule whose flag must be restored
        self.seen_training: list[bool] = []
        self.calls = 0
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> Out:
        self.seen_training.append(self.training)
        self.calls += 1
        self.batch_sizes.append(x.shape[0])
        shape = [1, -1] + [1] * (x.ndim - 2)
        logits = -((x - self.centers.view(shape)) ** 2) * self.sharp
        return Out(logits=logits)


class ConvModel3D(torch.nn.Module):
    """Fixed random 3D conv: non-pointwise, so overlaps in the window matter."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv3d(1, num_classes, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> Out:
        return Out(self.conv(x))


# --------------------------------------------------------------------------- #
# 2D
# --------------------------------------------------------------------------- #
def test_2d_labels_shape_and_training_flag_restored() -> None:
    rng = np.random.default_rng(0)
    model = BinModel(4)
    model.train()
    model.drop.eval()  # mixed flags must come back exactly
    vol = rng.integers(0, 4, size=(5, 32, 32)).astype(np.float32)
    lab = predict_volume_2d(model, vol, patch=(32, 32), batch_size=2)
    assert lab.dtype == np.uint8 and lab.shape == vol.shape
    np.testing.assert_array_equal(lab, vol.astype(np.uint8))  # same size: exact
    assert model.seen_training == [False, False, False]
    assert model.batch_sizes == [2, 2, 1]
    assert model.training is True and model.drop.training is False


def test_2d_arbitrary_shape_constant_slices() -> None:
    """Slices of constant intensity: labels exact whatever the resizing."""
    model = BinModel(4)
    d, h, w = 6, 37, 53
    vol = np.stack([np.full((h, w), k % 4, np.float32) for k in range(d)])
    for resize_back in ("nearest_label", "bilinear_probs"):
        for resize_input in ("bilinear", "nearest"):
            lab, probs = predict_volume_2d(
                model, vol, patch=(32, 32), return_probs=True,
                resize_back=resize_back, resize_input=resize_input,
            )
            assert lab.shape == (d, h, w) and lab.dtype == np.uint8
            assert probs.shape == (4, d, h, w) and probs.dtype == np.float32
            np.testing.assert_array_equal(lab, vol.astype(np.uint8))
            np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
            np.testing.assert_array_equal(probs.argmax(0), lab)


def test_2d_nearest_label_matches_reference_loop() -> None:
    """resize_input='nearest' + 'nearest_label' == the authors' per-slice test loop."""
    rng = np.random.default_rng(1)
    d, h, w, patch = 4, 45, 38, (32, 32)
    # blocky image so labels have structure
    vol = np.kron(rng.integers(0, 4, size=(d, 9, 19)), np.ones((1, 5, 2))).astype(np.float32)
    assert vol.shape == (d, h, w)
    model = BinModel(4)
    ours = predict_volume_2d(model, vol, patch=patch, resize_input="nearest", batch_size=3)
    for mode in ("nearest", "constant"):
        ref = np.zeros((d, h, w), np.uint8)
        for i in range(d):
            s = zoom(vol[i], (patch[0] / h, patch[1] / w), order=0, mode=mode)
            with torch.no_grad():
                out = model(torch.from_numpy(s)[None, None]).logits
            lab = torch.argmax(torch.softmax(out, 1), 1)[0].numpy()
            ref[i] = zoom(lab, (h / patch[0], w / patch[1]), order=0, mode=mode)
        if mode == "nearest":
            np.testing.assert_array_equal(ours, ref)
        else:
            # the scripts' default mode differs at most on the last row/column
            diff = ours != ref
            assert not diff[:, :-1, :-1].any()


def test_2d_resize_back_geometry() -> None:
    """Regions keep their place after resizing (edges may blend by a pixel or two)."""
    d, h, w = 2, 50, 70
    vol = np.zeros((d, h, w), np.float32)
    vol[:, :, 35:] = 2.0
    vol[:, 20:30, 10:20] = 3.0
    model = BinModel(4)
    for mode in ("nearest_label", "bilinear_probs"):
        lab = predict_volume_2d(model, vol, patch=(64, 64), resize_back=mode)
        agree = (lab == vol.astype(np.uint8)).mean()
        assert agree > 0.95, (mode, agree)
        # far from edges everything is exact
        assert (lab[:, :, :8] == 0).all() and (lab[:, :18, 22:33] == 0).all()
        assert (lab[:, 40:, 40:] == 2).all()
        assert (lab[:, 22:28, 12:18] == 3).all()


def test_2d_bad_inputs() -> None:
    model = BinModel(4)
    with pytest.raises(M3HLInputError, match="3-D"):
        predict_volume_2d(model, np.zeros((8, 8), np.float32))
    with pytest.raises(M3HLInputError, match="3-D"):
        predict_volume_2d(model, np.zeros((1, 2, 8, 8), np.float32))
    bad = np.zeros((2, 8, 8), np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(M3HLInputError, match="NaN"):
        predict_volume_2d(model, bad, patch=(8, 8))
    with pytest.raises(M3HLInputError, match="resize_back"):
        predict_volume_2d(model, np.zeros((1, 8, 8)), patch=(8, 8), resize_back="cubic")  # type: ignore[arg-type]
    with pytest.raises(M3HLInputError, match="patch"):
        predict_volume_2d(model, np.zeros((1, 8, 8)), patch=(8,))
    with pytest.raises(M3HLInputError, match="batch_size"):
        predict_volume_2d(model, np.zeros((1, 8, 8)), patch=(8, 8), batch_size=0)
    # a 3D model's output is rejected clearly and the flag is still restored
    model.train()
    with pytest.raises(M3HLInputError, match="logits"):
        predict_volume_2d(lambda_model(), np.zeros((1, 8, 8)), patch=(8, 8))
    assert model.training


class _Wrong(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> Out:
        return Out(x[:, :, None].repeat(1, 2, 3, 1, 1))


def lambda_model() -> torch.nn.Module:
    return _Wrong()


def test_plain_tensor_output_accepted_and_training_restored_on_error() -> None:
    class Plain(torch.nn.Module):
        def forward(self, x):  # noqa: ANN001
            return torch.cat([-x, x], 1)

    lab = predict_volume_2d(Plain(), np.ones((2, 8, 8), np.float32), patch=(8, 8))
    assert (lab == 1).all()

    class Boom(torch.nn.Module):
        def forward(self, x):  # noqa: ANN001
            raise RuntimeError("boom")

    m = Boom().train()
    with pytest.raises(RuntimeError):
        predict_volume_2d(m, np.ones((1, 8, 8), np.float32), patch=(8, 8))
    assert m.training


# --------------------------------------------------------------------------- #
# 3D
# --------------------------------------------------------------------------- #
def test_window_starts_cover() -> None:
    for size, patch, stride in [(10, 10, 3), (11, 10, 3), (30, 8, 5), (17, 4, 4), (9, 2, 2), (5, 1, 1)]:
        starts = sliding_window_starts(size, patch, stride)
        covered = np.zeros(size, bool)
        for s in starts:
            covered[s : s + patch] = True
        assert covered.all() and starts[0] == 0 and starts[-1] == size - patch
    with pytest.raises(ValueError):
        sliding_window_starts(9, 2, 7)  # stride > patch would leave gaps


@pytest.mark.parametrize("shape", [(10, 9, 7), (20, 23, 13), (6, 30, 9)])
def test_3d_labels_smaller_and_larger_than_patch(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(2)
    vol = rng.integers(0, 3, size=shape).astype(np.float32)
    model = BinModel(3).train()
    lab, probs = predict_volume_3d(
        model, vol, patch=(12, 12, 8), stride=(5, 5, 3), num_classes=3, return_probs=True, batch_size=2
    )
    assert lab.shape == shape and lab.dtype == np.uint8
    assert probs.shape == (3,) + shape
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)  # every voxel covered
    np.testing.assert_array_equal(lab, vol.astype(np.uint8))
    assert model.training and not any(model.seen_training)


def _reference_sliding(net, image, patch, stride_xy, stride_z, num_classes):  # noqa: ANN001
    """Straight transcription of the reference scheme (pad, windows, average)."""
    w, h, d = image.shape
    pads = [max(p - s, 0) for s, p in zip(image.shape, patch)]
    lp = [(p // 2, p - p // 2) for p in pads]
    image = np.pad(image, lp, mode="constant", constant_values=0)
    ww, hh, dd = image.shape
    sx = math.ceil((ww - patch[0]) / stride_xy) + 1
    sy = math.ceil((hh - patch[1]) / stride_xy) + 1
    sz = math.ceil((dd - patch[2]) / stride_z) + 1
    score = np.zeros((num_classes,) + image.shape, np.float32)
    cnt = np.zeros(image.shape, np.float32)
    for x in range(sx):
        xs = min(stride_xy * x, ww - patch[0])
        for y in range(sy):
            ys = min(stride_xy * y, hh - patch[1])
            for z in range(sz):
                zs = min(stride_z * z, dd - patch[2])
                t = image[xs : xs + patch[0], ys : ys + patch[1], zs : zs + patch[2]]
                with torch.no_grad():
                    y1 = torch.softmax(net(torch.from_numpy(t.copy())[None, None]).logits, 1)[0].numpy()
                score[:, xs : xs + patch[0], ys : ys + patch[1], zs : zs + patch[2]] += y1
                cnt[xs : xs + patch[0], ys : ys + patch[1], zs : zs + patch[2]] += 1
    score /= cnt[None]
    score = score[:, lp[0][0] : lp[0][0] + w, lp[1][0] : lp[1][0] + h, lp[2][0] : lp[2][0] + d]
    return np.argmax(score, 0), score


def test_3d_matches_reference_scheme_with_overlaps() -> None:
    rng = np.random.default_rng(3)
    vol = rng.standard_normal((22, 9, 15)).astype(np.float32)  # axis 1 smaller than patch
    net = ConvModel3D(3).eval()
    lab, probs = predict_volume_3d(net, vol, patch=(12, 12, 8), stride=(5, 5, 3), return_probs=True, batch_size=3)
    ref_lab, ref_score = _reference_sliding(net, vol, (12, 12, 8), 5, 3, 3)
    np.testing.assert_allclose(probs, ref_score, atol=1e-5)
    assert (lab == ref_lab).mean() > 0.999  # ties aside


def test_3d_binary_threshold_and_largest_component() -> None:
    vol = np.zeros((16, 16, 10), np.float32)
    vol[2:8, 2:8, 2:6] = 1.0  # big blob
    vol[12:14, 12:14, 7:9] = 1.0  # small blob
    model = BinModel(2)
    lab = predict_volume_3d(model, vol, patch=(8, 8, 8), stride=(4, 4, 2), num_classes=2)
    np.testing.assert_array_equal(lab, vol.astype(np.uint8))
    lab_l = predict_volume_3d(model, vol, patch=(8, 8, 8), stride=(4, 4, 2), keep_largest=True)
    expected = np.zeros_like(lab)
    expected[2:8, 2:8, 2:6] = 1
    np.testing.assert_array_equal(lab_l, expected)

    class Sig(torch.nn.Module):  # one-channel sigmoid logits
        def forward(self, x):  # noqa: ANN001
            return Out(x * 10 - 5)

    np.testing.assert_array_equal(
        predict_volume_3d(Sig(), vol, patch=(8, 8, 8), stride=(8, 8, 8)), vol.astype(np.uint8)
    )


def test_3d_bad_inputs() -> None:
    model = BinModel(2)
    with pytest.raises(M3HLInputError, match="3-D"):
        predict_volume_3d(model, np.zeros((4, 4), np.float32))
    bad = np.zeros((4, 4, 4), np.float32)
    bad[1, 1, 1] = np.inf
    with pytest.raises(M3HLInputError, match="NaN"):
        predict_volume_3d(model, bad, patch=(4, 4, 4), stride=(2, 2, 2))
    with pytest.raises(M3HLInputError, match="num_classes"):
        predict_volume_3d(model, np.zeros((4, 4, 4)), patch=(4, 4, 4), stride=(2, 2, 2), num_classes=3)
    with pytest.raises(M3HLInputError, match="stride"):
        predict_volume_3d(model, np.zeros((4, 4, 4)), patch=(4, 4, 4), stride=(0, 2, 2))
    with pytest.raises(M3HLInputError, match="stride"):
        predict_volume_3d(model, np.zeros((9, 9, 9)), patch=(4, 4, 4), stride=(5, 2, 2))
    with pytest.raises(M3HLInputError, match="device"):
        predict_volume_3d(model, np.zeros((4, 4, 4)), patch=(4, 4, 4), stride=(2, 2, 2), device="meta")


def test_largest_component() -> None:
    m = np.zeros((10, 10), bool)
    m[0:3, 0:3] = True  # 9
    m[5:9, 5:9] = True  # 16
    m[3, 3] = True  # diagonal neighbour of the 3x3 block -> joins it only with full connectivity
    out = largest_component(m)
    assert out.dtype == bool and out.sum() == 16
    assert largest_component(np.zeros((3, 3, 3))).sum() == 0
    d = np.zeros((6, 6), bool)
    d[0, 0] = d[1, 1] = d[2, 2] = True
    d[4:6, 4] = True
    assert largest_component(d).sum() == 3  # diagonal chain connected (full connectivity)
    assert largest_component(d, connectivity=1).sum() == 2
    single = np.zeros((4, 4, 4), bool)
    single[1:3, 1:3, 1:3] = True
    np.testing.assert_array_equal(largest_component(single), single)
