"""The synthetic phantom (:mod:`napari_m3hl.data.phantom`) as a data source:
partly labeled training volumes and fully labeled validation volumes."""
from __future__ import annotations

import numpy as np

from napari_m3hl.errors import M3HLInputError
from napari_m3hl.labels import ACDC_CLASSES
from napari_m3hl.data.types import TrainData, VolumeSlices
from napari_m3hl.data.volumes import PartlyLabeledVolume


def phantom_train_data(
    n_volumes: int = 4,
    labeled_slices_per_volume: int = 2,
    seed: int = 0,
    shape: tuple[int, int, int] = (10, 216, 256),
) -> "TrainData":
    """2D training data from phantom volumes.

    In each of ``n_volumes`` phantoms (cohort ``seed``) ``labeled_slices_per_volume``
    slices, evenly spread between base and apex (ends excluded when possible),
    keep their labels; all other slices are unlabeled.
    """
    from napari_m3hl.data.phantom import make_phantom_cohort

    if n_volumes < 1:
        raise M3HLInputError(f"n_volumes={n_volumes} must be >= 1.")
    d = int(shape[0])
    if not 1 <= labeled_slices_per_volume <= d:
        raise M3HLInputError(f"labeled_slices_per_volume={labeled_slices_per_volume} must lie in 1..{d}.")
    keep = _spread(d, labeled_slices_per_volume)
    phantoms = make_phantom_cohort(n_volumes, seed=seed, shape=shape)
    labels = []
    for ph in phantoms:
        lab = np.zeros_like(ph.label)
        lab[keep] = ph.label[keep]
        labels.append(lab)
    plv = PartlyLabeledVolume.from_volumes([p.image for p in phantoms], labels, num_classes=4,
                                           names=[f"phantom {p.seed}" for p in phantoms])
    data = plv.train_data(ACDC_CLASSES)
    data.unlabeled_truth = VolumeSlices(plv.volumes, [p.label for p in phantoms], plv.unlabeled_index, labeled=True)
    return data


def _spread(d: int, n: int) -> np.ndarray:
    """``n`` distinct slice indices in ``0..d-1`` spread evenly, ends excluded if room."""
    if n + 2 <= d:
        return np.round(np.linspace(0, d - 1, n + 2)[1:-1]).astype(int)
    return np.round(np.linspace(0, d - 1, n)).astype(int)


def phantom_val_volumes(n: int = 2, seed: int = 1000,
                        shape: tuple[int, int, int] = (10, 216, 256)) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``n`` fully labeled phantom volumes ``(name, image (D, H, W), label (D, H, W))``
    (same format as :func:`acdc_val_volumes`); use a ``seed`` unlike the training one."""
    from napari_m3hl.data.phantom import make_phantom_cohort

    return [(f"phantom_{p.seed}", p.image, p.label) for p in make_phantom_cohort(n, seed=seed, shape=shape)]
