"""napari_m3hl.metrics.quality against hand-counted masks."""
from __future__ import annotations

import numpy as np
import pytest

from napari_m3hl.metrics.quality import class_dice, mean_dice, painted_dice, relabelled_share


def test_painted_dice_scores_only_painted_slices_and_classes():
    painted = np.zeros((3, 4, 4), np.uint8)
    painted[1, :2, :2] = 1          # slice 1 painted: class 1 on 4 pixels, class 2 nowhere
    pred = np.zeros_like(painted)
    pred[1, :2, :1] = 1             # 2 of the 4 pixels
    pred[0] = 2                     # an unpainted slice: not scored
    mean, per_class = painted_dice(pred, painted, ("bg", "RV", "Myo"))
    assert per_class == {"RV": pytest.approx(2 * 2 / (2 + 4))} and mean == pytest.approx(2 / 3)
    assert painted_dice(pred, np.zeros_like(painted), ("bg", "RV")) == (None, {})


def test_class_and_mean_dice():
    a = np.array([[1, 1, 2, 0]])
    b = np.array([[1, 0, 2, 2]])
    assert class_dice(a, b, [1, 2]) == {1: pytest.approx(2 / 3), 2: pytest.approx(2 / 3)}
    assert mean_dice(a, b, 3) == pytest.approx(2 / 3)


def test_relabelled_share_counts_foreground_pixels_that_changed():
    now = np.array([1, 1, 2, 0, 0])
    before = np.array([1, 2, 2, 3, 0])
    assert relabelled_share(now, before) == pytest.approx(2 / 4)  # 4 foreground in either, 2 changed
    assert relabelled_share(np.zeros(3), np.zeros(3)) == 0.0
