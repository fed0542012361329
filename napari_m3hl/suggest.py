"""Which slice to label next: per-slice uncertainty of the model's prediction.

Scores are computed from class probabilities of a whole volume, as returned
by ``inference.predict_volume_2d(..., return_probs=True)``: ``(C, D, H, W)``
float32 that sum to 1 over C. Each score is averaged over the slice's
*region of interest* (pixels that the student or the teacher assigns to a
foreground class), so a large, confidently-empty background does not dilute
a slice whose small heart is ambiguous; a slice with no foreground at all
scores 0.

- ``"entropy"``: mean predictive entropy of the student (nats).
- ``"disagreement"``: share of pixels where the student's and the teacher's
  argmax differ.
- ``"margin"``: mean (1 − (p_max − p_second)) of the student.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

METHODS = ("entropy", "disagreement", "margin")


def _roi(labels_a: np.ndarray, labels_b: np.ndarray | None) -> np.ndarray:
    roi = labels_a > 0
    if labels_b is not None:
        roi |= labels_b > 0
    return roi


def slice_scores(student_probs: np.ndarray, teacher_probs: np.ndarray | None = None, method: str = "entropy") -> np.ndarray:
    """Uncertainty per slice.

    Args:
        student_probs: (C, D, H, W) probabilities of the student.
        teacher_probs: (C, D, H, W) of the teacher; needed for ``"disagreement"``.
        method: one of :data:`METHODS`.

    Returns:
        (D,) float64, higher = less certain.
    """
    if method not in METHODS:
        raise ValueError(f"unknown suggestion score {method!r}; choose one of {METHODS}")
    if student_probs.ndim != 4:
        raise ValueError(f"student_probs must be (C, D, H, W), got shape {student_probs.shape}")
    s_lab = student_probs.argmax(0)
    t_lab = teacher_probs.argmax(0) if teacher_probs is not None else None
    roi = _roi(s_lab, t_lab)
    if method == "entropy":
        p = np.clip(student_probs, 1e-8, 1.0)
        per_pixel = -(p * np.log(p)).sum(0)
    elif method == "margin":
        top2 = np.sort(student_probs, axis=0)[-2:]
        per_pixel = 1.0 - (top2[1] - top2[0])
    else:
        if teacher_probs is None:
            raise ValueError("the 'disagreement' score needs the teacher's probabilities")
        per_pixel = (s_lab != t_lab).astype(np.float64)
    area = roi.sum(axis=(1, 2))
    total = (per_pixel * roi).sum(axis=(1, 2))
    return np.where(area > 0, total / np.maximum(area, 1), 0.0)


def rank_slices(scores: np.ndarray, labeled: Iterable[int] = ()) -> list[int]:
    """Unlabeled slice indices, most uncertain first (ties: lower index first)."""
    done = set(int(i) for i in labeled)
    order = np.argsort(-np.asarray(scores), kind="stable")
    return [int(i) for i in order if int(i) not in done]


def disagreement_map(student_labels: np.ndarray, teacher_labels: np.ndarray) -> np.ndarray:
    """uint8 map, 1 where the student's and the teacher's labels differ."""
    if student_labels.shape != teacher_labels.shape:
        raise ValueError(f"label maps differ in shape: {student_labels.shape} vs {teacher_labels.shape}")
    return (student_labels != teacher_labels).astype(np.uint8)
