"""Segmentation scores of label maps: per case, per class, and over cases.

Dice, Jaccard, HD95 and ASD of one pair of binary masks (equal to
``medpy.metric.binary``; definitions there) are in
:mod:`napari_m3hl.metrics.binary` and re-exported here, so
``from napari_m3hl.metrics.labelmaps import dice`` keeps working. This module holds
:func:`evaluate_case` (every foreground class of one label map, with a
convention for empty classes), :func:`summarize` (means over cases) and
:func:`format_table`.

The papers' evaluation (``shared/docs/reference-protocol.md``, beside the data) uses no spacing (pixel
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

from napari_m3hl.errors import M3HLInputError
from napari_m3hl.metrics.binary import (
    check_connectivity, hd95_and_asd, normalize_spacing,
)

__all__ = [
    "ClassMetrics",
    "METRIC_NAMES",
    "evaluate_case",
    "format_table",
    "summarize",
]

METRIC_NAMES: tuple[str, ...] = ("dice", "jaccard", "hd95", "asd")

EmptyConvention = Literal["paper", "strict"]


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
    sp = normalize_spacing(spacing, p_lab.ndim)
    conn = check_connectivity(connectivity)
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
            h, a = hd95_and_asd(p, r, sp, conn)
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
