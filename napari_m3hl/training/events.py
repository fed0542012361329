"""Events yielded by the trainer; the CLI prints them, the widget draws them.

All arrays are CPU numpy arrays, so a consumer in another thread never
touches a tensor on the training device.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TrainStarted:
    """Training begins (or resumes at ``start_iteration``)."""

    total_iterations: int
    start_iteration: int
    device: str
    n_labeled: int
    n_unlabeled: int
    mode: str


@dataclass
class Progress:
    """One or more optimiser steps done.

    ``losses`` holds the terms of the last step (``total``, ``mix``, ``low``,
    ``high``, ``sup``; only those in use). ``images_per_s`` counts network
    input images (labeled + unlabeled) per second over recent steps.
    """

    iteration: int
    total_iterations: int
    losses: dict[str, float]
    lr: float
    images_per_s: float
    elapsed_s: float
    eta_s: float


@dataclass
class MixPreview:
    """The current mutually mixed training images, first sample of each mix.

    ``images``: (2, H, W) float32 (mix_u, mix_l); ``targets``: (2, H, W) uint8
    mixed labels/pseudo-labels; ``masks``: (2, H, W) uint8, 1 where the pixel
    came from the unlabeled image.
    """

    iteration: int
    images: np.ndarray
    targets: np.ndarray
    masks: np.ndarray


@dataclass
class VolumePreview:
    """The teacher's prediction of the preview volume, (D, H, W) uint8."""

    iteration: int
    labels: np.ndarray
    token: object = None


@dataclass
class Validation:
    """Validation of the student on held-out volumes (mean Dice over classes, 0..1)."""

    iteration: int
    mean_dice: float
    per_class: dict[str, float]
    best: bool


@dataclass
class PseudoLabelQuality:
    """Dice (0..1) of the teacher's pseudo-labels (``pl_*``) and of the student
    (``student_*``) against the hidden labels of a fixed set of unlabeled
    samples, never used for training (see :mod:`napari_m3hl.training.pl_quality`)."""

    iteration: int
    scores: dict[str, float]


@dataclass
class CheckpointSaved:
    iteration: int
    path: str
    kind: str  # "last", "best", "final"


@dataclass
class TrainFinished:
    """Training ended; ``stopped`` is True when stopped before the last iteration."""

    iteration: int
    checkpoint: str | None
    best_checkpoint: str | None
    stopped: bool
    metrics: dict[str, float] = field(default_factory=dict)


Event = (TrainStarted | Progress | MixPreview | VolumePreview | Validation | PseudoLabelQuality | CheckpointSaved
         | TrainFinished)
