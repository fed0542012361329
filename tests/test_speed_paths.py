"""The speed paths (fp32, bf16 autocast, channels_last, loss read-back every N
steps) train and predict correctly, and the device connected components
equal scipy's with full connectivity."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_m3hl.training import events as ev
from napari_m3hl import runtime
from napari_m3hl.io.checkpoint import load_model
from napari_m3hl.config import load_preset
from napari_m3hl.data.phantom_source import phantom_train_data, phantom_val_volumes
from napari_m3hl.errors import M3HLInputError
from napari_m3hl.inference.slices2d import predict_volume_2d
from napari_m3hl.inference.window3d import predict_volume_3d
from napari_m3hl.metrics.binary import dice
from napari_m3hl.method.networks import build_network
from napari_m3hl.method.components import (
    connected_components_torch, largest_component_per_class, largest_component_per_class_torch,
)
from napari_m3hl.method.teacher import pseudo_labels
from napari_m3hl.method.step import StepSetup
from napari_m3hl.training.trainer import train

SHAPE = (8, 64, 64)
PATHS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


# ------------------------------------------------------------ connected components
def _same_partition(ours: np.ndarray, mask: np.ndarray) -> None:
    """``ours`` labels the same components as scipy with full connectivity, numbered alike."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    ref, n = ndimage.label(mask, structure=structure)
    assert ((ours == 0) == (ref == 0)).all()
    fg = ref > 0
    pairs = set(zip(ours[fg].tolist(), ref[fg].tolist()))
    assert len(pairs) == n == len(np.unique(ours[fg]))  # a bijection between the two labellings
    # ordered like scipy's (first met in raster order)
    order = sorted(pairs)
    assert [r for _, r in order] == list(range(1, n + 1))


@pytest.mark.parametrize("shape", [(3, 40, 37), (2, 9, 12, 11)])
@pytest.mark.parametrize("p", [0.2, 0.45, 0.6])
def test_torch_components_equal_scipy_full_connectivity(shape, p):
    rng = np.random.default_rng(int(p * 100) + len(shape))
    mask = rng.random(shape) < p
    ours = connected_components_torch(torch.from_numpy(mask), check_every=3).numpy()
    for i in range(shape[0]):
        _same_partition(ours[i], mask[i])


@pytest.mark.parametrize("shape", [(4, 33, 30), (2, 10, 9, 12)])
def test_largest_component_per_class_torch_equals_numpy(shape):
    rng = np.random.default_rng(len(shape))
    for num_classes in (2, 4):
        labels = rng.integers(0, num_classes, shape)
        labels[0, :3] = 1  # a class with one big component
        cpu = largest_component_per_class(labels, num_classes)
        dev = largest_component_per_class_torch(torch.from_numpy(labels), num_classes).numpy()
        np.testing.assert_array_equal(dev, cpu)
        assert dev.dtype == labels.dtype


def test_full_connectivity_joins_diagonal_neighbours():
    lab = np.zeros((1, 8, 8), np.int64)
    lab[0, 1, 1] = lab[0, 2, 2] = lab[0, 3, 3] = 1  # a diagonal line: one component with 8-connectivity
    lab[0, 6, 6] = 1  # a single pixel: smaller
    out = largest_component_per_class(lab, 2)
    assert out[0, 1, 1] == out[0, 2, 2] == out[0, 3, 3] == 1 and out[0, 6, 6] == 0
    np.testing.assert_array_equal(largest_component_per_class_torch(torch.from_numpy(lab), 2).numpy(), out)
    vol = np.zeros((1, 4, 4, 4), np.int64)
    vol[0, 0, 0, 0] = vol[0, 1, 1, 1] = 1  # corner neighbours in 3D (26-connectivity)
    vol[0, 3, 3, 3] = 1
    out3 = largest_component_per_class(vol, 2)
    assert out3[0, 0, 0, 0] == out3[0, 1, 1, 1] == 1 and out3[0, 3, 3, 3] == 0


def test_pseudo_labels_on_device_equal_host():
    logits = torch.randn(3, 4, 48, 40)
    np.testing.assert_array_equal(pseudo_labels(logits, on_device=True).numpy(),
                                  pseudo_labels(logits, on_device=False).numpy())


# ------------------------------------------------------------ precision and threads
def test_resolve_precision(monkeypatch):
    cpu = torch.device("cpu")
    assert runtime.resolve_precision("fp32", cpu) is None
    assert runtime.resolve_precision("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx2", "avx512f"})
    assert runtime.resolve_precision("auto", cpu) is None  # no native bf16: fp32
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert runtime.resolve_precision("auto", cpu) is torch.bfloat16
    with pytest.raises(M3HLInputError, match="precision"):
        runtime.resolve_precision("fp16", cpu)
    cfg = load_preset("acdc_unet2d", "paper", device="cpu", amp=False)  # amp off forces fp32
    assert StepSetup.from_config(cfg, cpu).amp_dtype is None
    with pytest.raises(M3HLInputError, match="precision"):
        load_preset("acdc_unet2d", "paper", precision="half")


def test_set_threads_roles(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
        assert runtime.set_threads("cli") == 4 and torch.get_num_threads() == 4
        assert runtime.set_threads("gui") == 3
        assert runtime.set_threads("gui_fewslice") == 4  # the widget's few-slice Train takes every core
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
        assert runtime.set_threads("gui") == 1  # never 0
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert runtime.set_threads("gui") == 2  # the user's explicit choice wins
        with pytest.raises(ValueError):
            runtime.set_threads("server")
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------ each path trains and predicts
@pytest.fixture(scope="module")
def phantom():
    data = phantom_train_data(n_volumes=3, labeled_slices_per_volume=3, seed=0, shape=SHAPE)
    val = phantom_val_volumes(1, seed=500, shape=SHAPE)
    return data, val


def _score(model, val, **kw):
    return float(np.mean([[dice(predict_volume_2d(model, img, patch=(64, 64), **kw) == c, lab == c) for c in (1, 2, 3)]
                          for _, img, lab in val]))


@pytest.mark.parametrize("precision,channels_last", PATHS)
def test_each_path_trains_and_predicts(phantom, one_batch, tmp_path, precision, channels_last):
    """Each path trains: with one batch repeated at every step (``one_batch``:
    seeded, deterministic algorithms) 30 M³HL steps bring the loss under half
    its first value (measured 0.29 of it in every path); and its checkpoint
    predicts in the path's own precision and layout what it predicts in fp32,
    up to rounding."""
    data, val = phantom
    cfg = load_preset("acdc_unet2d", "paper", patch_size=(64, 64), block_size=(16, 16), batch_size=8, lr=0.01,
                      iterations=30, device="cpu", precision=precision, channels_last=channels_last,
                      checkpoint_every=0, data_on_device="off")
    evs = list(train(cfg, data, tmp_path))
    losses = [e.losses["total"] for e in evs if isinstance(e, ev.Progress)]
    assert len(losses) == 30 and np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.5 * losses[0], (precision, channels_last, losses)
    student, _ = load_model(evs[-1].checkpoint)
    for _, img, _ in val:
        ref, p32 = predict_volume_2d(student, img, patch=(64, 64), precision="fp32", channels_last=False,
                                     return_probs=True)
        lab, prob = predict_volume_2d(student, img, patch=(64, 64), precision=precision,
                                      channels_last=channels_last, return_probs=True)
        assert np.abs(prob - p32).max() < 0.05, (precision, channels_last)  # bf16 rounds to ~3 digits
        top2 = np.sort(p32, axis=0)[-2:]
        clear = top2[1] - top2[0] > 0.1  # away from near-ties, rounding cannot flip the class
        np.testing.assert_array_equal(lab[clear], ref[clear])


def test_paths_compute_the_same_network_and_losses(phantom):
    """bf16 and channels_last change the numbers only by rounding: the same
    network gives the same logits in every path (eval mode), and the first
    training step's loss agrees (dropout masks differ with the memory layout,
    hence the looser bound there)."""
    torch.manual_seed(0)
    net = build_network("unet2d", 1, 4).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        ref = net(x).logits
        net_cl = build_network("unet2d", 1, 4).eval()
        net_cl.load_state_dict(net.state_dict())
        net_cl.to(memory_format=torch.channels_last)
        cl = net_cl(x.contiguous(memory_format=torch.channels_last)).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf = net_cl(x.contiguous(memory_format=torch.channels_last)).logits.float()
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)
    assert (bf - ref).abs().max() < 0.05 * ref.abs().max()
    assert (bf.argmax(1) == ref.argmax(1)).float().mean() > 0.97

    data, _ = phantom
    first = {}
    for precision, cl_ in PATHS:
        cfg = load_preset("acdc_unet2d", "paper", patch_size=(64, 64), block_size=(16, 16), batch_size=4,
                          iterations=1, device="cpu", precision=precision, channels_last=cl_)
        first[(precision, cl_)] = next(e for e in train(cfg, data) if isinstance(e, ev.Progress)).losses["total"]
    for key, value in first.items():
        assert value == pytest.approx(first[("fp32", False)], rel=0.03), key


def test_readback_every_n_steps(phantom):
    data, _ = phantom
    cfg = load_preset("acdc_unet2d", "paper", patch_size=(64, 64), block_size=(16, 16), batch_size=4,
                      iterations=5, device="cpu", readback_every=2, precision="fp32")
    every1 = [e for e in train(cfg.replace(readback_every=1), data) if isinstance(e, ev.Progress)]
    every2 = [e for e in train(cfg, data) if isinstance(e, ev.Progress)]
    assert [e.iteration for e in every1] == [1, 2, 3, 4, 5]
    assert [e.iteration for e in every2] == [2, 4, 5]  # and always the last step
    # the read-back reports the mean over its window; the training itself is unchanged
    assert every2[0].losses["total"] == pytest.approx((every1[0].losses["total"] + every1[1].losses["total"]) / 2,
                                                      rel=1e-5)
    assert every2[-1].losses["total"] == pytest.approx(every1[-1].losses["total"], rel=1e-5)


def test_divergence_found_inside_a_readback_window(phantom, monkeypatch):
    """The loss turns NaN at step 2 (a stubbed step: a certain divergence, not
    a large learning rate's chance); the read-back after step 3 names step 2."""
    from napari_m3hl.training import trainer

    data, _ = phantom
    real, steps = trainer.m3hl_losses, []

    def nan_at_step_2(*args, **kwargs):
        res = real(*args, **kwargs)
        steps.append(1)
        if len(steps) == 2:
            res.losses["total"] = res.losses["total"] * float("nan")
        return res

    monkeypatch.setattr(trainer, "m3hl_losses", nan_at_step_2)
    cfg = load_preset("acdc_unet2d", "paper", patch_size=(64, 64), block_size=(16, 16), batch_size=4,
                      iterations=6, device="cpu", readback_every=3, precision="fp32")
    progress = []
    with pytest.raises(FloatingPointError, match="diverged at iteration 2 "):
        for e in train(cfg, data):
            progress.append(e)
    assert not [e for e in progress if isinstance(e, ev.Progress)] and len(steps) == 3


def test_3d_window_sums_on_device_match_fp32_reference():
    net = build_network("vnet3d", 1, 2).eval()
    vol = np.random.default_rng(0).random((20, 24, 18)).astype(np.float32)
    labels, probs = predict_volume_3d(net, vol, patch=(16, 16, 16), stride=(8, 8, 4), return_probs=True)
    assert labels.shape == vol.shape and probs.shape == (2, *vol.shape)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
