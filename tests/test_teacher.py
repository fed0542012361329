import numpy as np
import pytest
import torch
from torch import nn

from napari_m3hl.method.networks import UNet2D
from napari_m3hl.method.teacher import ema_decay_at, ema_update, init_teacher, pseudo_labels
from napari_m3hl.method.components import largest_component_per_class


def _net():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))


def test_ema_arithmetic_params_and_buffers():
    torch.manual_seed(0)
    s, t = _net(), _net()
    s[1].running_mean.fill_(2.0)
    t[1].running_mean.fill_(1.0)
    s[1].num_batches_tracked.fill_(7)
    before_t = [p.clone() for p in t.parameters()]
    ema_update(t, s, 0.9, buffers="ema")
    for pt, p0, ps in zip(t.parameters(), before_t, s.parameters()):
        assert torch.allclose(pt, 0.9 * p0 + 0.1 * ps)
    assert torch.allclose(t[1].running_mean, torch.full((2,), 1.1))
    assert int(t[1].num_batches_tracked) == 7


def test_ema_copies_batchnorm_statistics_by_default():
    """The default keeps BN running stats out of the EMA: the teacher takes the
    student's, so no decay**t share of the initial (0, 1) statistics lingers."""
    torch.manual_seed(0)
    s, t = _net(), _net()
    s[1].running_mean.fill_(2.0)
    s[1].running_var.fill_(3.0)
    before_t = [p.clone() for p in t.parameters()]
    ema_update(t, s, 0.99)
    for pt, p0, ps in zip(t.parameters(), before_t, s.parameters()):
        assert torch.allclose(pt, 0.99 * p0 + 0.01 * ps)
    assert torch.equal(t[1].running_mean, s[1].running_mean)
    assert torch.equal(t[1].running_var, s[1].running_var)
    assert t[1].running_mean.data_ptr() != s[1].running_mean.data_ptr()
    with pytest.raises(ValueError):
        ema_update(t, s, 0.99, buffers="average")


def test_eval_teacher_statistics_follow_the_student_in_training():
    """After a few train-mode student steps the eval-mode teacher's BN statistics
    equal the student's under the default, and lag far behind under 'ema'."""
    torch.manual_seed(0)
    s = _net()
    t_copy, t_ema = _net(), _net()
    init_teacher(t_copy, s, "copy")
    init_teacher(t_ema, s, "copy")
    for _ in range(20):
        s.train()
        s(torch.randn(4, 1, 8, 8) * 5 + 10)
        ema_update(t_copy, s, 0.99)
        ema_update(t_ema, s, 0.99, buffers="ema")
    gap_copy = (t_copy[1].running_mean - s[1].running_mean).abs().max()
    gap_ema = (t_ema[1].running_mean - s[1].running_mean).abs().max()
    assert gap_copy == 0 and gap_ema > 0.5 * s[1].running_mean.abs().max()


def test_ema_decay_zero_copies_and_one_keeps():
    s, t = _net(), _net()
    keep = [p.clone() for p in t.parameters()]
    ema_update(t, s, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(t.parameters(), keep))
    ema_update(t, s, 0.0)
    assert all(torch.allclose(a, b) for a, b in zip(t.parameters(), s.parameters()))


def test_init_modes_and_warmup():
    s, t = UNet2D(), UNet2D()
    init_teacher(t, s, "independent")
    assert not torch.equal(next(t.parameters()), next(s.parameters()))
    init_teacher(t, s, "copy")
    assert all(torch.equal(a, b) for a, b in zip(t.state_dict().values(), s.state_dict().values()))
    assert not any(p.requires_grad for p in t.parameters())
    assert ema_decay_at(0, 0.99, True) == 0.0 and ema_decay_at(9, 0.99, True) == 0.9
    assert ema_decay_at(10_000, 0.99, True) == 0.99 and ema_decay_at(0, 0.99, False) == 0.99


def test_largest_component_per_class():
    lab = np.zeros((1, 10, 10), np.int64)
    lab[0, 0:2, 0:2] = 1  # small blob of class 1
    lab[0, 5:9, 5:9] = 1  # large blob of class 1
    lab[0, 0:3, 7:10] = 2  # single component of class 2
    out = largest_component_per_class(lab, 3)
    assert (out[0, 0:2, 0:2] == 0).all()
    assert (out[0, 5:9, 5:9] == 1).all()
    assert (out[0, 0:3, 7:10] == 2).all()
    assert lab[0, 0, 0] == 1  # input untouched


def test_pseudo_labels_argmax_and_lcc():
    logits = torch.zeros(1, 2, 6, 6)
    logits[0, 1, 0, 0] = 5  # isolated foreground pixel
    logits[0, 1, 3:6, 3:6] = 5
    plain = pseudo_labels(logits, lcc=False)
    assert plain.dtype == torch.int64 and plain[0, 0, 0] == 1
    filtered = pseudo_labels(logits, lcc=True)
    assert filtered[0, 0, 0] == 0 and filtered[0, 3:6, 3:6].eq(1).all()


def test_own_statistics_teacher_labels_with_batch_statistics_and_keeps_its_own():
    """teacher_bn='own': labelling runs BatchNorm on the batch's statistics with
    dropout off, updates the teacher's running statistics from its own
    activations, and the EMA step leaves those statistics alone."""
    from napari_m3hl.method.teacher import set_labelling_mode

    torch.manual_seed(0)
    s, t = UNet2D(), UNet2D()
    init_teacher(t, s, "copy")
    set_labelling_mode(t, "eval", "own")
    bns = [m for m in t.modules() if isinstance(m, nn.BatchNorm2d)]
    drops = [m for m in t.modules() if isinstance(m, nn.Dropout2d | nn.Dropout)]
    assert bns and all(m.training for m in bns) and drops and not any(m.training for m in drops)
    x = torch.rand(2, 1, 32, 32) * 3 + 5
    with torch.no_grad():
        a, b = t(x).logits, t(x).logits
    assert torch.equal(a, b)  # no dropout: deterministic labels
    own = bns[0].running_mean.clone()
    assert not torch.equal(own, s.state_dict()[[k for k in s.state_dict() if k.endswith("running_mean")][0]])
    ema_update(t, s, 0.99, buffers="own")
    assert torch.equal(bns[0].running_mean, own)
    set_labelling_mode(t, "eval", "copy")
    assert not any(m.training for m in t.modules())
    set_labelling_mode(t, "train", "own")
    assert all(m.training for m in t.modules())
