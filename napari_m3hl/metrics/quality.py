"""How a segmentation in the making compares with the user's paint and with
itself: the few-slice loop's, the safeguard's and the widget's measures, each
under its own name.

All inputs are integer label maps of one shape, ``(D, H, W)`` or any subset of
slices of one; class 0 is background. Dice is :func:`napari_m3hl.metrics.binary.dice`
(1.0 when both masks are empty).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from napari_m3hl.metrics.binary import dice


def class_dice(pred: np.ndarray, ref: np.ndarray, classes: Sequence[int]) -> dict[int, float]:
    """Dice (0..1) of ``pred`` against ``ref`` for each class in ``classes``."""
    return {int(c): float(dice(pred == c, ref == c)) for c in classes}


def mean_dice(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> float:
    """Mean Dice (0..1) over the foreground classes ``1..num_classes-1``."""
    return float(np.mean(list(class_dice(pred, ref, range(1, num_classes)).values())))


def painted_dice(pred: np.ndarray, painted: np.ndarray, class_names: Sequence[str]) -> tuple[float | None, dict[str, float]]:
    """Dice of ``pred`` on the painted slices (any nonzero label) of ``painted``,
    for each class painted there: (mean over those classes or None when none
    is painted, {class name: Dice})."""
    on = painted.reshape(painted.shape[0], -1).any(axis=1)
    p, t = pred[on], painted[on]
    present = [c for c in range(1, len(class_names)) if (t == c).any()]
    per_class = {str(class_names[c]): d for c, d in class_dice(p, t, present).items()}
    return (float(np.mean(list(per_class.values()))) if per_class else None), per_class


def relabelled_share(pred: np.ndarray, previous: np.ndarray) -> float:
    """Share (0..1) of the pixels that are foreground in ``pred`` or ``previous``
    whose label differs between the two (0 when neither has foreground)."""
    fg = (pred > 0) | (previous > 0)
    return float((pred[fg] != previous[fg]).sum() / max(int(fg.sum()), 1))
