"""Which slice to label next: per-slice uncertainty of the model's prediction.

Scores are computed from class probabilities of a whole volume, as returned
by ``inference.predict_volume_2d(..., return_probs=True)``: ``(C, D, H, W)``
float32 that sum to 1 over C. Each score is averaged over the slice's
*region of interest* (pixels that the scored network assigns to a foreground
class; for disagreement, that the student or the teacher does), so a large, confidently-empty background does not dilute
a slice whose small heart is ambiguous; a slice with no foreground at all
scores 0.

- ``"entropy"``: mean predictive entropy of the scored network (nats).
- ``"total-entropy"``: the same entropy summed over the region of interest
  and divided by the slice's pixel count (nats per pixel of the slice), so a
  slice with a large uncertain heart outranks one with a small uncertain
  heart: the uncertainty that weighs on a volume's Dice.
- ``"disagreement"``: share of pixels where the student's and the teacher's
  argmax differ.
- ``"margin"``: mean (1 − (p_max − p_second)) of the scored network.

The scored network is the one that segments (``analyse_volume(network=...)``):
the student by default, or the EMA teacher.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from napari_m3hl.errors import M3HLInputError
from napari_m3hl.labels import labeled_slices

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from napari_m3hl.inference.predictor import Predictor

METHODS = ("entropy", "total-entropy", "disagreement", "margin")
#: Networks whose uncertainty can be scored (the one that segments).
NETWORKS = ("student", "teacher")
#: The default score: the best plain score of ``benchmarks/active_learning.py`` on
#: real ACDC volumes (docs/benchmarks.md); note that random picks did as well there.
DEFAULT_METHOD = "disagreement"
#: The default scored network for the CLI (the widget scores the network it segments with).
DEFAULT_NETWORK = "student"
#: Rank by score × distance to the nearest labeled slice by default (``rank_slices(spread=...)``);
#: measured only with the teacher's entropy, so off by default.
DEFAULT_SPREAD = False


def _roi(labels_a: np.ndarray, labels_b: np.ndarray | None) -> np.ndarray:
    roi = labels_a > 0
    if labels_b is not None:
        roi |= labels_b > 0
    return roi


def slice_scores(student_probs: np.ndarray, teacher_probs: np.ndarray | None = None, method: str = "entropy") -> np.ndarray:
    """Uncertainty per slice.

    Args:
        student_probs: (C, D, H, W) probabilities of the scored network
            (entropy and margin are computed from these; the student unless
            the caller scores the teacher).
        teacher_probs: (C, D, H, W) of the other network; needed for
            ``"disagreement"`` (symmetric; its foreground joins the region of
            interest), unused by entropy and margin.
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
    roi = _roi(s_lab, t_lab if method == "disagreement" else None)
    if method in ("entropy", "total-entropy"):
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
    if method == "total-entropy":
        return total / float(roi.shape[1] * roi.shape[2])
    return np.where(area > 0, total / np.maximum(area, 1), 0.0)


def distance_to_labeled(depth: int, labeled: Iterable[int]) -> np.ndarray:
    """(depth,) float64: slices from each slice to the nearest labeled slice
    (0 on labeled slices; ``depth`` everywhere when none is labeled)."""
    z = np.arange(depth)
    done = np.array(sorted(set(int(i) for i in labeled)), dtype=np.int64)
    if done.size == 0:
        return np.full(depth, float(depth))
    return np.abs(z[:, None] - done[None, :]).min(axis=1).astype(np.float64)


def rank_slices(scores: np.ndarray, labeled: Iterable[int] = (), spread: bool = False) -> list[int]:
    """Unlabeled slice indices, most uncertain first (ties: lower index first).

    ``spread``: rank by score × distance (in slices) to the nearest labeled
    slice, so that an uncertain slice next to one already labeled (which
    teaches the network little that is new) gives way to one farther off.
    """
    done = set(int(i) for i in labeled)
    key = np.asarray(scores, dtype=np.float64)
    if spread:
        key = key * distance_to_labeled(len(key), done)
    order = np.argsort(-key, kind="stable")
    return [int(i) for i in order if int(i) not in done]


def disagreement_map(student_labels: np.ndarray, teacher_labels: np.ndarray) -> np.ndarray:
    """uint8 map, 1 where the student's and the teacher's labels differ."""
    if student_labels.shape != teacher_labels.shape:
        raise ValueError(f"label maps differ in shape: {student_labels.shape} vs {teacher_labels.shape}")
    return (student_labels != teacher_labels).astype(np.uint8)


def check_labels(image_path: str | Path, image: Any, labels_path: str | Path, num_classes: int,
                 notes: list[str] | None = None) -> list[int]:
    """Read ``labels_path`` and check that it holds partial labels of ``image``
    (a :class:`~napari_m3hl.io.nifti.NiftiVolume`); returns its labeled slices (Z).

    Labels stored on another grid whose voxels fall on the image's are moved
    onto it (:func:`napari_m3hl.io.grid.labels_on_image_grid`; its message is
    appended to ``notes``). Refused with :class:`M3HLInputError`: the image
    file itself, another shape with the same affine, another grid (labels of
    another image, the offset named), NaN/fractional values (an image, not a
    label map) and values outside ``0..num_classes-1``."""
    from napari_m3hl.io.grid import labels_on_image_grid
    from napari_m3hl.io.nifti import load_nifti

    image_path, labels_path = Path(image_path), Path(labels_path)
    try:
        same = labels_path.is_file() and os.path.samefile(image_path, labels_path)
    except OSError:
        same = False
    if same:
        raise M3HLInputError(f"--labels {labels_path} is the image itself; give the label map painted on it")
    lab = load_nifti(labels_path)
    if lab.data.shape != image.data.shape and np.allclose(lab.affine, image.affine, atol=1e-3):
        raise M3HLInputError(f"labels {labels_path} have shape {lab.data.shape} (Z, Y, X) but the image has "
                             f"{image.data.shape}; give the labels drawn on this image")
    data = lab.data
    if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
        raise M3HLInputError(f"labels {labels_path} hold fractional or NaN values: is it an image rather than a "
                             "label map? Give the label map (whole class numbers)")
    data, moved = labels_on_image_grid(data, lab.affine, image.data.shape, image.affine, f"labels {labels_path}")
    if moved and notes is not None:
        notes.append(moved)
    if np.array_equal(data, image.data) and np.unique(data).size > 2:
        raise M3HLInputError(f"labels {labels_path} hold the same voxels as the image; give the label map")
    lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if lo < 0 or hi >= num_classes:
        raise M3HLInputError(f"labels {labels_path} hold the value {int(lo if lo < 0 else hi)} but the model knows "
                             f"classes 0..{num_classes - 1}; give labels made for this model")
    return [int(z) for z in labeled_slices(data)]


@dataclass
class SliceAnalysis:
    """What the models make of one ``(D, H, W)`` volume.

    ``scores``: (D,) float64 uncertainty per slice (``method``; higher = less
    certain); ``student`` / ``teacher``: (D, H, W) uint8 label maps (teacher
    None when no teacher was given); ``disagreement``: (D, H, W) uint8, 1
    where the two differ (None without a teacher); ``network``: whose
    probabilities entropy and margin measured.
    """

    method: str
    scores: np.ndarray
    student: np.ndarray
    teacher: np.ndarray | None = None
    disagreement: np.ndarray | None = None
    network: str = "student"

    def ranking(self, labeled: Iterable[int] = (), spread: bool = False) -> list[int]:
        """Unlabeled slices, most uncertain first (``spread``: see :func:`rank_slices`)."""
        return rank_slices(self.scores, labeled, spread)


def analyse_volume(
    student: "torch.nn.Module | Predictor",
    volume: np.ndarray,
    teacher: "torch.nn.Module | Predictor | None" = None,
    method: str = "entropy",
    patch: Sequence[int] = (256, 256),
    resize_input: str = "bilinear",
    device: "str | torch.device | None" = None,
    batch_size: int = 8,
    network: str = "student",
) -> SliceAnalysis:
    """Predict ``volume`` (float32 (D, H, W), normalised as in training) with the
    student (and the teacher, if given) and score every slice by ``method``.

    ``student``/``teacher``: :class:`~napari_m3hl.inference.predictor.Predictor` objects
    (they carry their own patch, input resizing and device; ``patch``,
    ``resize_input`` and ``device`` are then ignored) or bare 2D networks.
    ``network``: whose probabilities ``"entropy"`` and ``"margin"`` measure:
    ``"student"`` or ``"teacher"`` (the network that segments; needs ``teacher``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown suggestion score {method!r}; choose one of {METHODS}")
    if network not in NETWORKS:
        raise ValueError(f"unknown network {network!r}; choose one of {NETWORKS}")
    if method == "disagreement" and teacher is None:
        raise ValueError("the 'disagreement' score needs a teacher network")
    if network == "teacher" and teacher is None:
        raise ValueError("scoring the teacher needs a teacher network")
    as_predictor = _predictor_factory(patch, resize_input, device, batch_size)
    s_lab, s_prob = as_predictor(student).predict(volume, return_probs=True)
    t_lab = t_prob = None
    if teacher is not None:
        t_lab, t_prob = as_predictor(teacher).predict(volume, return_probs=True)
    scores = slice_scores(t_prob, s_prob, method) if network == "teacher" else slice_scores(s_prob, t_prob, method)
    dis = disagreement_map(s_lab, t_lab) if t_lab is not None else None
    return SliceAnalysis(method, scores, s_lab.astype(np.uint8), None if t_lab is None else t_lab.astype(np.uint8), dis,
                         network)


def _predictor_factory(patch: Sequence[int], resize_input: str, device: Any, batch_size: int):
    """``net -> Predictor``: a Predictor is kept (with ``batch_size``), a bare
    2D network is wrapped with ``patch``, ``resize_input`` and ``device``."""
    from dataclasses import replace

    from napari_m3hl.inference.predictor import Predictor

    def as_predictor(net: Any) -> Predictor:
        if isinstance(net, Predictor):
            return replace(net, batch_size=batch_size)
        return Predictor(net, tuple(int(p) for p in patch), 0, (), resize_input, device=device, batch_size=batch_size,
                         clean=False)  # a bare network: no class count to clean by

    return as_predictor
