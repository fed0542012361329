"""The GPU-pace code paths, checked on the CPU (issue 22): the training set held
on the device (its batches equal the host loader's), the whole-step capture
flag (falls back to the eager step off CUDA, and the capturable step function
computes the eager step), the foreach EMA, the GPU planner's dry run."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_m3hl.config import load_preset
from napari_m3hl.data.device import DeviceSlices, DeviceVolumes, device_sets, use_device_data
from napari_m3hl.data.phantom_source import phantom_train_data
from napari_m3hl.errors import M3HLInputError
from napari_m3hl.method.augment import augment_2d_batched, prepare_batch_2d, prepare_batch_3d, resize_2d
from napari_m3hl.method.components import (connected_components_torch, largest_component_per_class_rounds,
                                           largest_component_per_class_torch)
from napari_m3hl.method.mixing import block_masks
from napari_m3hl.method.networks import build_network
from napari_m3hl.method.step import StepSetup, m3hl_losses
from napari_m3hl.method.teacher import ema_update, init_teacher
from napari_m3hl.training import events as ev
from napari_m3hl.training.capture import (GraphStep, ensure_momentum_buffers, resolve_capture,
                                          sgd_step_, step_function)
from napari_m3hl.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (6, 48, 48)
SMALL = dict(patch_size=(48, 48), block_size=(12, 12), batch_size=8, device="cpu", precision="fp32",
             checkpoint_every=0)


@pytest.fixture(scope="module")
def phantom():
    return phantom_train_data(n_volumes=2, labeled_slices_per_volume=3, seed=0, shape=SHAPE)


def _slices(n: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    sizes = [(40, 30), (25, 50), (64, 64), (50, 50)]
    return [(rng.random(sizes[i % 4]).astype(np.float32), rng.integers(0, 4, sizes[i % 4]).astype(np.uint8))
            for i in range(n)]


# ------------------------------------------------------------------ data on the device
@pytest.mark.parametrize("interp", ["bilinear", "nearest"])
def test_device_slices_batch_equals_the_host_loader(interp):
    """Same samples, same generator state: the same batch, bit for bit (so the
    device set changes where the work runs, not what is trained)."""
    samples = _slices(16)
    dev = DeviceSlices(samples, (48, 48), "cpu", labeled=True, image_interp=interp, num_classes=4)
    assert dev.images.shape == (16, 1, 48, 48) and dev.images.dtype == torch.float32
    assert dev.labels.shape == (16, 48, 48) and dev.labels.dtype == torch.uint8
    for seed, idx in ((0, [3, 1, 4, 1, 5, 9, 2, 6]), (1, list(range(16)))):
        g_host, g_dev = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        ih, lh = prepare_batch_2d([samples[i] for i in idx], (48, 48), g_host, image_interp=interp)
        idv, ldv = dev.batch(idx, g_dev)
        assert idv.dtype == torch.float32 and ldv.dtype == torch.int64 and idv.shape == (len(idx), 1, 48, 48)
        assert torch.equal(ih, idv) and torch.equal(lh, ldv)
        assert torch.equal(g_host.get_state(), g_dev.get_state())  # the same draws were made
    unl = DeviceSlices(samples, (48, 48), "cpu", labeled=False)
    g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    iu, lu = unl.batch([0, 7], g1)
    ih, _ = prepare_batch_2d([(samples[i][0], None) for i in (0, 7)], (48, 48), g2)
    assert lu is None and unl.labels is None and torch.equal(iu, ih)


def test_device_slices_non_square_patch_equals_the_host_loader():
    samples = _slices(6)
    dev = DeviceSlices(samples, (32, 40), "cpu", num_classes=4)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    img, lab = dev.batch(range(6), g1)
    ih, lh = prepare_batch_2d(samples, (32, 40), g2)
    assert img.shape == (6, 1, 32, 40) and torch.equal(img, ih) and torch.equal(lab, lh)


def test_batched_augmentation_keeps_image_and_label_aligned():
    """Each output sample is one of the 8 rot90/flip variants, a rotation, or
    unchanged, and its label went through the same transform: a label that
    is a function of the image (here: the image's own quantisation) stays so."""
    h = 32
    img = torch.arange(h * h, dtype=torch.float32).reshape(1, 1, h, h) / (h * h)
    lab = (img[:, 0] * 4).long().clamp(max=3)
    b = 64
    g = torch.Generator().manual_seed(7)
    out_img, out_lab = augment_2d_batched(img.expand(b, 1, h, h).clone(), lab.expand(b, h, h).clone(), g)
    variants = [torch.flip(torch.rot90(img[0, 0], k, dims=(0, 1)), dims=(a,)) for k in range(4) for a in range(2)]
    exact = 0
    for i in range(b):
        if any(torch.equal(out_img[i, 0], v) for v in variants) or torch.equal(out_img[i, 0], img[0, 0]):
            exact += 1
            assert torch.equal(out_lab[i], (out_img[i, 0] * 4).long().clamp(max=3))
        else:  # a small rotation (bilinear image, nearest label): aligned up to one quantisation step
            inside = out_img[i, 0] > 0
            quant = (out_img[i, 0] * 4).long().clamp(max=3)
            assert ((quant - out_lab[i]).abs()[inside] <= 1).float().mean() > 0.98
            assert (quant == out_lab[i])[inside].float().mean() > 0.9
    assert 0.6 * b <= exact < b  # rot90/flip (p 0.5) and unchanged (p 0.25) are exact; rotations are not


def test_device_slices_deterministic_and_hold_every_sample():
    samples = _slices(10)
    dev = DeviceSlices(samples, (48, 48), "cpu", num_classes=4)
    a = dev.batch(range(10), torch.Generator().manual_seed(3))
    b = dev.batch(range(10), torch.Generator().manual_seed(3))
    c = dev.batch(range(10), torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    # every sample of the set is held, resized to the patch as the host loader resizes it before augmenting
    for i, (img, lab) in enumerate(samples):
        ref_img, ref_lab = resize_2d(torch.from_numpy(img)[None, None], torch.from_numpy(lab.astype(np.int64))[None],
                                     (48, 48))
        assert torch.equal(dev.images[i], ref_img[0]) and torch.equal(dev.labels[i].long(), ref_lab[0])


def test_device_volumes_batch_equals_the_host_loader():
    rng = np.random.default_rng(0)
    cases = [(rng.random(s).astype(np.float32), rng.integers(0, 2, s).astype(np.uint8))
             for s in [(20, 24, 10), (16, 16, 16), (30, 18, 12)]]
    patch = (16, 16, 12)  # padding along some axes, cropping along others
    dev = DeviceVolumes(cases, patch, "cpu", labeled=True, num_classes=2)
    for seed in range(4):
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        idx = [2, 0, 1, 2]
        img, lab = dev.batch(idx, g1)
        ih, lh = prepare_batch_3d([cases[i] for i in idx], patch, g2)
        assert img.shape == (4, 1, *patch) and img.dtype == torch.float32 and lab.dtype == torch.int64
        assert torch.equal(img, ih) and torch.equal(lab, lh)
    unl = DeviceVolumes(cases, patch, "cpu", labeled=False)
    img, lab = unl.batch([1], torch.Generator().manual_seed(0))
    assert lab is None and img.shape == (1, 1, *patch)


def test_data_on_device_choice():
    cpu = torch.device("cpu")
    assert use_device_data("off", cpu, 10)[0] is False
    assert use_device_data("on", cpu, 10)[0] is True
    use, why = use_device_data("auto", cpu, 10)
    assert not use and "host loader on cpu" in why
    with pytest.raises(M3HLInputError, match="data_on_device"):
        load_preset("acdc_unet2d", "paper", data_on_device="gpu")
    # YAML (presets, --set KEY=VALUE) reads on / off as booleans: they mean the words
    cfg = load_preset("acdc_unet2d", "paper", data_on_device=True, capture=False)
    assert (cfg.data_on_device, cfg.capture) == ("on", "off")


def test_device_data_trains_exactly_as_the_host_loader(phantom, caplog):
    """The trainer's step on device-held data: the same losses, step by step,
    and the same weights as with the host loader (M³HL and a warm start)."""
    cfg = load_preset("acdc_unet2d", "fast", iterations=6, warm_start=2, **SMALL)
    runs = {}
    for mode in ("off", "on"):
        with caplog.at_level(logging.INFO):
            evs = list(train(cfg.replace(data_on_device=mode), phantom))
        runs[mode] = [e.losses for e in evs if isinstance(e, ev.Progress)]
    assert len(runs["on"]) == 6 and runs["on"] == runs["off"]
    assert "data_on_device=on" in caplog.text
    sets = device_sets(phantom.labeled, phantom.unlabeled, cfg.replace(data_on_device="on"), torch.device("cpu"))
    assert len(sets[0]) == len(phantom.labeled) and len(sets[1]) == len(phantom.unlabeled)
    assert device_sets(phantom.labeled, phantom.unlabeled, cfg, torch.device("cpu")) is None  # auto on the CPU


# ------------------------------------------------------------------ a step without host work
def test_capture_falls_back_on_cpu_and_trains_as_eager(phantom, caplog):
    cfg = load_preset("acdc_unet2d", "fast", iterations=4, warm_start=1, **SMALL)
    eager = [e.losses for e in train(cfg, phantom) if isinstance(e, ev.Progress)]
    for mode in ("cuda-graph", "compile", "auto"):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            got = [e.losses for e in train(cfg.replace(capture=mode), phantom) if isinstance(e, ev.Progress)]
        assert got == eager, mode  # bit for bit: the fallback is the eager step
        assert f"capture={mode} needs a CUDA device" in caplog.text
    assert resolve_capture("cuda-graph", torch.device("cpu")) == (
        "off", "capture=cuda-graph needs a CUDA device; training on cpu runs the eager step")
    assert resolve_capture("off", torch.device("cpu")) == ("off", "")
    with pytest.raises(M3HLInputError, match="capture"):
        load_preset("acdc_unet2d", "paper", capture="graph")


def test_sgd_step_equals_torch_sgd():
    torch.manual_seed(0)
    a = build_network("unet2d", 1, 4)
    b = build_network("unet2d", 1, 4)
    b.load_state_dict(a.state_dict())
    oa = torch.optim.SGD(a.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    ob = torch.optim.SGD(b.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    ensure_momentum_buffers(ob)
    x = torch.rand(2, 1, 32, 32)
    for lr in (0.01, 0.005, 0.002):
        for net, opt in ((a, oa), (b, ob)):
            opt.zero_grad(set_to_none=True)
            torch.manual_seed(1)
            net(x).logits.square().mean().backward()
        for g in oa.param_groups:
            g["lr"] = lr
        oa.step()
        sgd_step_(ob, torch.tensor(lr))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(oa.state[pa]["momentum_buffer"], ob.state[pb]["momentum_buffer"],
                                   rtol=1e-5, atol=1e-7)
    assert set(ob.state_dict()["state"][0]) == {"momentum_buffer"}  # checkpoints hold torch's own state


def _nets(cfg, seed=0):
    torch.manual_seed(seed)
    s, t = build_network("unet2d", 1, 4), build_network("unet2d", 1, 4)
    init_teacher(t, s, "copy")
    return s, t, torch.optim.SGD(s.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def test_capturable_step_function_computes_the_eager_step(phantom):
    """The function a CUDA graph captures (masks, lr, α and the EMA decay as
    tensors, fixed rounds of components, foreach SGD), run eagerly on the CPU,
    gives the eager trainer step's losses and weights, step after step."""
    cfg = load_preset("acdc_unet2d", "paper", **SMALL)
    setup = StepSetup.from_config(cfg, torch.device("cpu"))
    sets = device_sets(phantom.labeled, phantom.unlabeled, cfg.replace(data_on_device="on"), torch.device("cpu"))
    s1, t1, o1 = _nets(cfg)
    s2, t2, o2 = _nets(cfg)
    ensure_momentum_buffers(o2)
    fn = step_function(cfg, s2, t2, o2, setup.autocast, m3hl=True, ema_buffers=cfg.teacher_bn)
    g_data = torch.Generator().manual_seed(0)
    n = cfg.batch_size // 4
    for step, (lr, alpha, decay) in enumerate([(0.01, 0.5, 0.99), (0.008, 0.3, 0.95), (0.005, 0.5, 0.9)]):
        img_l, lab_l = sets[0].batch([step % len(sets[0]), (step + 1) % len(sets[0]), 0, 1], g_data)
        img_u, _ = sets[1].batch([2 * step, 2 * step + 1, 3, 4], g_data)
        g1, g2 = torch.Generator().manual_seed(step), torch.Generator().manual_seed(step)
        torch.manual_seed(100 + step)  # dropout
        res = m3hl_losses(cfg, s1, t1, img_l, lab_l, img_u, g1, setup.autocast, alpha)
        for gr in o1.param_groups:
            gr["lr"] = lr
        o1.zero_grad(set_to_none=True)
        res.losses["total"].backward()
        o1.step()
        ema_update(t1, s1, decay, cfg.teacher_bn)

        mask = block_masks(n, (48, 48), cfg.block_size, cfg.mask_ratio, generator=g2)
        torch.manual_seed(100 + step)
        o2.zero_grad(set_to_none=True)
        out = fn({"img_l": img_l, "lab_l": lab_l, "img_u": img_u, "mask": mask, "lr": torch.tensor(lr),
                  "alpha": torch.tensor(alpha), "decay": torch.tensor(decay)})
        assert bool(out["lcc_converged"])
        for k, v in res.losses.items():
            torch.testing.assert_close(out[k], v.detach(), rtol=1e-5, atol=1e-6)
        assert out["preview_images"].shape == (2, 48, 48)
    for a, b in zip(list(s1.parameters()) + list(t1.parameters()) + list(t1.buffers()),
                    list(s2.parameters()) + list(t2.parameters()) + list(t2.buffers())):
        # The two paths sum in different orders (foreach SGD, fused EMA), and CPU kernels differ in
        # float32 rounding by instruction set: after three steps a weight near zero may differ by a few
        # 1e-6 (1.7e-6 on an AVX2-only CPU). A learning rate 10 % off moves some weights by 3e-4.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_components_in_fixed_rounds_equal_the_converged_ones():
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 4, (3, 40, 40))).long()
    labels[:, 5:30, 5:30] = 2  # one large blob per sample
    ref = largest_component_per_class_torch(labels, 4)
    fixed, converged = largest_component_per_class_rounds(labels, 4, rounds=64)
    assert bool(converged) and torch.equal(fixed, ref)
    # too few rounds for a long snake: reported, never hidden
    snake = torch.zeros(1, 33, 33, dtype=torch.long)
    for r in range(0, 33, 4):
        snake[0, r, :] = 1
        snake[0, r:r + 4, 32 if (r // 4) % 2 == 0 else 0] = 1
    _, converged = largest_component_per_class_rounds(snake, 2, rounds=2)
    assert not bool(converged)
    full = connected_components_torch(snake[:, :, :] > 0)
    assert full[snake > 0].unique().numel() == 1  # the convergence-tested version finds one component


# ------------------------------------------------------------------ EMA
def test_foreach_ema_equals_the_state_dict_ema():
    """``ema_update(buffers="ema")`` (torch._foreach_lerp_) computes the EMA the
    authors' code computes by rebuilding the state dict, for a float and a
    0-d tensor decay (the captured step's)."""
    torch.manual_seed(0)
    s, t = build_network("unet2d", 1, 4), build_network("unet2d", 1, 4)
    s(torch.rand(2, 1, 32, 32))  # BatchNorm statistics move
    ref = build_network("unet2d", 1, 4)
    ref.load_state_dict(t.state_dict())
    for decay in (0.99, torch.tensor(0.9)):
        sd_s, sd_r = s.state_dict(), ref.state_dict()
        d = float(decay)
        ref.load_state_dict({k: (d * sd_r[k] + (1 - d) * sd_s[k]) if sd_s[k].is_floating_point() else sd_s[k]
                             for k in sd_s})
        ema_update(t, s, decay, "ema")
        for k, v in t.state_dict().items():
            torch.testing.assert_close(v, ref.state_dict()[k], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ the GPU window planner
def test_acdc_gpu_plan_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    cost = {"device": "cuda", "device_name": "NVIDIA H200",
            "rows": [{"batch": 24, "median_s": {"fast": 0.025, "supervised_fast": 0.011}, "data_batch_s": 0.0}]}
    (tmp_path / "cost.json").write_text(json.dumps(cost))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "acdc_gpu.py"), "--plan", "--cost",
                          str(tmp_path / "cost.json"), "--window", "600", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout.split("PLAN ", 1)[1])
    assert plan["groups"][:3] == ["sup7", "m3hl_fast", "sup70"] and plan["processes"] == 3 * len(plan["groups"])
    assert plan["serial_s"] <= 600 and plan["n7"] >= 50 and len(plan["commands"]) == plan["processes"]
    assert all("--run-one" in c for c in plan["commands"])
    assert not (tmp_path / "o").exists() and not (ROOT / "runs" / "acdc_gpu_plan_check").exists()


# ------------------------------------------------------------------ on a CUDA device (scripts/test_gpu.sh)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/test_gpu.sh)")


@CUDA
def test_device_slices_on_cuda_match_the_host_loader():
    samples = _slices(16)
    dev = DeviceSlices(samples, (48, 48), "cuda", num_classes=4)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    img, lab = dev.batch(range(16), g1)
    ih, lh = prepare_batch_2d(samples, (48, 48), g2)
    assert img.is_cuda and lab.is_cuda
    torch.testing.assert_close(img.cpu(), ih, rtol=0, atol=1e-5)
    assert (lab.cpu() == lh).float().mean() > 0.995  # nearest sampling may round a border pixel differently


@CUDA
def test_graph_step_replays_the_eager_step():
    """GraphStep over a step with no randomness (a linear layer, foreach SGD with
    a tensor lr, the EMA with a tensor decay): warm-up calls, the capture and
    the replays give the eager run's losses and weights."""
    def make():
        torch.manual_seed(0)
        net = torch.nn.Linear(16, 4).cuda()
        ema = torch.nn.Linear(16, 4).cuda()
        ema.load_state_dict(net.state_dict())
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        ensure_momentum_buffers(opt)
        return net, ema, opt

    def fn_of(net, ema, opt):
        def fn(x):
            loss = (net(x["x"]) - x["y"]).square().mean()
            loss.backward()
            sgd_step_(opt, x["lr"])
            ema_update(ema, net, x["decay"], "copy")
            return {"total": loss.detach()}
        return fn

    a, b = make(), make()
    fa, fb = fn_of(*a), fn_of(*b)
    graph = GraphStep(fb, lambda: b[2].zero_grad(set_to_none=True), warmup=2)
    g = torch.Generator(device="cuda").manual_seed(0)
    for step in range(7):
        x = {"x": torch.randn(8, 16, device="cuda", generator=g), "y": torch.randn(8, 4, device="cuda", generator=g),
             "lr": torch.tensor(0.1 / (1 + step), device="cuda"), "decay": torch.tensor(0.9, device="cuda")}
        a[2].zero_grad(set_to_none=True)
        ref = fa(x)
        got = graph(x)
        torch.testing.assert_close(got["total"], ref["total"])
    assert graph.graph is not None
    for p, q in zip(list(a[0].parameters()) + list(a[1].parameters()), list(b[0].parameters()) + list(b[1].parameters())):
        torch.testing.assert_close(p, q)


@CUDA
def test_captured_training_on_cuda_follows_eager(phantom):
    cfg = load_preset("acdc_unet2d", "fast", iterations=12, warm_start=4, readback_every=1,
                      **{**SMALL, "device": "cuda"})
    eager = [e.losses["total"] for e in train(cfg, phantom) if isinstance(e, ev.Progress)]
    graph = [e.losses["total"] for e in train(cfg.replace(capture="cuda-graph"), phantom) if isinstance(e, ev.Progress)]
    assert len(graph) == len(eager) == 12 and np.all(np.isfinite(graph))
    # the first three steps run eagerly inside GraphStep (its warm-up): the same as eager up to rounding
    np.testing.assert_allclose(graph[:3], eager[:3], rtol=1e-3)
    # later steps draw dropout differently inside the graph; the losses stay alike
    assert abs(np.mean(graph[-4:]) - np.mean(eager[-4:])) < 0.3 * np.mean(eager[-4:])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a CUDA device")
def test_gpu_suite_script_refuses_without_cuda(tmp_path):
    out = subprocess.run(["bash", str(ROOT / "scripts" / "test_gpu.sh"), str(tmp_path / "junit.xml")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert out.returncode != 0 and "no CUDA device" in out.stderr and "scripts/test.sh" in out.stderr
    assert not (tmp_path / "junit.xml").exists()
