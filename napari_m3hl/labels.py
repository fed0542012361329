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


#: A painted slice with less foreground than this share of the most painted
#: slice's is named as partly painted.
PARTIAL_SHARE = 0.25


def painting_warnings(labels: np.ndarray, class_names: tuple[str, ...]) -> list[str]:
    """One line per painted slice of a ``(D, H, W)`` label volume that looks
    partly painted: a structure (``class_names[1:]``) missing, or far less
    paint than the most painted slice. Every unpainted pixel of a painted
    slice is taught as background, so such a slice teaches the network to
    miss what was left out; the caller shows these as warnings."""
    lab = np.asarray(labels)
    on = labeled_slices(lab)
    area = {int(z): int(np.count_nonzero(lab[z])) for z in on}
    most = max(area.values(), default=0)
    out = []
    for z in on:
        z = int(z)
        missing = [name for c, name in enumerate(class_names) if c and not (lab[z] == c).any()]
        if missing:
            out.append(f"slice {z} is painted without {', '.join(missing)}: every pixel left unpainted on "
                       "a painted slice is taught as background; paint every structure visible there, or clear the "
                       "slice")
        elif len(on) > 1 and area[z] < PARTIAL_SHARE * most:
            out.append(f"slice {z} has {area[z]} painted pixels, the most painted slice {most}: if it is "
                       "painted only in part, the rest is taught as background; finish it or clear it")
    return out
