"""The Left Atrium (LA) set in the shared preprocessed form: cases
``cases/<ID>/mri_norm2.h5`` named by ``train.list``, 3D ``(X, Y, Z)``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from napari_m3hl.errors import M3HLInputError
from napari_m3hl.io.h5 import load_la_case
from napari_m3hl.data.cached import CachedH5Set, read_list
from napari_m3hl.labels import LA_CLASSES
from napari_m3hl.data.types import PathLike, TrainData


class LACases(CachedH5Set):
    """LA cases ``root/cases/<ID>/mri_norm2.h5``, read lazily.

    ``__getitem__(i)`` -> ``(image float32 (X, Y, Z), label uint8 (X, Y, Z))``
    **as stored** (z-score normalised image; not transposed to ``(D, H, W)``,
    the LA patch ``112 x 112 x 80`` is in this order), or ``(image, None)`` when
    ``labeled`` is False. Keeps the last ``cache_size`` cases (~10 MB each).
    """

    def __init__(self, root: PathLike, names: Sequence[str], labeled: bool, cache_size: int = 16) -> None:
        super().__init__(root, names, labeled, cache_size)

    def path(self, name: str) -> Path:
        return self.root / "cases" / name / "mri_norm2.h5"

    _path = path  # the name callers used before the shared base

    def read(self, path: Path, need_label: bool) -> tuple[np.ndarray, Optional[np.ndarray]]:
        return load_la_case(path, need_label=need_label)

    def missing_message(self, missing: list[str]) -> str:
        return (f"{len(missing)} LA case file(s) missing, e.g. '{self.path(missing[0])}'. "
                "Check that the LA root holds 'cases/<ID>/mri_norm2.h5' for every listed case.")


def la_split(root: PathLike, labeled: int = 8) -> tuple[list[str], list[str]]:
    """Split ``root/train.list`` into (first ``labeled`` cases, the rest)."""
    names = read_list(Path(root) / "train.list")
    if not 0 < int(labeled) <= len(names):
        raise M3HLInputError(f"labeled={labeled} must lie in 1..{len(names)} for '{root}'.")
    return names[: int(labeled)], names[int(labeled):]


def la_train_data(root: PathLike, labeled_cases: int = 8) -> TrainData:
    """3D :class:`TrainData` of an LA root: the first ``labeled_cases`` cases labeled."""
    lab_names, unl_names = la_split(root, labeled_cases)
    return TrainData(LACases(root, lab_names, True), LACases(root, unl_names, False),
                     ndim=3, num_classes=2, class_names=LA_CLASSES)
