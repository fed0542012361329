"""The few-slice loop's M³HL mode and its several volumes: what the teacher
teaches (its pseudo-labels), the mutual mask mix (Eq. 2) and the volumes'
bookkeeping. Tiny random start models and phantom volumes, seeded; these
tests assert what the code guarantees, not what a fine-tune learns."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_m3hl.config import TrainConfig
from napari_m3hl.data.phantom import make_phantom
from napari_m3hl.errors import M3HLInputError
from napari_m3hl.metrics.quality import mean_dice
from napari_m3hl.fewslice import loop as fs
from napari_m3hl.inference.predictor import Predictor
from napari_m3hl.io.checkpoint import load_checkpoint, make_payload, save_checkpoint
from napari_m3hl.method.networks import build_network
from napari_m3hl.method.step import m3hl_losses, unsup_weight_at
from napari_m3hl.method.teacher import pseudo_labels
from napari_m3hl.training import events as ev


def _start_model(path: Path, patch=(32, 32)) -> Path:
    """A small start model file (random weights) with its own input size."""
    torch.manual_seed(0)
    cfg = TrainConfig(patch_size=patch, block_size=(8, 8), image_interp="nearest", batch_size=4, iterations=10)
    return save_checkpoint(path, make_payload(cfg, build_network("unet2d", 1, 4)))


def _painted(label: np.ndarray, slices) -> np.ndarray:
    p = np.zeros_like(label)
    p[list(slices)] = label[list(slices)]
    return p


def _taught(ckpt: dict, volume, config: TrainConfig) -> np.ndarray:
    """The pseudo-labels the checkpoint's teacher teaches on ``volume``: its
    segmentation made into pseudo-labels, nothing on the painted slices."""
    _, probs = Predictor.from_checkpoint(ckpt, "teacher", "cpu").predict(volume.image, return_probs=True)
    want = fs.teacher_pseudo_labels(probs, config.pseudo_lcc)
    want[volume.painted_slices] = 0
    return want


def _job(tmp_path: Path, mode: str = "m3hl", **options) -> fs.FewSliceJob:
    """Two labeled volumes of different depths and one unlabeled volume."""
    a, b, c = (make_phantom(s, shape=(d, 64, 64)) for s, d in ((3, 6), (4, 5), (5, 4)))
    opts = fs.FewSliceOptions(iterations=4, batch_size=4, check_every=2, device="cpu", mode=mode, **options)
    return fs.prepare_volumes(_start_model(tmp_path / "start.pt"),
                              [(a.image, _painted(a.label, [1, 4])), (b.image, _painted(b.label, [2]))],
                              [c.image], opts, names=["a", "b", "c"])


def test_several_volumes_train_one_model_and_each_is_segmented(tmp_path):
    job = _job(tmp_path)
    assert [v.name for v in job.volumes] == ["a", "b", "c"] and job.volumes[2].painted is None
    assert len(job.data.labeled) == 3 and len(job.data.unlabeled) == (6 - 2) + (5 - 1) + 4
    out = list(fs.run(job, out_dir=tmp_path / "run"))
    checks = [e for e in out if isinstance(e, fs.Check)]
    assert [c.iteration for c in checks] == [2, 4]
    assert [v.shape for v in checks[-1].volumes] == [(6, 64, 64), (5, 64, 64), (4, 64, 64)]
    assert checks[-1].volumes[0] is checks[-1].labels
    res = out[-1]
    assert isinstance(res, fs.FewSliceResult) and [r.name for r in res.volumes] == ["a", "b", "c"]
    assert [r.verdict is None for r in res.volumes] == [False, False, True]  # nothing painted to judge c by
    for r, v, shown in zip(res.volumes, job.volumes, checks[-1].volumes):
        assert r.labels.shape == v.image.shape and r.labels.dtype == np.uint8
        np.testing.assert_array_equal(r.labels, shown)
        np.testing.assert_array_equal(r.base, v.base)
    assert res.labels is res.volumes[0].labels and res.verdict is res.volumes[0].verdict


def test_a_frozen_teacher_teaches_the_start_models_pseudo_labels(tmp_path):
    """ema_decay=1.0 and no warm start: the teacher stays the start model, so what
    it teaches is the start model's prediction made into pseudo-labels (argmax,
    largest component)."""
    job = _job(tmp_path, ema_decay=1.0, warm_frac=0.0)
    assert job.config.teacher_bn == "ema" and job.config.mode == "m3hl"
    out = list(fs.run(job, out_dir=tmp_path / "run"))
    events = [e for e in out if isinstance(e, fs.PseudoLabels)]
    assert [e.iteration for e in events] == [2, 4]
    for e in events:
        assert len(e.labels) == len(job.volumes) == len(e.painted_dice)
        for v, labels, score in zip(job.volumes, e.labels, e.painted_dice):
            want = fs.teacher_pseudo_labels(v.base_probs, job.config.pseudo_lcc)
            ps = v.painted_slices
            if ps.size:
                assert score == pytest.approx(mean_dice(want[ps], v.painted[ps], job.config.num_classes))
            else:
                assert np.isnan(score)
            want[ps] = 0  # the painted slices are taught from the paint
            np.testing.assert_array_equal(labels, want)
    start, last = load_checkpoint(job.start), load_checkpoint(out[-1].checkpoint)
    for k, v in start["student"].items():  # weights and BatchNorm statistics: the start model's
        if v.is_floating_point():  # (BatchNorm's step counter is copied from the student)
            torch.testing.assert_close(last["teacher"][k], v, rtol=0, atol=0)


def test_pseudo_labels_come_from_the_ema_teacher_of_that_iteration(tmp_path):
    job = _job(tmp_path, ema_decay=0.99, warm_frac=0.0)
    run_dir = tmp_path / "run"
    seen = 0
    for e in fs.run(job, out_dir=run_dir):
        if isinstance(e, fs.PseudoLabels):  # last.pt on disk is this iteration's (the event precedes the next step)
            ckpt = load_checkpoint(run_dir / "last.pt")
            assert int(ckpt["iteration"]) == e.iteration
            for v, labels in zip(job.volumes, e.labels):
                np.testing.assert_array_equal(labels, _taught(ckpt, v, job.config))
            assert any(not np.array_equal(t, s) for t, s in  # two different networks: the teacher's, not the student's
                       zip(ckpt["teacher"].values(), ckpt["student"].values()) if t.is_floating_point())
            seen += 1
    assert seen == 2


def test_a_warm_start_teaches_the_warm_student_and_nothing_before(tmp_path):
    """warm_frac=0.5 of 4 iterations, frozen teacher: the check at iteration 2
    ends the supervised phase, where the teacher teaches nothing and no
    pseudo-labels are shown; from then on the teacher is the student of
    iteration 2, frozen, and its pseudo-labels are what the check at
    iteration 4 shows. The start model is biased to segment everything as
    class 2, so two steps at lr 0.1 (seeded) make a teacher that labels
    otherwise: pseudo-labels still taken from the start model would show."""
    torch.manual_seed(0)
    net = build_network("unet2d", 1, 4)
    with torch.no_grad():
        net.out.bias[2] += 0.5
    cfg = TrainConfig(patch_size=(32, 32), block_size=(8, 8), image_interp="nearest", batch_size=4, iterations=10)
    start = save_checkpoint(tmp_path / "start.pt", make_payload(cfg, net))
    a, b, c = (make_phantom(s, shape=(d, 64, 64)) for s, d in ((3, 6), (4, 5), (5, 4)))
    opts = fs.FewSliceOptions(iterations=4, batch_size=4, check_every=2, device="cpu", mode="m3hl", ema_decay=1.0,
                              warm_frac=0.5, lr=0.1)
    job = fs.prepare_volumes(start, [(a.image, _painted(a.label, [1, 4])), (b.image, _painted(b.label, [2]))],
                             [c.image], opts, names=["a", "b", "c"])
    assert job.config.warm_iterations == 2
    run_dir = tmp_path / "run"
    student_at_warm, seen = None, []
    for e in fs.run(job, out_dir=run_dir):
        if isinstance(e, fs.Check) and e.iteration == 2:  # last.pt on disk is this iteration's
            student_at_warm = load_checkpoint(run_dir / "last.pt")["student"]
        if not isinstance(e, fs.PseudoLabels):
            continue
        seen.append(e.iteration)
        ckpt = load_checkpoint(run_dir / "last.pt")
        assert int(ckpt["iteration"]) == e.iteration
        for k, v in student_at_warm.items():  # the teacher: the student of iteration 2, kept
            if v.is_floating_point():
                torch.testing.assert_close(ckpt["teacher"][k], v, rtol=0, atol=0)
        for v, labels in zip(job.volumes, e.labels):
            np.testing.assert_array_equal(labels, _taught(ckpt, v, job.config))
            from_start = fs.teacher_pseudo_labels(v.base_probs, job.config.pseudo_lcc)
            from_start[v.painted_slices] = 0
            assert not np.array_equal(labels, from_start)
    assert seen == [4]


def test_a_warm_start_is_a_share_of_the_iterations(tmp_path):
    for bad in (1.0, -0.1):
        with pytest.raises(M3HLInputError, match=rf"warm_frac .* \[0, 1\); got {bad}"):
            _job(tmp_path, warm_frac=bad)
    assert _job(tmp_path, mode="supervised", warm_frac=0.5).config.warm_iterations == 0  # nothing to warm up for
    assert _job(tmp_path, warm_frac=0.9).config.warm_iterations == 3  # round(3.6) = 4 would leave no M³HL step
    assert fs.FewSliceOptions(mode="m3hl", iterations=1).warm_iterations == 0
    assert fs.FewSliceOptions(mode="m3hl").warm_iterations == 40  # the measured default: 40 of 75
    slow = fs.FewSliceOptions(mode="m3hl", m3hl_lr_scale=0.1)
    assert "the M³HL iterations at 0.1× that learning rate" in slow.summary()
    assert "×" not in fs.FewSliceOptions(mode="m3hl").summary()  # the default: the same rate, unsaid


def test_the_m3hl_iterations_take_their_own_learning_rate(tmp_path):
    """m3hl_lr_scale 0.1 after a 2-iteration warm start: the trainer reports lr
    0.01 for the supervised steps and 0.001 for the M³HL ones."""
    job = _job(tmp_path, warm_frac=0.5, m3hl_lr_scale=0.1, lr=0.01)
    assert job.config.warm_iterations == 2 and job.config.m3hl_lr_scale == 0.1
    lrs = {e.iteration: e.lr for e in fs.run(job, out_dir=tmp_path / "run") if isinstance(e, ev.Progress)}
    assert {2, 4} <= set(lrs)
    assert lrs == pytest.approx({i: 0.01 if i <= 2 else 0.001 for i in lrs})
    with pytest.raises(M3HLInputError, match="m3hl_lr_scale .* must be > 0, got -1"):
        _job(tmp_path, m3hl_lr_scale=-1)


def test_supervised_mode_teaches_no_pseudo_labels_and_mixes_nothing(tmp_path):
    job = _job(tmp_path, mode="supervised")
    out = list(fs.run(job, mix_preview_every_s=0.0))
    assert not any(isinstance(e, (fs.PseudoLabels, ev.MixPreview)) for e in out)


def test_the_mix_preview_follows_one_block_mask_both_ways(tmp_path):
    job = _job(tmp_path)
    assert job.config.block_size == (8, 8) and job.config.patch_size == (32, 32)
    mixes = [e for e in fs.run(job, mix_preview_every_s=0.0) if isinstance(e, ev.MixPreview)]
    assert mixes
    for e in mixes:
        assert e.images.shape == e.targets.shape == e.masks.shape == (2, 32, 32)
        np.testing.assert_array_equal(e.masks[0] + e.masks[1], np.ones((32, 32)))  # complementary
        blocks = e.masks[0].reshape(4, 8, 4, 8)
        assert (blocks == blocks[:, :1, :, :1]).all()  # constant on each 8 x 8 block
        assert int(e.masks[0].sum()) == 8 * 64  # half of the 16 blocks (mask ratio 0.5)
        assert e.targets.max() < job.config.num_classes


def test_the_step_mixes_images_and_targets_as_eq_2():
    """mix_u = u_a·M + l_a·(1−M) with targets p_a·M + y_a·(1−M), and
    mix_l = l_b·M + u_b·(1−M) with y_b·M + p_b·(1−M): with labeled images of 0,
    unlabeled images of 1 and labels of 2, the mixed images are the masks and
    the targets are the paint where the labeled image shows."""
    torch.manual_seed(0)
    cfg = TrainConfig(patch_size=(32, 32), block_size=(8, 8), batch_size=4, iterations=1, mode="m3hl",
                      teacher_mode="eval", teacher_bn="copy")
    student, teacher = build_network("unet2d", 1, 4), build_network("unet2d", 1, 4)
    img_l, img_u = torch.zeros(2, 1, 32, 32), torch.ones(2, 1, 32, 32)
    img_u[1] = 0.5
    lab_l = torch.full((2, 32, 32), 2, dtype=torch.int64)
    gen = torch.Generator().manual_seed(1)
    res = m3hl_losses(cfg, student, teacher, img_l, lab_l, img_u, gen, contextlib.nullcontext)
    images, targets, masks = (t.detach() for t in res.preview)
    teacher.eval()
    with torch.no_grad():
        plab = pseudo_labels(teacher(img_u).logits, lcc=cfg.pseudo_lcc)
    m = masks[0]
    torch.testing.assert_close(masks[1], 1 - m)
    torch.testing.assert_close(images[0], m)  # u_a (1) where M = 1, l_a (0) elsewhere
    torch.testing.assert_close(images[1], 0.5 * (1 - m))  # l_b (0) where M = 1, u_b (0.5) elsewhere
    torch.testing.assert_close(targets[0], torch.where(m.bool(), plab[0], lab_l[0]))
    torch.testing.assert_close(targets[1], torch.where(m.bool(), lab_l[1], plab[1]))


def test_sup_weight_adds_the_labeled_images_unmixed_and_leaves_the_paper_step_alone():
    """``sup_weight`` adds sup_weight·(CE + Dice) of the student on the labeled
    images unmixed (in one forward with the mixed ones, in training mode); the
    mix and feature terms stay those of the paper's step with the same mask,
    and 0 (the default) is the paper's step exactly."""
    from napari_m3hl.method.losses import seg_loss

    torch.manual_seed(0)
    cfg = TrainConfig(patch_size=(32, 32), block_size=(8, 8), batch_size=4, iterations=1, mode="m3hl",
                      teacher_mode="eval", teacher_bn="copy")
    student, teacher = build_network("unet2d", 1, 4), build_network("unet2d", 1, 4)
    student.eval()  # no dropout or batch statistics: the same network output whatever else is in the batch
    student.train = lambda mode=True: student  # keep it so inside the step
    img_l, img_u = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    lab_l = torch.randint(0, 4, (2, 32, 32))
    mask = (torch.rand(1, 32, 32) > 0.5).float()
    paper = m3hl_losses(cfg, student, teacher, img_l, lab_l, img_u, None, contextlib.nullcontext, mask=mask)
    assert "sup" not in paper.losses
    tied = m3hl_losses(cfg.replace(sup_weight=0.7), student, teacher, img_l, lab_l, img_u, None,
                       contextlib.nullcontext, mask=mask)
    with torch.no_grad():
        expected = seg_loss(student(img_l).logits, lab_l)
    torch.testing.assert_close(tied.losses["sup"].detach(), expected)
    for key in ("mix", "low", "high"):
        torch.testing.assert_close(tied.losses[key].detach(), paper.losses[key].detach())
    torch.testing.assert_close(tied.losses["total"].detach(),
                               (paper.losses["total"] + 0.7 * tied.losses["sup"]).detach())
    with pytest.raises(M3HLInputError, match="sup_weight"):
        cfg.replace(sup_weight=-1.0).validate()


def test_unsup_rampup_starts_a_fine_tune_supervised_and_ramps_the_mix_in():
    """``unsup_rampup`` scales ``mix_weight·L_mix + λ·L_HL`` by a factor that
    rises linearly from 0 at the first M³HL iteration to 1 after
    ``unsup_rampup`` of them; ``sup_weight``'s term is not scaled, so the
    first step of a ramped fine-tune is the supervised step."""
    cfg = TrainConfig(patch_size=(32, 32), block_size=(8, 8), batch_size=4, iterations=200, mode="m3hl",
                      teacher_mode="eval", teacher_bn="copy", sup_weight=1.0, unsup_rampup=100)
    assert [unsup_weight_at(cfg, i) for i in (0, 50, 100, 150)] == [0.0, 0.5, 1.0, 1.0]
    assert unsup_weight_at(cfg.replace(warm_start=20), 70) == 0.5  # counted from the M³HL phase
    assert unsup_weight_at(cfg.replace(unsup_rampup=0), 0) == 1.0  # off: the paper's weights
    torch.manual_seed(0)
    student, teacher = build_network("unet2d", 1, 4), build_network("unet2d", 1, 4)
    student.eval()
    student.train = lambda mode=True: student
    img_l, img_u = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    lab_l = torch.randint(0, 4, (2, 32, 32))
    mask = (torch.rand(1, 32, 32) > 0.5).float()
    args = (student, teacher, img_l, lab_l, img_u, None, contextlib.nullcontext)
    first = m3hl_losses(cfg, *args, mask=mask, unsup=unsup_weight_at(cfg, 0))
    torch.testing.assert_close(first.losses["total"].detach(), first.losses["sup"].detach())
    half = m3hl_losses(cfg, *args, mask=mask, unsup=0.5)
    unsup = cfg.mix_weight * half.losses["mix"] + cfg.lam * (half.losses["low"] + half.losses["high"])
    torch.testing.assert_close(half.losses["total"].detach(), (half.losses["sup"] + 0.5 * unsup).detach())
    with pytest.raises(M3HLInputError, match="unsup_rampup"):
        cfg.replace(unsup_rampup=-1).validate()


def test_the_m3hl_loss_options_reach_the_fine_tunes_config(tmp_path):
    """``FewSliceOptions.sup_weight`` / ``mix_dice`` set the fine-tune's
    TrainConfig (not the start model's training config), and a bad pooling
    is refused naming the setting."""
    job = _job(tmp_path, sup_weight=1.0, mix_dice="none")
    assert (job.config.sup_weight, job.config.mix_dice, job.config.unsup_rampup) == (1.0, "none", 0)
    assert "mixed images' Dice: none, painted slices unmixed at weight 1" in job.options.summary()
    with pytest.raises(M3HLInputError, match="mix_dice"):
        _job(tmp_path, mix_dice="pooled")


def test_block_size_follows_the_start_models_input():
    assert fs.scaled_block({"block_size": (64, 64), "patch_size": (256, 256)}, (128, 128)) == (32, 32)
    assert fs.scaled_block({}, (256, 224)) == (64, 56)  # the paper's quarter of each axis
    assert fs.scaled_block({"block_size": (64, 64)}, (256, 256)) == (64, 64)


def test_prepare_volumes_names_the_bad_volume(tmp_path):
    start = _start_model(tmp_path / "start.pt")
    a = make_phantom(3, shape=(4, 64, 64))
    with pytest.raises(M3HLInputError, match="b: image .* one shape"):
        fs.prepare_volumes(start, [(a.image, a.label), (a.image, a.label[:3])], names=["a", "b"])
    with pytest.raises(M3HLInputError, match="c: an unlabeled image must be one"):
        fs.prepare_volumes(start, [(a.image, a.label)], [a.image[0]], names=["a", "c"])
    with pytest.raises(M3HLInputError, match="mode must be"):
        fs.prepare_volumes(start, [(a.image, a.label)], options=fs.FewSliceOptions(mode="semi"))
