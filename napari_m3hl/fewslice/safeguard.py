"""Is a few-slice fine-tune worse than its start? And the export that keeps painted slices.

:func:`check_finetune` compares the start model's and the fine-tuned model's
segmentations of one volume against the user's painted slices; the caller
(widget, CLI, benchmark) shows :attr:`Verdict.message` and, when
:attr:`Verdict.suspect`, offers the start model's segmentation instead.
:func:`merge_painted` builds the exported label volume: the painted slices
exactly as painted, the network's prediction elsewhere.

Volumes are (D, H, W) integer label maps, slices along axis 0; Dice in 0..1.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from napari_m3hl.errors import M3HLInputError
from napari_m3hl.labels import labeled_mask, labeled_slices
from napari_m3hl.metrics.quality import class_dice

#: A fine-tune is suspect when its mean Dice on the painted slices is more than
#: this below the start model's there (it was trained on them: it must fit them).
PAINTED_MARGIN = 0.02
#: ... or when, for some class, it changes the unpainted slices (1 − Dice between
#: the start model's and its segmentation) by more than the start model's error
#: on the painted slices for that class (1 − its Dice there) times CHANGE_FACTOR
#: plus CHANGE_SLACK: a fine-tune should correct about as much as the start got
#: wrong where we know the truth, not rewrite the volume.
CHANGE_FACTOR = 2.0
CHANGE_SLACK = 0.10


@dataclass
class Verdict:
    """The safeguard's decision on one fine-tune.

    ``painted_base`` / ``painted_tuned``: mean Dice on the painted slices;
    ``drift`` per class name: 1 − Dice(start, tuned) on the unpainted slices;
    ``expected`` per class: 1 − Dice(start, painted) on the painted slices.
    """

    suspect: bool
    message: str
    painted_base: float
    painted_tuned: float
    drift: dict[str, float] = field(default_factory=dict)
    expected: dict[str, float] = field(default_factory=dict)


def check_finetune(base: np.ndarray, tuned: np.ndarray, painted: np.ndarray, num_classes: int,
                   class_names: tuple[str, ...] | None = None, painted_margin: float = PAINTED_MARGIN,
                   change_factor: float = CHANGE_FACTOR, change_slack: float = CHANGE_SLACK) -> Verdict:
    """Decide whether ``tuned`` (the fine-tuned segmentation) is suspect.

    Args:
        base, tuned, painted: (D, H, W) label maps; ``painted`` is nonzero on
            the painted slices only (a slice with any nonzero label counts as painted).
        num_classes: including background; classes 1..num_classes-1 are scored.
    """
    base, tuned, painted = (np.asarray(a) for a in (base, tuned, painted))
    if not base.shape == tuned.shape == painted.shape or base.ndim != 3:
        raise M3HLInputError(f"safeguard needs three (D, H, W) volumes of one shape, got {base.shape}, "
                             f"{tuned.shape}, {painted.shape}")
    names = tuple(class_names or [f"class {c}" for c in range(num_classes)])
    on = labeled_slices(painted)
    off = np.setdiff1d(np.arange(painted.shape[0]), on)
    classes = range(1, num_classes)
    present = [c for c in classes if (painted[on] == c).any()]
    start_fit = class_dice(base[on], painted[on], present)
    pb = float(np.mean(list(start_fit.values()))) if present else float("nan")
    pt = float(np.mean(list(class_dice(tuned[on], painted[on], present).values()))) if present else float("nan")
    drift = {names[c]: 1.0 - d for c, d in class_dice(base[off], tuned[off], classes).items()} if off.size else {}
    expected = {names[c]: 1.0 - d for c, d in start_fit.items()}
    if present and pt < pb - painted_margin:
        msg = (f"The fine-tuned model matches your painted slices worse than the start model did "
               f"({100 * pt:.0f} vs {100 * pb:.0f} Dice); keeping the start model's segmentation is safer.")
        return Verdict(True, msg, pb, pt, drift, expected)
    worst = None
    for name, exp in expected.items():
        if name in drift and drift[name] > change_factor * exp + change_slack:
            if worst is None or drift[name] - exp > drift[worst] - expected[worst]:
                worst = name
    if worst is not None:
        msg = (f"The fine-tune changed {worst} on the unpainted slices much more than your painted slices "
               f"suggest ({100 * drift[worst]:.0f}% changed, the start model was {100 * expected[worst]:.0f}% off "
               f"where you painted); check it, or keep the start model's segmentation.")
        return Verdict(True, msg, pb, pt, drift, expected)
    msg = (f"Fine-tuned: {100 * pt:.0f} Dice on your painted slices (start model {100 * pb:.0f}); "
           f"no sign of a regression on the other slices.")
    return Verdict(False, msg, pb, pt, drift, expected)


def merge_painted(prediction: np.ndarray, painted: np.ndarray, keep_painted: bool = True) -> np.ndarray:
    """The label volume to export, (D, H, W) in ``prediction``'s dtype.

    Every slice with any nonzero painted label is taken exactly as painted
    (background included: the user's slice wins as a whole); the other slices
    are the prediction. ``keep_painted=False`` returns the prediction alone (a copy).
    """
    pred, lab = np.asarray(prediction), np.asarray(painted)
    if pred.shape != lab.shape or pred.ndim != 3:
        raise M3HLInputError(f"prediction {pred.shape} and painted labels {lab.shape} must be (D, H, W) of one shape")
    out = pred.copy()
    if keep_painted:
        on = labeled_mask(lab)
        out[on] = lab[on].astype(out.dtype)
    return out


def merge_frames(segmentation: np.ndarray, painted: np.ndarray | None, keep_painted: bool = True) -> np.ndarray:
    """The label volume to export: (D, H, W) or (T, D, H, W) like ``segmentation``.

    With ``keep_painted`` every slice the user painted is taken exactly as
    painted and the rest from ``segmentation``
    (:func:`merge_painted`, per frame of a cine);
    without it, or without ``painted``, ``segmentation`` alone.
    """
    seg = np.asarray(segmentation)
    if painted is None or not keep_painted:
        return seg
    lab = np.asarray(painted)
    if seg.ndim == 3:
        return merge_painted(seg, lab)
    return np.stack([merge_painted(seg[t], lab[t]) for t in range(seg.shape[0])])
