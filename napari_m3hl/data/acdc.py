"""ACDC in the shared preprocessed form: training slices ``slices/<name>.h5``
named by ``train_slices.list``, validation volumes ``volumes/<name>.h5`` named
by ``val.list``, and the papers' labeled/unlabeled split by patients."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from napari_m3hl.errors import M3HLInputError
from napari_m3hl.io.h5 import load_h5_slice, load_h5_volume
from napari_m3hl.data.cached import CachedH5Set, read_list
from napari_m3hl.labels import ACDC_CLASSES
from napari_m3hl.data.types import PathLike, TrainData


def patient_of(slice_name: str) -> str:
    """Patient prefix of an ACDC slice/volume name (``patient099_frame01_slice_15`` -> ``patient099``)."""
    return slice_name.split("_", 1)[0]


def patient_slice_counts(names: Sequence[str]) -> "OrderedDict[str, int]":
    """Slices per patient, patients in order of first appearance in ``names``."""
    counts: OrderedDict[str, int] = OrderedDict()
    for n in names:
        p = patient_of(n)
        counts[p] = counts.get(p, 0) + 1
    return counts


def slices_for_patients(names: Sequence[str], n_patients: int) -> int:
    """Length of the leading run of ``names`` that belongs to the first
    ``n_patients`` patients (7 ACDC patients -> 136 slices)."""
    if n_patients < 0:
        raise M3HLInputError(f"labeled_patients={n_patients} must be >= 0.")
    seen: list[str] = []
    for i, n in enumerate(names):
        p = patient_of(n)
        if p not in seen:
            if len(seen) == n_patients:
                return i
            seen.append(p)
    if len(seen) < n_patients:
        raise M3HLInputError(
            f"labeled_patients={n_patients} but the list names only {len(seen)} patients."
        )
    return len(names)



class ACDCSlices(CachedH5Set):
    """ACDC training slices ``root/slices/<name>.h5``, read lazily.

    ``__getitem__(i)`` -> ``(image float32 (H, W) in [0, 1], label uint8
    (H, W))`` or ``(image, None)`` when ``labeled`` is False (the label is
    then not even read). The last ``cache_size`` slices read are kept.
    """

    def __init__(self, root: PathLike, names: Sequence[str], labeled: bool, cache_size: int = 256) -> None:
        super().__init__(root, names, labeled, cache_size)

    def path(self, name: str) -> Path:
        return self.root / "slices" / f"{name}.h5"

    def read(self, path: Path, need_label: bool) -> tuple[np.ndarray, Optional[np.ndarray]]:
        return load_h5_slice(path, need_label=need_label)

    def missing_message(self, missing: list[str]) -> str:
        folder = self.root / "slices"
        return (f"{len(missing)} ACDC slice file(s) missing in '{folder}', e.g. '{missing[0]}.h5'. "
                "Check that the ACDC root holds the complete 'slices' folder.")


def acdc_split(
    root: PathLike,
    labeled_count: Optional[int] = None,
    labeled_patients: int = 7,
) -> tuple[list[str], list[str]]:
    """Split ``root/train_slices.list`` into (labeled, unlabeled) slice names.

    The labeled slices are the first ``labeled_count`` entries, or, when it is
    None, all slices of the first ``labeled_patients`` patients (7 -> 136, the
    "10 % labeled" protocol). The rest are unlabeled.
    """
    names = read_list(Path(root) / "train_slices.list")
    n = slices_for_patients(names, labeled_patients) if labeled_count is None else int(labeled_count)
    if not 0 < n <= len(names):
        raise M3HLInputError(f"labeled_count={n} must lie in 1..{len(names)} for '{root}'.")
    return names[:n], names[n:]


def acdc_val_volumes(root: PathLike, names: Optional[Sequence[str]] = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Validation volumes ``(name, image float32 (D, H, W), label uint8 (D, H, W))``
    from ``root/val.list`` (or ``names``) and ``root/volumes/<name>.h5``."""
    root = Path(root)
    names = read_list(root / "val.list") if names is None else list(names)
    out = []
    for n in names:
        path = root / "volumes" / f"{n}.h5"
        image, label = load_h5_volume(path)
        if label is None:
            raise M3HLInputError(f"Validation volume '{path}' has no 'label' dataset.")
        out.append((n, image, label))
    return out


def acdc_train_data(root: PathLike, labeled_count: Optional[int] = None, labeled_patients: int = 7) -> TrainData:
    """2D :class:`TrainData` of an ACDC root (split by :func:`acdc_split`); the
    unlabeled slices' labels are kept aside to score pseudo-labels only."""
    lab_names, unl_names = acdc_split(root, labeled_count, labeled_patients)
    return TrainData(ACDCSlices(root, lab_names, True), ACDCSlices(root, unl_names, False),
                     ndim=2, num_classes=4, class_names=ACDC_CLASSES,
                     unlabeled_truth=ACDCSlices(root, unl_names, True))
