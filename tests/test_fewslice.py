"""The few-slice loop's engine: config from the start model, safeguard, merged export, a tiny fine-tune."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_m3hl.training import events as ev
from napari_m3hl.fewslice import loop as fs
from napari_m3hl.io.checkpoint import load_checkpoint, make_payload, save_checkpoint, unfinished_note
from napari_m3hl.config import TrainConfig, load_preset
from napari_m3hl.data.phantom_source import phantom_train_data
from napari_m3hl.errors import M3HLInputError
from napari_m3hl.method.networks import build_network
from napari_m3hl.data.phantom import make_phantom
from napari_m3hl.fewslice.safeguard import check_finetune, merge_painted
from napari_m3hl.training.trainer import train

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "acdc70_unet2d.pt"
SHAPE = (6, 64, 64)


def _start_model(path: Path, patch=(32, 32), interp="nearest") -> Path:
    """A small start model file (random weights) with its own input size and resizing."""
    torch.manual_seed(0)
    cfg = TrainConfig(patch_size=patch, block_size=(8, 8), image_interp=interp, batch_size=4, iterations=10)
    return save_checkpoint(path, make_payload(cfg, build_network("unet2d", 1, 4)))


def _painted(label: np.ndarray, slices) -> np.ndarray:
    p = np.zeros_like(label)
    p[list(slices)] = label[list(slices)]
    return p


def test_config_inherits_the_start_models_input(tmp_path):
    start = _start_model(tmp_path / "start.pt", patch=(48, 40), interp="nearest")
    opts = fs.FewSliceOptions(iterations=7, lr=0.003, batch_size=4, mode="m3hl", l2_to_start=0.1, freeze="encoder")
    cfg = fs.fewslice_config(load_checkpoint(start), opts)
    assert cfg.patch_size == (48, 40) and cfg.image_interp == "nearest" and cfg.block_size == (8, 8)
    assert (cfg.iterations, cfg.lr, cfg.batch_size, cfg.mode) == (7, 0.003, 4, "m3hl")
    assert (cfg.l2_to_start, cfg.freeze, cfg.lr_schedule, cfg.teacher_init) == (0.1, "encoder", "constant", "copy")


@pytest.mark.skipif(not SHIPPED.is_file(), reason="shipped model models/acdc70_unet2d.pt not in this checkout")
def test_config_of_the_shipped_model_keeps_its_own_input_size():
    ckpt = load_checkpoint(SHIPPED)
    cfg = fs.fewslice_config(ckpt, fs.FewSliceOptions())
    assert cfg.patch_size == tuple(ckpt["patch_size"]) == tuple(ckpt["config"]["patch_size"])  # never rescaled
    assert cfg.image_interp == ckpt["config"]["image_interp"]
    assert cfg.iterations == fs.FewSliceOptions().iterations < 1000  # not the preset's 30,000


def test_prepare_rejects_bad_painting(tmp_path):
    start = _start_model(tmp_path / "start.pt")
    ph = make_phantom(0, shape=SHAPE)
    with pytest.raises(M3HLInputError, match="4 classes"):
        fs.prepare(start, ph.image, _painted(ph.label, [2]) * 3, fs.FewSliceOptions())
    with pytest.raises(M3HLInputError, match="one shape"):
        fs.prepare(start, ph.image, ph.label[:3], fs.FewSliceOptions())
    with pytest.raises(M3HLInputError, match="paint at least one slice"):
        fs.prepare(start, ph.image, np.zeros_like(ph.label), fs.FewSliceOptions())


def _damage(label: np.ndarray, cls: int, slices) -> np.ndarray:
    out = label.copy()
    for z in slices:
        out[z][out[z] == cls] = 0
    return out


def test_safeguard_passes_a_good_fine_tune():
    truth = make_phantom(1, shape=(8, 64, 64)).label
    painted = _painted(truth, [2, 5])
    base = np.roll(truth, 2, axis=2)  # the start model is a little off everywhere
    v = check_finetune(base, truth, painted, 4, ("bg", "RV", "Myo", "LV"))
    assert not v.suspect and v.painted_tuned > v.painted_base
    assert "no sign" in v.message


def test_safeguard_fires_when_painted_slices_get_worse():
    truth = make_phantom(1, shape=(8, 64, 64)).label
    painted = _painted(truth, [2, 5])
    tuned = _damage(truth, 2, [2, 5])  # loses Myo on the slices it was trained on
    v = check_finetune(truth, tuned, painted, 4, ("bg", "RV", "Myo", "LV"))
    assert v.suspect and "painted slices worse" in v.message and v.painted_tuned < v.painted_base


def test_safeguard_fires_when_unpainted_slices_change_too_much():
    truth = make_phantom(1, shape=(8, 64, 64)).label
    painted = _painted(truth, [2, 5])
    tuned = _damage(truth, 2, [0, 1, 3, 4, 6, 7])  # fits the painted slices, wipes Myo elsewhere
    v = check_finetune(truth, tuned, painted, 4, ("bg", "RV", "Myo", "LV"))
    assert v.suspect and "Myo" in v.message and v.drift["Myo"] == pytest.approx(1.0)


def test_merge_painted_keeps_painted_slices_exactly():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 4, size=(5, 16, 16)).astype(np.uint8)
    painted = np.zeros_like(pred)
    painted[1, 3:9, 3:9] = 2  # a partly painted slice: its zeros are the user's too
    painted[3] = rng.integers(0, 4, size=(16, 16))
    merged = merge_painted(pred, painted)
    assert np.array_equal(merged[[1, 3]], painted[[1, 3]])
    assert np.array_equal(merged[[0, 2, 4]], pred[[0, 2, 4]])
    assert merged.dtype == pred.dtype
    alone = merge_painted(pred, painted, keep_painted=False)
    assert np.array_equal(alone, pred) and alone is not pred
    with pytest.raises(M3HLInputError, match="one shape"):
        merge_painted(pred, painted[:2])


def test_tiny_fine_tune_through_the_engine(tmp_path):
    start = _start_model(tmp_path / "start.pt")
    ph = make_phantom(3, shape=SHAPE)
    opts = fs.FewSliceOptions(iterations=4, batch_size=4, check_every=2, device="cpu", mode="m3hl")
    job = fs.prepare(start, ph.image * 500.0, _painted(ph.label, [1, 4]), opts)  # any intensity range
    assert job.config.patch_size == (32, 32) and list(job.painted_slices) == [1, 4]
    assert float(job.image.min()) == 0.0 and float(job.image.max()) == 1.0
    assert job.base.shape == SHAPE
    out = list(fs.run(job, out_dir=tmp_path / "run"))
    checks = [e for e in out if isinstance(e, fs.Check)]
    assert [c.iteration for c in checks] == [2, 4] and np.isnan(checks[0].instability)
    assert checks[0].labels.shape == SHAPE and checks[0].labels.dtype == np.uint8
    res = out[-1]
    assert isinstance(res, fs.FewSliceResult) and res.iterations == 4 and not res.stopped_early
    assert np.array_equal(res.labels, checks[-1].labels) and res.checkpoint and Path(res.checkpoint).is_file()
    assert isinstance(res.verdict.message, str) and res.verdict.message
    assert any(isinstance(e, ev.TrainFinished) for e in out)


def test_early_stop_when_the_segmentation_stops_changing(tmp_path):
    start = _start_model(tmp_path / "start.pt")
    ph = make_phantom(3, shape=SHAPE)
    opts = fs.FewSliceOptions(iterations=8, batch_size=4, check_every=2, device="cpu", early_stop=True,
                              stop_change=1.01)  # any change counts as "stopped changing"
    out = list(fs.run(fs.prepare(start, ph.image, _painted(ph.label, [1, 4]), opts), out_dir=tmp_path / "run"))
    res = out[-1]
    assert res.stopped_early and res.iterations == 4 and res.checkpoint == str(tmp_path / "run" / "last.pt")
    assert [c.stopping for c in out if isinstance(c, fs.Check)] == [False, True]
    # the early stop is how such a run is meant to end: its checkpoint counts as a finished run's
    ckpt = load_checkpoint(res.checkpoint)
    assert ckpt["completed"] is True and ckpt["iteration"] == 4 and unfinished_note(ckpt, res.checkpoint) is None


def test_trainer_hooks_freeze_encoder_and_l2_to_start(tmp_path):
    data = phantom_train_data(n_volumes=1, labeled_slices_per_volume=2, seed=0, shape=SHAPE)
    start = _start_model(tmp_path / "start.pt")
    cfg = load_preset("acdc_unet2d", "paper", patch_size=(32, 32), block_size=(8, 8), batch_size=4, lr=0.05,
                      device="cpu", iterations=2, mode="supervised", freeze="encoder", l2_to_start=0.5)
    evs = list(train(cfg, data, tmp_path / "run", init_from=start))
    p = [e for e in evs if isinstance(e, ev.Progress)]
    assert "l2_start" in p[0].losses and p[0].losses["l2_start"] == pytest.approx(0.0)
    assert p[1].losses["l2_start"] > 0
    before, after = load_checkpoint(start)["student"], load_checkpoint(evs[-1].checkpoint)["student"]
    enc_w = [k for k in before if k.startswith("enc.") and k.endswith("weight") and before[k].ndim == 4]
    dec_w = [k for k in before if k.startswith("up.") and before[k].ndim == 4]
    assert enc_w and all(torch.equal(before[k], after[k]) for k in enc_w)
    assert any(not torch.equal(before[k], after[k]) for k in dec_w)
    with pytest.raises(M3HLInputError, match="freeze"):
        cfg.replace(freeze="decoder").validate()


def test_trainer_hook_keeps_batchnorm_statistics(tmp_path):
    data = phantom_train_data(n_volumes=1, labeled_slices_per_volume=2, seed=0, shape=SHAPE)
    start = _start_model(tmp_path / "start.pt")
    cfg = load_preset("acdc_unet2d", "paper", patch_size=(32, 32), block_size=(8, 8), batch_size=4, lr=0.05,
                      device="cpu", iterations=2, mode="supervised", freeze="bn")
    evs = list(train(cfg, data, tmp_path / "run", init_from=start))
    before, after = load_checkpoint(start)["student"], load_checkpoint(evs[-1].checkpoint)["student"]
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    assert evs[-1].iteration == 2 and all(np.isfinite(e.losses["total"]) for e in evs if isinstance(e, ev.Progress))


def test_freeze_bn_leaves_a_high_gain_batchnorm_training(tmp_path):
    """A frozen BatchNorm with a near-zero running variance multiplies every change of its input
    (the shipped model's first one by 58): SGD diverged. Such a layer keeps its batch statistics."""
    from napari_m3hl.training.trainer import MAX_FROZEN_BN_GAIN

    data = phantom_train_data(n_volumes=1, labeled_slices_per_volume=2, seed=0, shape=SHAPE)
    torch.manual_seed(0)
    cfg0 = TrainConfig(patch_size=(32, 32), block_size=(8, 8), batch_size=4, iterations=10)
    net = build_network("unet2d", 1, 4)
    state = net.state_dict()
    first = next(k for k in state if k.endswith("running_var"))
    state[first][0] = 1e-4  # gain 1/sqrt(1e-4 + 1e-5) ≈ 95
    net.load_state_dict(state)
    start = save_checkpoint(tmp_path / "start.pt", make_payload(cfg0, net))
    cfg = load_preset("acdc_unet2d", "paper", patch_size=(32, 32), block_size=(8, 8), batch_size=4, lr=0.05,
                      device="cpu", iterations=2, mode="supervised", freeze="bn")
    evs = list(train(cfg, data, tmp_path / "run", init_from=start))
    before, after = load_checkpoint(start)["student"], load_checkpoint(evs[-1].checkpoint)["student"]
    assert 1 / np.sqrt(1e-4 + 1e-5) > MAX_FROZEN_BN_GAIN
    assert not torch.equal(before[first], after[first])  # the high-gain layer trained its statistics
    others = [k for k in before if k.endswith("running_var") and k != first]
    assert others and all(torch.equal(before[k], after[k]) for k in others)


def test_fine_tune_checkpoint_segments_with_the_start_blend(tmp_path):
    """What the loop shows is what its checkpoint predicts (`m3hl predict`, the widget): the
    average of the start model's and the fine-tuned student's probabilities."""
    from napari_m3hl.inference.predictor import Predictor

    start = _start_model(tmp_path / "start.pt")
    ph = make_phantom(3, shape=SHAPE)
    opts = fs.FewSliceOptions(iterations=4, batch_size=4, check_every=2, device="cpu", start_blend=0.5,
                              start_blend_untrusted=0.5, start_blend_stable=0.5)  # a fixed weight, whatever happens
    job = fs.prepare(start, ph.image, _painted(ph.label, [1, 4]), opts)
    res = list(fs.run(job, out_dir=tmp_path / "run"))[-1]
    assert job.blend.weight == res.blend.weight == 0.5
    ckpt = load_checkpoint(res.checkpoint)
    assert ckpt["start_blend"] == 0.5 and set(ckpt["start"]) == set(load_checkpoint(start)["student"])
    blended = Predictor.from_checkpoint(res.checkpoint)
    assert blended.start_blend == 0.5
    np.testing.assert_array_equal(blended.predict(job.image), res.labels)
    alone = Predictor.from_checkpoint(res.checkpoint, blend=False)
    np.testing.assert_array_equal(alone.predict(job.image), res.network)
    _, p_start = Predictor.from_checkpoint(start).predict(job.image, return_probs=True)
    _, p_tuned = alone.predict(job.image, return_probs=True)
    np.testing.assert_array_equal((p_start + p_tuned).argmax(0), res.labels)


def test_a_start_model_that_misses_the_painted_slices_keeps_the_untrusted_share(tmp_path):
    """An untrained start model segments the painted slices far below ``trust_low``: the
    blend gives it ``start_blend_untrusted``, and the checkpoint records that share."""
    from napari_m3hl.inference.predictor import Predictor
    from napari_m3hl.metrics.quality import painted_dice

    start = _start_model(tmp_path / "start.pt")
    ph = make_phantom(3, shape=SHAPE)
    painted = _painted(ph.label, [1, 4])
    opts = fs.FewSliceOptions(iterations=2, batch_size=4, check_every=2, device="cpu")
    job = fs.prepare(start, ph.image, painted, opts)
    score = painted_dice(job.base, painted, job.config.class_names)[0]
    assert job.blend.painted_dice == score < opts.trust_low
    assert job.blend.weight == opts.start_blend_untrusted < opts.start_blend
    res = list(fs.run(job, out_dir=tmp_path / "run"))[-1]
    assert res.blend == job.blend  # one check: the student's change is unknown, the share stays
    assert load_checkpoint(res.checkpoint)["start_blend"] == opts.start_blend_untrusted
    np.testing.assert_array_equal(Predictor.from_checkpoint(res.checkpoint).predict(job.image), res.labels)


@pytest.mark.parametrize("stable_change", [1.0, 0.0])
def test_the_share_settles_on_how_much_the_student_changed_at_its_last_check(tmp_path, stable_change):
    """With two checks the loop measures the student's change on the unpainted slices (1 − mean Dice
    of its two segmentations): below ``stable_change`` a poorly fitting start model keeps
    ``start_blend_stable``, else ``start_blend_untrusted``; the shown labels, the result, the checkpoint
    and ``m3hl predict`` all use that share."""
    from napari_m3hl.inference.predictor import Predictor
    from napari_m3hl.metrics.quality import mean_dice

    start = _start_model(tmp_path / "start.pt")
    ph = make_phantom(3, shape=SHAPE)
    painted = _painted(ph.label, [1, 4])
    opts = fs.FewSliceOptions(iterations=4, batch_size=4, check_every=2, device="cpu", stable_change=stable_change)
    job = fs.prepare(start, ph.image, painted, opts)
    assert job.blend.painted_dice < opts.trust_low and job.blend.weight == opts.start_blend_untrusted
    events = list(fs.run(job, out_dir=tmp_path / "run"))
    checks = [e for e in events if isinstance(e, fs.Check)]
    res = events[-1]
    assert [c.iteration for c in checks] == [2, 4]
    off = np.setdiff1d(np.arange(job.image.shape[0]), job.painted_slices)
    change = 1.0 - mean_dice(checks[1].networks["student"][off], checks[0].networks["student"][off], 4)
    assert checks[0].blend.student_change is None and checks[0].blend.weight == opts.start_blend_untrusted
    assert res.blend.student_change == pytest.approx(change)
    expected = opts.start_blend_stable if change < stable_change else opts.start_blend_untrusted
    assert res.blend.weight == checks[1].blend.weight == expected
    assert load_checkpoint(res.checkpoint)["start_blend"] == expected
    np.testing.assert_array_equal(Predictor.from_checkpoint(res.checkpoint).predict(job.image), res.labels)
    np.testing.assert_array_equal(checks[1].labels, res.labels)


def test_no_blend_shows_the_fine_tuned_network_alone(tmp_path):
    start = _start_model(tmp_path / "start.pt")
    ph = make_phantom(3, shape=SHAPE)
    opts = fs.FewSliceOptions(iterations=2, batch_size=4, check_every=2, device="cpu", start_blend=0.0)
    res = list(fs.run(fs.prepare(start, ph.image, _painted(ph.label, [1, 4]), opts), out_dir=tmp_path / "r"))[-1]
    np.testing.assert_array_equal(res.labels, res.network)
    assert "start" not in load_checkpoint(res.checkpoint)
    with pytest.raises(M3HLInputError, match="trust_low and trust_high are Dice scores"):
        fs.prepare(start, ph.image, _painted(ph.label, [1, 4]), fs.FewSliceOptions(trust_low=0.95, trust_high=0.9))
    with pytest.raises(M3HLInputError, match="blends the student only"):
        fs.prepare(start, ph.image, _painted(ph.label, [1, 4]), fs.FewSliceOptions(segment_with="teacher"))


def test_probability_blend_checks_its_weights():
    from napari_m3hl.inference.blend import ProbabilityBlend

    torch.manual_seed(0)
    net = build_network("unet2d", 1, 4).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        same = ProbabilityBlend([net, net], [0.3, 0.7])(x).logits
        ref = torch.softmax(net(x).logits, 1)
    torch.testing.assert_close(torch.softmax(same, 1), ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(M3HLInputError, match="sum to 1"):
        ProbabilityBlend([net, net], [0.5, 0.6])
    with pytest.raises(M3HLInputError, match="one weight per network"):
        ProbabilityBlend([net], [0.5, 0.5])


def test_a_chain_of_fine_tunes_keeps_blending_with_the_first_start(tmp_path):
    """Train on / a second `m3hl train --init last.pt`: the blend partner stays the model the user started from."""
    start = _start_model(tmp_path / "start.pt")
    ph = make_phantom(3, shape=SHAPE)
    opts = fs.FewSliceOptions(iterations=2, batch_size=4, check_every=2, device="cpu")
    first = list(fs.run(fs.prepare(start, ph.image, _painted(ph.label, [1, 4]), opts), out_dir=tmp_path / "1"))[-1]
    job = fs.prepare(first.checkpoint, ph.image, _painted(ph.label, [1, 2, 4]), opts)
    np.testing.assert_array_equal(job.base, first.base)  # the first start model's segmentation
    second = list(fs.run(job, out_dir=tmp_path / "2"))[-1]
    start_w = load_checkpoint(start)["student"]
    kept = load_checkpoint(second.checkpoint)["start"]
    assert all(torch.equal(kept[k], start_w[k]) for k in start_w)


def test_a_frozen_teacher_stays_the_start_model_in_a_supervised_fine_tune(tmp_path):
    """The few-slice default ema_decay=1.0 in supervised mode: the teacher
    (never labelling) keeps the start model's weights and BatchNorm
    statistics, rather than frozen weights with the student's statistics."""
    ph = make_phantom(3, shape=(6, 64, 64))
    img, lab = ph.image, ph.label
    painted = np.zeros_like(lab)
    painted[[1, 4]] = lab[[1, 4]]
    opts = fs.FewSliceOptions(iterations=3, batch_size=4, check_every=3, device="cpu")
    assert opts.mode == "supervised" and opts.ema_decay == 1.0
    job = fs.prepare(_start_model(tmp_path / "start.pt"), img, painted, opts)
    out = list(fs.run(job, out_dir=tmp_path / "run"))
    start, last = load_checkpoint(job.start), load_checkpoint(out[-1].checkpoint)
    moved = [k for k, v in start["student"].items() if v.is_floating_point()
             and not torch.equal(last["teacher"][k], v)]
    assert moved == []
    assert any(not torch.equal(last["student"][k], v) for k, v in start["student"].items() if v.is_floating_point())


def test_a_frozen_teacher_is_segmented_once_and_shown_alike_at_every_check(tmp_path, monkeypatch):
    """The checks segment a frozen teacher (ema_decay 1, its statistics kept) at
    the first check only and report that segmentation at every later one; the
    student is segmented at every check. An EMA teacher is segmented at every
    check."""
    from napari_m3hl.inference.predictor import Predictor

    ph = make_phantom(3, shape=(6, 64, 64))
    painted = np.zeros_like(ph.label)
    painted[[1, 4]] = ph.label[[1, 4]]
    calls: list[str] = []
    real = Predictor.from_checkpoint.__func__

    def counting(cls, ckpt, which="teacher", *a, **k):
        calls.append(which)
        return real(cls, ckpt, which, *a, **k)

    monkeypatch.setattr(Predictor, "from_checkpoint", classmethod(counting))
    start = _start_model(tmp_path / "start.pt")
    for decay, teacher_runs in ((1.0, 1), (0.99, 3)):
        opts = fs.FewSliceOptions(iterations=3, batch_size=4, check_every=1, device="cpu", ema_decay=decay,
                                  start_blend=0.0)
        job = fs.prepare(start, ph.image, painted, opts)
        calls.clear()
        checks = [e for e in fs.run(job, out_dir=tmp_path / f"run{decay}") if isinstance(e, fs.Check)]
        assert [c.iteration for c in checks] == [1, 2, 3]
        assert calls.count("student") == 3 and calls.count("teacher") == teacher_runs
        if decay == 1.0:
            first = checks[0].networks["teacher"]
            assert all(np.array_equal(c.networks["teacher"], first) for c in checks)
            # and it is the start model's own segmentation
            assert np.array_equal(first, job.base)
