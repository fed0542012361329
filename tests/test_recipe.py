"""Short-budget recipe knobs (supervised warm start, α ramp) and the
pseudo-label quality log, on a tiny phantom."""
from __future__ import annotations

import pytest
import torch

from napari_m3hl.training import events as ev
from napari_m3hl.errors import M3HLInputError
from napari_m3hl.method.networks import build_network
from napari_m3hl.training.pl_quality import pick_reference, reference_batch, score_pseudo_labels
from napari_m3hl.method.step import alpha_at
from napari_m3hl.training.trainer import train

from test_trainer import _cfg, tiny_data  # noqa: F401  (the same tiny phantom set-up)


def test_alpha_ramp_and_warm_start_schedule():
    cfg = _cfg(alpha=0.5, warm_start=10, alpha_rampup=4)
    assert [alpha_at(cfg, it) for it in (10, 11, 12, 13, 14, 100)] == [0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    assert alpha_at(_cfg(alpha=0.5), 0) == 0.5
    with pytest.raises(M3HLInputError, match="warm_start"):
        _cfg(warm_start=-1)


def test_warm_start_trains_supervised_then_m3hl(tiny_data):
    cfg = _cfg(iterations=4, warm_start=2, checkpoint_every=0)
    steps = [e for e in train(cfg, tiny_data) if isinstance(e, ev.Progress)]
    assert [set(s.losses) for s in steps[:2]] == [{"sup", "total"}] * 2
    assert all({"mix", "low", "high"} <= set(s.losses) for s in steps[2:])


def test_pseudo_label_quality_is_logged_and_bounded(tiny_data):
    cfg = _cfg(iterations=4, pl_eval_every=2, pl_eval_samples=5, checkpoint_every=0)
    found = [e for e in train(cfg, tiny_data) if isinstance(e, ev.PseudoLabelQuality)]
    assert [e.iteration for e in found] == [2, 4]
    for e in found:
        assert {"pl_mean", "student_mean", "pl_RV", "pl_Myo", "pl_LV", "student_LV"} <= set(e.scores)
        assert all(0.0 <= v <= 1.0 for v in e.scores.values())
    # off by default, and never for data without hidden labels
    assert not any(isinstance(e, ev.PseudoLabelQuality) for e in train(_cfg(iterations=2), tiny_data))


def test_pseudo_label_score_is_one_for_a_perfect_teacher(tiny_data):
    """A 'teacher' that returns the true labels scores 1.0; the score runs on a
    copy, so a train-mode teacher's BatchNorm statistics stay as they were."""
    cfg = _cfg(teacher_mode="train", pseudo_lcc=False)
    truth = tiny_data.unlabeled_truth
    idx = pick_reference(len(truth), 6, seed=1)
    assert idx == pick_reference(len(truth), 6, seed=1) and len(set(idx)) == 6
    images, labels = reference_batch([truth[i] for i in idx], cfg, torch.device("cpu"))
    assert images.shape == (6, 1, 64, 64) and labels.shape == (6, 64, 64)

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(1)
            self.calls = 0

        def forward(self, x):
            self.bn(x)
            lab = labels[self.calls * 16 : self.calls * 16 + x.shape[0]]
            self.calls += 1
            return type("Out", (), {"logits": torch.nn.functional.one_hot(lab, 4).permute(0, 3, 1, 2).float()})()

    oracle = Oracle()
    before = oracle.bn.running_mean.clone()
    student = build_network("unet2d", 1, 4)
    scores = score_pseudo_labels(oracle, student, images, labels, cfg)
    assert scores["pl_mean"] == 1.0 and scores["student_mean"] < 1.0
    assert torch.equal(oracle.bn.running_mean, before)
