"""Metrics of one pair of binary masks, equal to ``medpy.metric.binary`` (``dc``, ``jc``, ``hd95``, ``asd``).

Only numpy and :mod:`scipy.ndimage` are used at run time; the test suite checks
the values against medpy on many random shapes.

Definitions (identical to medpy 0.5):

* ``obj`` is the binary array cast to ``bool`` (any non-zero value is object).
* Surface (border) of an object:
  ``obj ^ binary_erosion(obj, generate_binary_structure(ndim, connectivity), iterations=1)``
  (voxels outside the array count as background, so an object touching the
  array edge has a border there).
* Surface distances from A to B: for every border voxel of A, the Euclidean
  distance to the nearest border voxel of B, from
  ``distance_transform_edt(~border_B, sampling=spacing)``. Units are voxels
  (pixels) when ``spacing`` is ``None``, else the unit of ``spacing``
  (millimetres for the spacing returned by :mod:`napari_m3hl.io.nifti`).
* ``hd95`` = 95th percentile (``numpy.percentile``, linear interpolation) of
  the pooled distances pred→ref and ref→pred.
* ``asd`` = mean of the distances pred→ref only (directed, as medpy's
  ``asd``; medpy's ``assd`` would be the symmetric one).

For speed the distance transforms are computed on the bounding box of
``pred | ref`` grown by one voxel; this does not change any value (all border
voxels of both objects lie in the box and the transform is exact).

Per-case evaluation of label maps and summaries over cases are in
:mod:`napari_m3hl.metrics.labelmaps`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from napari_m3hl.errors import M3HLInputError

__all__ = [
    "EmptyObjectError",
    "asd",
    "check_connectivity",
    "dice",
    "hd95",
    "hd95_and_asd",
    "jaccard",
    "normalize_spacing",
    "surface_distances",
]


class EmptyObjectError(ValueError):
    """A distance metric was asked for a binary array without any object.

    medpy raises ``RuntimeError`` in that case; HD95 and ASD are undefined
    without a surface on both sides. :func:`evaluate_case` handles it by an
    explicit convention instead.
    """


# --------------------------------------------------------------------------- #
# input checks
# --------------------------------------------------------------------------- #
def _as_bool(arr: Any, name: str) -> np.ndarray:
    try:
        a = np.asarray(arr)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise M3HLInputError(f"`{name}` must be array-like ({exc}).") from exc
    if a.dtype == object:
        raise M3HLInputError(f"`{name}` must be a numeric or boolean array, got dtype object.")
    if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
        raise M3HLInputError(f"`{name}` contains NaN or infinite values; pass a binary mask.")
    return np.atleast_1d(a.astype(bool))


def _pair(pred: Any, ref: Any) -> tuple[np.ndarray, np.ndarray]:
    p = _as_bool(pred, "pred")
    r = _as_bool(ref, "ref")
    if p.shape != r.shape:
        raise M3HLInputError(
            f"`pred` shape {p.shape} differs from `ref` shape {r.shape}; "
            "pass the prediction and reference of the same case on the same grid."
        )
    return p, r


def normalize_spacing(spacing: Any, ndim: int) -> np.ndarray | None:
    """Spacing as float64 array of length ``ndim`` (scalar is broadcast)."""
    if spacing is None:
        return None
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.ndim == 0:
        sp = np.full(ndim, float(sp))
    if sp.shape != (ndim,):
        raise M3HLInputError(
            f"`spacing` has {sp.size} values for a {ndim}-D array; give one spacing per axis "
            "(same axis order as the array) or None for pixel units."
        )
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise M3HLInputError(f"`spacing` must be positive and finite, got {sp.tolist()}.")
    return np.ascontiguousarray(sp)


def check_connectivity(connectivity: int) -> int:
    if isinstance(connectivity, bool) or not isinstance(connectivity, (int, np.integer)) or connectivity < 1:
        raise M3HLInputError(
            f"`connectivity` must be an integer >= 1 (1 = face neighbours), got {connectivity!r}."
        )
    return int(connectivity)


# --------------------------------------------------------------------------- #
# overlap metrics
# --------------------------------------------------------------------------- #
def dice(pred: Any, ref: Any) -> float:
    """Dice coefficient ``2|P∩R| / (|P|+|R|)`` of two binary arrays of any shape.

    Equal to ``medpy.metric.binary.dc(pred, ref)``. Two empty arrays give 1.0,
    medpy's intended edge case (its ``except ZeroDivisionError: dc = 1.0``);
    note that medpy 0.5.2 with numpy >= 2 actually returns NaN there (numpy
    integer division by zero warns instead of raising), while its ``jc``
    still returns 1.0.
    """
    p, r = _pair(pred, ref)
    inter = np.count_nonzero(p & r)
    total = np.count_nonzero(p) + np.count_nonzero(r)
    if total == 0:
        return 1.0
    return float(2.0 * inter / float(total))


def jaccard(pred: Any, ref: Any) -> float:
    """Jaccard index ``|P∩R| / |P∪R|`` of two binary arrays of any shape.

    Equal to ``medpy.metric.binary.jc(pred, ref)``; two empty arrays give 1.0.
    """
    p, r = _pair(pred, ref)
    inter = np.count_nonzero(p & r)
    union = np.count_nonzero(p | r)
    if union == 0:
        return 1.0
    return float(inter) / float(union)


# --------------------------------------------------------------------------- #
# surface distances
# --------------------------------------------------------------------------- #
def _crop_box(p: np.ndarray, r: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of ``p | r`` grown by one voxel, clipped to the array."""
    union = p | r
    box = ndimage.find_objects(union.view(np.uint8) if union.dtype == bool else union.astype(np.uint8))
    if not box or box[0] is None:
        return tuple(slice(0, n) for n in p.shape)
    return tuple(
        slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box[0], p.shape)
    )


def _borders(
    p: np.ndarray, r: np.ndarray, connectivity: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cropped 1-voxel borders of both objects (raises on empty input)."""
    if not p.any():
        raise EmptyObjectError(
            "`pred` contains no object: surface distances (HD95, ASD) are undefined for an "
            "empty prediction; use evaluate_case() for a convention."
        )
    if not r.any():
        raise EmptyObjectError(
            "`ref` contains no object: surface distances (HD95, ASD) are undefined for an "
            "empty reference; use evaluate_case() for a convention."
        )
    box = _crop_box(p, r)
    pc = p[box]
    rc = r[box]
    footprint = ndimage.generate_binary_structure(pc.ndim, connectivity)
    pb = pc ^ ndimage.binary_erosion(pc, structure=footprint, iterations=1)
    rb = rc ^ ndimage.binary_erosion(rc, structure=footprint, iterations=1)
    return pb, rb


def _directed(src_border: np.ndarray, dst_border: np.ndarray, sp: np.ndarray | None) -> np.ndarray:
    dt = ndimage.distance_transform_edt(~dst_border, sampling=sp)
    return np.asarray(dt[src_border], dtype=np.float64)


def surface_distances(
    pred: Any, ref: Any, spacing: Any = None, connectivity: int = 1
) -> np.ndarray:
    """Distances from every surface voxel of ``pred`` to the surface of ``ref``.

    Args:
        pred, ref: binary arrays of the same shape (any ndim).
        spacing: voxel size per axis (same axis order), a scalar, or ``None``
            for voxel units.
        connectivity: neighbourhood used to find the surface (1 = faces).

    Returns:
        float64 1-D array, one distance per surface voxel of ``pred`` (C order),
        equal to medpy's private ``__surface_distances(pred, ref, ...)``.

    Raises:
        EmptyObjectError: ``pred`` or ``ref`` has no object.
    """
    p, r = _pair(pred, ref)
    sp = normalize_spacing(spacing, p.ndim)
    pb, rb = _borders(p, r, check_connectivity(connectivity))
    return _directed(pb, rb, sp)


def hd95_and_asd(
    p: np.ndarray, r: np.ndarray, sp: np.ndarray | None, connectivity: int
) -> tuple[float, float]:
    """(:func:`hd95`, :func:`asd`) of two bool arrays of one shape from one pair
    of borders; ``sp`` and ``connectivity`` already checked
    (:func:`normalize_spacing`, :func:`check_connectivity`)."""
    pb, rb = _borders(p, r, connectivity)
    d_pr = _directed(pb, rb, sp)
    d_rp = _directed(rb, pb, sp)
    hd = float(np.percentile(np.hstack((d_pr, d_rp)), 95))
    return hd, float(d_pr.mean())


def hd95(pred: Any, ref: Any, spacing: Any = None, connectivity: int = 1) -> float:
    """95th-percentile Hausdorff distance, equal to ``medpy.metric.binary.hd95``.

    Args:
        pred, ref: binary arrays of the same shape (any ndim).
        spacing: voxel size per axis (e.g. mm, same axis order as the arrays),
            a scalar, or ``None`` for voxel units (the papers' setting).
        connectivity: surface neighbourhood, 1 = faces (the papers' setting).

    Returns:
        95th percentile of the pooled surface distances pred→ref and ref→pred,
        in voxels or the unit of ``spacing``.

    Raises:
        EmptyObjectError: (a ``ValueError``) if either array has no object.
    """
    p, r = _pair(pred, ref)
    sp = normalize_spacing(spacing, p.ndim)
    pb, rb = _borders(p, r, check_connectivity(connectivity))
    return float(np.percentile(np.hstack((_directed(pb, rb, sp), _directed(rb, pb, sp))), 95))


def asd(pred: Any, ref: Any, spacing: Any = None, connectivity: int = 1) -> float:
    """Average surface distance pred → ref, equal to ``medpy.metric.binary.asd``.

    Directed: the mean over the surface voxels of ``pred`` of the distance to
    the nearest surface voxel of ``ref``. Units and arguments as :func:`hd95`.

    Raises:
        EmptyObjectError: (a ``ValueError``) if either array has no object.
    """
    return float(surface_distances(pred, ref, spacing, connectivity).mean())
