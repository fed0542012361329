"""npe2 sample data: a synthetic cardiac short-axis MR phantom, ready to train.

Gives the image, a ``phantom labels`` layer with only two slices painted (so
Train works at once: the other slices are the unlabeled data M³HL learns
from) and, hidden, the full ground truth named ``phantom ground truth
(reference only)`` to compare the result with.
"""
from __future__ import annotations

from typing import Any

import numpy as np

#: Slices painted in the sample labels layer (mid-basal and mid-ventricular).
SAMPLE_SLICES: tuple[int, ...] = (2, 5)
SAMPLE_SEED = 7


def phantom_layers(
    seed: int = SAMPLE_SEED,
    shape: tuple[int, int, int] = (10, 216, 256),
    painted: tuple[int, ...] = SAMPLE_SLICES,
) -> list[tuple[np.ndarray, dict[str, Any], str]]:
    """Layer-data tuples: image, (hidden) ground truth, partly painted labels."""
    from napari_m3hl.labels import ACDC_CLASSES
    from napari_m3hl.io.nifti import affine_from_spacing
    from napari_m3hl.data.phantom import make_phantom
    from napari_m3hl._napari.layers.control import class_colormap, class_features

    ph = make_phantom(seed, shape=shape)
    geometry = {"affine": affine_from_spacing(ph.spacing), "header": None, "source_path": f"phantom seed {seed}"}
    painted_labels = np.zeros_like(ph.label)
    keep = [z for z in painted if 0 <= z < ph.label.shape[0]]
    painted_labels[keep] = ph.label[keep]

    def labels_meta(name: str, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "scale": ph.spacing,
            "metadata": dict(geometry),
            "colormap": class_colormap(len(ACDC_CLASSES)),
            "features": class_features(ACDC_CLASSES),
            **extra,
        }

    return [
        (ph.image, {"name": "phantom image", "scale": ph.spacing, "metadata": dict(geometry)}, "image"),
        (ph.label, labels_meta("phantom ground truth (reference only)", visible=False, opacity=0.5), "labels"),
        (painted_labels, labels_meta("phantom labels"), "labels"),
    ]


def make_phantom_sample() -> list[tuple[np.ndarray, dict[str, Any], str]]:
    """npe2 sample-data command."""
    return phantom_layers()
