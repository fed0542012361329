"""Scaling a raw image's intensities to [0, 1] the way a network expects them.

Call :meth:`napari_m3hl.inference.predictor.Predictor.scale` to scale an image for a
trained network: it applies the scaling the checkpoint records
(``config.intensity``). Re-exported by :mod:`napari_m3hl.io.nifti`.
"""
from __future__ import annotations

import numpy as np

from napari_m3hl.errors import M3HLInputError


INTENSITY = ("percentile", "minmax")


def scale_intensity(image: np.ndarray, how: str = "percentile") -> np.ndarray:
    """A raw image scaled to [0, 1] (float32, same shape) the way a network
    expects it: ``percentile`` (:func:`normalize_intensity`, 0.5-99.5 %
    clipped) or ``minmax`` (the plain range, as the ACDC training volumes,
    with isolated outliers such as a hot voxel clipped: :func:`robust_range`)."""
    if how not in INTENSITY:
        raise M3HLInputError(f"intensity scaling must be one of {INTENSITY}, got {how!r}")
    if how == "percentile":
        return normalize_intensity(image)
    img = np.asarray(image, dtype=np.float32)
    if not np.all(np.isfinite(img)):
        raise M3HLInputError("scale_intensity: the image contains NaN or infinite values.")
    if img.size == 0:
        return img.copy()
    lo, hi = robust_range(img)
    if hi <= lo:
        return np.zeros_like(img)
    return ((np.clip(img, lo, hi) - lo) / (hi - lo)).astype(np.float32, copy=False)


#: Values further than this many times the 0.1-99.9 % spread beyond those
#: percentiles are outliers for min-max scaling (normal scans: at most 0.8;
#: ACDC's 20 validation volumes, measured in docs/benchmarks.md).
OUTLIER_SPREAD = 2.0


def robust_range(image: np.ndarray) -> tuple[float, float]:
    """(lowest, highest) value of ``image`` once isolated outliers are left out.

    A value is an outlier when it lies more than ``OUTLIER_SPREAD`` times the
    spread between the 0.1 and 99.9 percentiles beyond them (a hot voxel at
    ten times the maximum); the range is that of the other values, so a scan
    without outliers keeps its exact min and max (min-max scaling unchanged)
    and a scan with one hot voxel scales as it would without it."""
    img = np.asarray(image)
    lo, hi = float(img.min()), float(img.max())
    p_lo, p_hi = (float(v) for v in np.percentile(img, [0.1, 99.9]))
    spread = p_hi - p_lo
    if spread <= 0:
        return lo, hi
    low_fence, high_fence = p_lo - OUTLIER_SPREAD * spread, p_hi + OUTLIER_SPREAD * spread
    if lo >= low_fence and hi <= high_fence:
        return lo, hi
    kept = img[(img >= low_fence) & (img <= high_fence)]
    return float(kept.min()), float(kept.max())


def normalize_intensity(image: np.ndarray, lower: float = 0.5, upper: float = 99.5) -> np.ndarray:
    """Robust min-max scaling to [0, 1] (float32, same shape).

    Values are clipped to the ``lower``/``upper`` percentiles and mapped
    linearly onto [0, 1], matching the [0, 1] range of the ACDC training data.
    When the percentiles coincide the plain min/max is used; a constant image
    becomes all zeros.
    """
    image = np.asarray(image, dtype=np.float32)
    if not np.all(np.isfinite(image)):
        raise M3HLInputError("normalize_intensity: the image contains NaN or infinite values.")
    if image.size == 0:
        return image.copy()
    lo, hi = np.percentile(image, [lower, upper])
    if hi <= lo:
        lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        return np.zeros_like(image)
    out = (np.clip(image, lo, hi) - lo) / (hi - lo)
    return out.astype(np.float32, copy=False)
