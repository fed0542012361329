"""How good the teacher's pseudo-labels are while training.

On data sets whose "unlabeled" samples do have labels (ACDC: every training
slice is labeled; the protocol just hides most of them; the phantom), the
trainer can score the pseudo-labels it makes against those hidden labels
every ``config.pl_eval_every`` iterations. The labels are never used for
training: this only tells *when* the pseudo-labels become good enough to
help the student, which is what every recipe question (warm start, α ramp,
EMA warm-up) turns on.

2D only: the slices are resized to the training patch exactly as a training
batch is (``config.image_interp`` for the image, nearest for the labels), but
not augmented, and scored in that patch space.
"""
from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch
from torch import nn

from napari_m3hl.method.augment import resize_2d
from napari_m3hl.config import TrainConfig
from napari_m3hl.method.teacher import pseudo_labels, set_labelling_mode


def pick_reference(n_available: int, n: int, seed: int) -> list[int]:
    """A fixed, seeded choice of ``min(n, n_available)`` sample indices (sorted);
    its own random stream, so training's random state is untouched."""
    rng = np.random.default_rng([int(seed), 7411])
    k = min(int(n), int(n_available))
    return sorted(int(i) for i in rng.choice(n_available, size=k, replace=False))


def reference_batch(samples: Sequence, config: TrainConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(image (H, W), label (H, W))`` samples at the patch size.

    Returns images ``(N, 1, h, w)`` float32 and labels ``(N, h, w)`` int64 on ``device``.
    """
    imgs, labs = [], []
    for img, lab in samples:
        t_img = torch.as_tensor(np.ascontiguousarray(img), dtype=torch.float32, device=device)[None, None]
        t_lab = torch.as_tensor(np.asarray(lab).astype(np.int64), device=device)[None]
        t_img, t_lab = resize_2d(t_img, t_lab, tuple(config.patch_size), config.image_interp)
        imgs.append(t_img)
        labs.append(t_lab)
    return torch.cat(imgs), torch.cat(labs)


def _dice_per_class(pred: torch.Tensor, ref: torch.Tensor, num_classes: int) -> np.ndarray:
    """Dice of classes 1..C-1 pooled over the batch (two empty sets score 1)."""
    out = np.zeros(num_classes - 1)
    for c in range(1, num_classes):
        p, r = pred == c, ref == c
        total = int(p.sum() + r.sum())
        out[c - 1] = 1.0 if total == 0 else 2.0 * int((p & r).sum()) / total
    return out


@torch.no_grad()
def score_pseudo_labels(
    teacher: nn.Module,
    student: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    batch: int = 16,
) -> dict[str, float]:
    """Dice (0..1) of the teacher's pseudo-labels and of the student's eval-mode
    prediction against the hidden labels.

    The teacher labels in the mode training uses (``config.teacher_mode``),
    with the largest-component filter when ``config.pseudo_lcc``; it runs on a
    copy, so a train-mode teacher's BatchNorm statistics are not disturbed.

    Args:
        images: (N, 1, h, w) float32; labels: (N, h, w) int64 (``reference_batch``).

    Returns:
        ``pl_mean`` and ``pl_<class>`` for the pseudo-labels, ``student_mean``
        and ``student_<class>`` for the student.
    """
    t = copy.deepcopy(teacher)
    set_labelling_mode(t, config.teacher_mode, config.teacher_bn)
    was_training = student.training
    student.eval()
    pl, sp = [], []
    try:
        for i in range(0, images.shape[0], batch):
            x = images[i : i + batch]
            pl.append(pseudo_labels(t(x).logits.float(), lcc=config.pseudo_lcc))
            sp.append(student(x).logits.argmax(1))
    finally:
        student.train(was_training)
    names = list(config.class_names)[1:]
    d_pl = _dice_per_class(torch.cat(pl), labels, config.num_classes)
    d_st = _dice_per_class(torch.cat(sp), labels, config.num_classes)
    out = {"pl_mean": float(d_pl.mean()), "student_mean": float(d_st.mean())}
    out.update({f"pl_{n}": float(v) for n, v in zip(names, d_pl)})
    out.update({f"student_{n}": float(v) for n, v in zip(names, d_st)})
    return out
