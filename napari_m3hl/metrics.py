"""Segmentation metrics equal to ``medpy.metric.binary`` (``dc``, ``jc``, ``hd95``, ``asd``).

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
  (millimetres for the spacing returned by :mod:`napari_m3hl.io`).
* ``hd95`` = 95th percentile (``numpy.percentile``, linear interpolation) of
  the pooled distances pred→ref and ref→pred.
* ``asd`` = mean of the distances pred→ref only (directed, as medpy's
  ``asd``; medpy's ``assd`` would be the symmetric one).

For speed the distance transforms are computed on the bounding box of
``pred | ref`` grown by one voxel; this does not change any value (all border
voxels of both objects lie in the box and the transform is exact).

The papers' evaluation (see ``reference-protocol.md``) uses no spacing (pixel
units), connectivity 1 and the prediction as first argument; a class missing
from the prediction scores 0 on all four metrics. :func:`evaluate_case`
implements that as ``empty_convention="paper"`` and a ``"strict"``
alternative.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from napari_m3hl.errors import M3HLInputError

__all__ = [
    "ClassMetrics",
    "EmptyObjectError",
    "METRIC_NAMES",
    "asd",
    "dice",
    "evaluate_case",
    "format_table",
    "hd95",
    "jaccard",
    "summarize",
    "surface_distances",
]

METRIC_NAMES: tuple[str, ...] = ("dice", "jaccard", "hd95", "asd")

EmptyConvention = Literal["paper", "strict"]


class EmptyObjectError(ValueError):
    """A distance metric was asked for a binary array without any object.

    medpy raises ``RuntimeError`` in that case; HD95 and ASD are undefined
    without a surface on both sides. :func:`evaluate_case` handles it by an
    explicit convention instead.
    """


@dataclass(frozen=True)
class ClassMetrics:
    """Metrics of one foreground class of one case.

    Attributes:
        dice: Dice coefficient in [0, 1].
        jaccard: Jaccard index (IoU) in [0, 1].
        hd95: 95th-percentile symmetric Hausdorff distance, in pixels/voxels
            (no spacing) or in the unit of the spacing (mm); NaN when
            undefined under the ``"strict"`` convention.
        asd: average surface distance prediction → reference (directed), same
            unit as ``hd95``; NaN when undefined under ``"strict"``.
        pred_empty: the class is absent from the prediction.
        ref_empty: the class is absent from the reference.
    """

    dice: float
    jaccard: float
    hd95: float
    asd: float
    pred_empty: bool = False
    ref_empty: bool = False

    @property
    def missed(self) -> bool:
        """The class is in the reference but not in the prediction."""
        return self.pred_empty and not self.ref_empty

    @property
    def false_positive(self) -> bool:
        """The class is predicted although absent from the reference."""
        return self.ref_empty and not self.pred_empty

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON friendly, NaN kept as float NaN)."""
        return asdict(self)


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


def _normalize_spacing(spacing: Any, ndim: int) -> np.ndarray | None:
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


def _check_connectivity(connectivity: int) -> int:
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
    sp = _normalize_spacing(spacing, p.ndim)
    pb, rb = _borders(p, r, _check_connectivity(connectivity))
    return _directed(pb, rb, sp)


def _hd95_asd(
    p: np.ndarray, r: np.ndarray, sp: np.ndarray | None, connectivity: int
) -> tuple[float, float]:
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
    sp = _normalize_spacing(spacing, p.ndim)
    pb, rb = _borders(p, r, _check_connectivity(connectivity))
    return float(np.percentile(np.hstack((_directed(pb, rb, sp), _directed(rb, pb, sp))), 95))


def asd(pred: Any, ref: Any, spacing: Any = None, connectivity: int = 1) -> float:
    """Average surface distance pred → ref, equal to ``medpy.metric.binary.asd``.

    Directed: the mean over the surface voxels of ``pred`` of the distance to
    the nearest surface voxel of ``ref``. Units and arguments as :func:`hd95`.

    Raises:
        EmptyObjectError: (a ``ValueError``) if either array has no object.
    """
    return float(surface_distances(pred, ref, spacing, connectivity).mean())


# --------------------------------------------------------------------------- #
# per-case evaluation
# --------------------------------------------------------------------------- #
def _as_labels(arr: Any, name: str, num_classes: int) -> np.ndarray:
    a = np.asarray(arr)
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise M3HLInputError(
                f"`{name}` must be an integer label map (0 = background), got non-integer floats."
            )
    elif not np.issubdtype(a.dtype, np.integer):
        raise M3HLInputError(f"`{name}` must be an integer label map, got dtype {a.dtype}.")
    if a.size and (a.min() < 0 or a.max() >= num_classes):
        raise M3HLInputError(
            f"`{name}` holds labels in [{a.min()}, {a.max()}] but num_classes={num_classes}; "
            "labels must lie in 0..num_classes-1."
        )
    return np.atleast_1d(a)


def evaluate_case(
    pred: Any,
    ref: Any,
    num_classes: int,
    spacing: Any = None,
    empty_convention: EmptyConvention = "paper",
    connectivity: int = 1,
) -> dict[int, ClassMetrics]:
    """Dice, Jaccard, HD95 and ASD per foreground class of one case.

    Args:
        pred: integer label map (e.g. ``(D, H, W)`` uint8), 0 = background.
        ref: reference label map of the same shape.
        num_classes: number of classes including background; metrics are
            computed for classes ``1 .. num_classes-1`` (ACDC: 4, LA: 2).
        spacing: voxel size per axis (mm) or ``None`` for pixel units (the
            papers' evaluation uses ``None``).
        empty_convention: what to report when a class is absent from the
            prediction and/or the reference (where medpy's HD95/ASD raise):

            ``"paper"`` (default; what the published numbers use, from the
            authors' ``calculate_metric_percase``):
              * absent from the prediction (whether or not it is in the
                reference): dice = jaccard = hd95 = asd = 0. **This flatters
                the distance metrics**: a completely missed structure gets the
                best possible HD95/ASD of 0.
              * predicted but absent from the reference (the authors' code
                would crash in medpy here): dice = jaccard = 0 (what medpy
                gives), hd95 = asd = 0.
            ``"strict"``:
              * absent from the prediction, present in the reference (a
                miss): dice = jaccard = 0, hd95 = asd = NaN.
              * predicted but absent from the reference: dice = jaccard = 0,
                hd95 = asd = NaN.
              * absent from both: dice = jaccard = 1 (medpy's convention for
                two empty arrays), hd95 = asd = NaN.
              NaNs are left out of the means by :func:`summarize`, which
              reports how many cases were missed / false positive.
        connectivity: surface neighbourhood (1 = faces, the papers' setting).

    Returns:
        ``{class_id: ClassMetrics}`` for ``class_id`` in ``1..num_classes-1``;
        ``pred_empty``/``ref_empty`` flags record the empty cases.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise M3HLInputError(
            f"`num_classes` must be an integer >= 2 (background included), got {num_classes!r}."
        )
    if empty_convention not in ("paper", "strict"):
        raise M3HLInputError(
            f"`empty_convention` must be 'paper' or 'strict', got {empty_convention!r}."
        )
    num_classes = int(num_classes)
    p_lab = _as_labels(pred, "pred", num_classes)
    r_lab = _as_labels(ref, "ref", num_classes)
    if p_lab.shape != r_lab.shape:
        raise M3HLInputError(
            f"`pred` shape {p_lab.shape} differs from `ref` shape {r_lab.shape}; "
            "resample the prediction onto the reference grid first."
        )
    sp = _normalize_spacing(spacing, p_lab.ndim)
    conn = _check_connectivity(connectivity)
    nan = math.nan
    out: dict[int, ClassMetrics] = {}
    for c in range(1, num_classes):
        p = p_lab == c
        r = r_lab == c
        p_empty = not p.any()
        r_empty = not r.any()
        if not p_empty and not r_empty:
            inter = np.count_nonzero(p & r)
            n_p = np.count_nonzero(p)
            n_r = np.count_nonzero(r)
            d = float(2.0 * inter / float(n_p + n_r))
            j = float(inter) / float(n_p + n_r - inter)
            h, a = _hd95_asd(p, r, sp, conn)
            out[c] = ClassMetrics(d, j, h, a, False, False)
        elif empty_convention == "paper":
            out[c] = ClassMetrics(0.0, 0.0, 0.0, 0.0, p_empty, r_empty)
        elif p_empty and r_empty:
            out[c] = ClassMetrics(1.0, 1.0, nan, nan, True, True)
        else:
            out[c] = ClassMetrics(0.0, 0.0, nan, nan, p_empty, r_empty)
    return out


# --------------------------------------------------------------------------- #
# summaries
# --------------------------------------------------------------------------- #
def _resolve_names(
    class_ids: list[int], class_names: Sequence[str] | Mapping[int, str] | None
) -> dict[int, str]:
    if class_names is None:
        return {c: f"class {c}" for c in class_ids}
    if isinstance(class_names, Mapping):
        return {c: str(class_names.get(c, f"class {c}")) for c in class_ids}
    names = [str(n) for n in class_names]
    if len(names) == len(class_ids):
        return dict(zip(class_ids, names))
    if class_ids and len(names) == max(class_ids) + 1:
        # includes background at index 0 (e.g. ["background", "RV", "Myo", "LV"])
        return {c: names[c] for c in class_ids}
    raise M3HLInputError(
        f"`class_names` has {len(names)} names for classes {class_ids}; give one name per "
        "foreground class, or one per class including background at index 0."
    )


def summarize(
    cases: Sequence[Mapping[int, ClassMetrics]],
    class_names: Sequence[str] | Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """Per-class mean/std over cases and the mean over classes.

    The protocol of the papers: mean over cases per class, then the mean of
    those per-class means. NaNs (``"strict"`` convention) are left out of the
    means (``nanmean``); ``std`` is the population std (ddof = 0).

    Args:
        cases: one :func:`evaluate_case` result per case (all with the same
            class ids).
        class_names: names of the foreground classes, in class-id order
            (``["RV", "Myo", "LV"]``), or including background at index 0,
            or a ``{class_id: name}`` mapping; ``None`` gives ``"class k"``.

    Returns:
        JSON-ready dict::

            {"n_cases": int,
             "classes": [{"id": 1, "name": "RV",
                          "dice": {"mean": .., "std": ..}, "jaccard": {...},
                          "hd95": {...}, "asd": {...},
                          "n_missed": int, "n_false_positive": int,
                          "n_undefined_distance": int}, ...],
             "mean": {"dice": .., "jaccard": .., "hd95": .., "asd": ..}}

        Dice/Jaccard are fractions in [0, 1]; distances in the unit used for
        evaluation. A mean over only NaNs is NaN.
    """
    if len(cases) == 0:
        raise M3HLInputError("`cases` is empty; evaluate at least one case before summarizing.")
    ids = sorted(cases[0].keys())
    for k, case in enumerate(cases):
        if sorted(case.keys()) != ids:
            raise M3HLInputError(
                f"`cases[{k}]` has classes {sorted(case.keys())} but cases[0] has {ids}; "
                "evaluate every case with the same num_classes."
            )
    names = _resolve_names(ids, class_names)
    classes: list[dict[str, Any]] = []
    means: dict[str, list[float]] = {m: [] for m in METRIC_NAMES}
    for c in ids:
        entry: dict[str, Any] = {"id": c, "name": names[c]}
        for m in METRIC_NAMES:
            vals = np.array([getattr(case[c], m) for case in cases], dtype=np.float64)
            finite = vals[~np.isnan(vals)]
            mean = float(finite.mean()) if finite.size else math.nan
            std = float(finite.std()) if finite.size else math.nan
            entry[m] = {"mean": mean, "std": std}
            means[m].append(mean)
        entry["n_missed"] = int(sum(case[c].missed for case in cases))
        entry["n_false_positive"] = int(sum(case[c].false_positive for case in cases))
        entry["n_undefined_distance"] = int(sum(math.isnan(case[c].hd95) for case in cases))
        classes.append(entry)
    overall = {}
    for m in METRIC_NAMES:
        arr = np.array(means[m], dtype=np.float64)
        fin = arr[~np.isnan(arr)]
        overall[m] = float(fin.mean()) if fin.size else math.nan
    return {"n_cases": len(cases), "classes": classes, "mean": overall}


def _fmt(value: float, scale: float, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value * scale:.{digits}f}"


def format_table(summary: Mapping[str, Any], distance_unit: str = "px", digits: int = 2) -> str:
    """Markdown table of a :func:`summarize` result.

    Dice and Jaccard are shown in percent, HD95 and ASD as stored, labelled
    with ``distance_unit`` (``"px"`` for pixel units, ``"mm"`` when evaluated
    with spacing). Cells are ``mean ± std``; the last row is the mean over
    classes; the "Missed" column counts cases where the class was absent
    from the prediction but present in the reference.

    Returns:
        The table as a string (no trailing newline).
    """
    try:
        classes = summary["classes"]
        overall = summary["mean"]
        n_cases = summary["n_cases"]
    except (KeyError, TypeError) as exc:
        raise M3HLInputError("`summary` must be the dict returned by summarize().") from exc
    header = (
        f"| Class | Dice (%) | Jaccard (%) | HD95 ({distance_unit}) | ASD ({distance_unit}) | Missed |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    scales = {"dice": 100.0, "jaccard": 100.0, "hd95": 1.0, "asd": 1.0}
    for entry in classes:
        cells = [
            f"{_fmt(entry[m]['mean'], scales[m], digits)} ± {_fmt(entry[m]['std'], scales[m], digits)}"
            for m in METRIC_NAMES
        ]
        lines.append(f"| {entry['name']} | " + " | ".join(cells) + f" | {entry['n_missed']}/{n_cases} |")
    cells = [_fmt(overall[m], scales[m], digits) for m in METRIC_NAMES]
    lines.append("| **Mean** | " + " | ".join(cells) + " | |")
    return "\n".join(lines)
