"""What the trainer takes: :class:`TrainData` (two slice sets and the class
layout), the in-memory slice set :class:`VolumeSlices`, and the class names.

A *slice set* is any object with ``__len__`` and ``__getitem__(i) -> (image,
label)``: ``image`` float32 ``(H, W)`` for 2D sets (``(X, Y, Z)`` for the LA
3D set, see :class:`napari_m3hl.data.la.LACases`), ``label`` uint8 of the same
shape, or ``None`` for unlabeled samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from napari_m3hl.errors import M3HLInputError
from napari_m3hl.labels import default_class_names

PathLike = Union[str, Path]


class VolumeSlices:
    """Slice set over in-memory volumes without copying.

    ``volumes``: list of float32 ``(D, H, W)``; ``labels``: matching list of
    uint8 volumes or None entries; ``index``: ``(volume, slice)`` pairs.
    ``labeled=False`` returns ``None`` labels.
    """

    def __init__(self, volumes: Sequence[np.ndarray], labels: Sequence[Optional[np.ndarray]],
                 index: Sequence[tuple[int, int]], labeled: bool) -> None:
        self.volumes = list(volumes)
        self.labels = list(labels)
        self.index = [(int(v), int(z)) for v, z in index]
        self.labeled = bool(labeled)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
        v, z = self.index[i]
        lab = self.labels[v]
        return self.volumes[v][z], (lab[z] if (self.labeled and lab is not None) else None)


@dataclass
class TrainData:
    """What the trainer needs: two slice sets and the class layout.

    ``labeled`` / ``unlabeled``: slice sets (unlabeled may be empty; the
    trainer decides what to do then); ``ndim``: 2 (slices) or 3 (volumes);
    ``num_classes`` incl. background; ``class_names`` one per class (empty:
    :func:`default_class_names`).
    """

    labeled: object
    unlabeled: object
    ndim: int
    num_classes: int
    class_names: tuple[str, ...] = ()
    #: Optional slice set with the true labels of the ``unlabeled`` samples
    #: (ACDC, the phantom), used only to score pseudo-labels, never to train.
    unlabeled_truth: object = None

    def __post_init__(self) -> None:
        if len(self.labeled) == 0:  # type: ignore[arg-type]
            raise M3HLInputError("no labeled slice to train on: label at least one slice (or give labeled cases).")
        if self.ndim not in (2, 3):
            raise M3HLInputError(f"ndim={self.ndim} must be 2 or 3.")
        if self.num_classes < 2:
            raise M3HLInputError(f"num_classes={self.num_classes} must be >= 2.")
        self.class_names = tuple(self.class_names) or default_class_names(self.num_classes)
        if len(self.class_names) != self.num_classes:
            raise M3HLInputError(
                f"{len(self.class_names)} class names {self.class_names} for {self.num_classes} classes."
            )
