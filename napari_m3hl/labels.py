"""Label maps: the class names and which slices of a label volume are labeled.

Labels follow the ACDC convention (0 background, 1 RV, 2 Myo, 3 LV) or the LA
one (0 background, 1 left atrium). A slice counts as *labeled* (painted) when
it holds any nonzero label; an all-background slice counts as unlabeled.
"""
from __future__ import annotations

import numpy as np

ACDC_CLASSES: tuple[str, ...] = ("background", "RV", "Myo", "LV")
LA_CLASSES: tuple[str, ...] = ("background", "left atrium")


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """ACDC names for 4 classes, background/foreground for 2, else ``class k``."""
    if num_classes == 4:
        return ACDC_CLASSES
    if num_classes == 2:
        return ("background", "foreground")
    return ("background",) + tuple(f"class {k}" for k in range(1, num_classes))


def labeled_mask(labels: np.ndarray) -> np.ndarray:
    """bool ``(D,)``: which slices (axis 0) of a ``(D, H, W)`` label volume hold any nonzero label."""
    lab = np.asarray(labels)
    return lab.reshape(lab.shape[0], -1).any(axis=1)


def labeled_slices(labels: np.ndarray) -> np.ndarray:
    """Indices (int64, ascending) of the slices (axis 0) of a ``(D, H, W)``
    label volume that hold any nonzero label."""
    return np.flatnonzero(labeled_mask(labels)).astype(np.int64)
