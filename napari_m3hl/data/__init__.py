"""Sample sources, one module each, behind two dispatchers.

========================  ===========================================================
module                    holds
========================  ===========================================================
:mod:`.types`             :class:`TrainData`, :class:`VolumeSlices`
:mod:`.cached`            :class:`CachedH5Set` (one HDF5 file per sample, LRU cache), ``.list`` files
:mod:`.acdc`              ACDC slices, split by patients, validation volumes
:mod:`.la`                LA cases and split
:mod:`.volumes`           :class:`PartlyLabeledVolume`, NIfTI image + painted labels
:mod:`.phantom_source`    the synthetic phantom as training / validation data
:mod:`napari_m3hl.data.phantom`           the seeded synthetic cardiac short-axis phantom
this package              :func:`load_train_data`, :func:`load_val_volumes`
========================  ===========================================================

A *slice set* is any object with ``__len__`` and ``__getitem__(i) -> (image,
label)`` (see :mod:`.types`). The trainer takes one labeled and one unlabeled
set in a :class:`TrainData`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from napari_m3hl.errors import M3HLInputError
from napari_m3hl.io.files import is_nifti_name
from napari_m3hl.data.acdc import acdc_train_data, acdc_val_volumes
from napari_m3hl.data.cached import read_list
from napari_m3hl.data.la import LACases, la_split, la_train_data
from napari_m3hl.data.phantom_source import phantom_train_data, phantom_val_volumes
from napari_m3hl.data.types import PathLike, TrainData
from napari_m3hl.data.volumes import nifti_train_data

__all__ = [
    "load_train_data",
    "load_val_volumes",
]


def load_train_data(
    source: PathLike,
    labels: Optional[PathLike] = None,
    *,
    labeled: Optional[int] = None,
    labeled_patients: int = 7,
    labeled_count: Optional[int] = None,
    labeled_cases: int = 8,
    num_classes: Optional[int] = None,
    extra_unlabeled: Sequence[PathLike] = (),
    normalize: bool = True,
    n_volumes: int = 4,
    labeled_slices_per_volume: int = 2,
    seed: int = 0,
    phantom_shape: tuple[int, int, int] = (10, 216, 256),
) -> TrainData:
    """Build :class:`TrainData` from a source description.

    ``labeled`` is how much of the source is labeled, in the unit the source
    counts in (ACDC patients, LA cases, phantom slices per volume; a NIfTI
    image's painted slices are its labels); ``None`` keeps each source's
    default (``labeled_patients``, ``labeled_cases``,
    ``labeled_slices_per_volume``), which ``labeled`` replaces when given.

    ``source`` may be:

    * ``"phantom"``: :func:`phantom_train_data` (``n_volumes``,
      ``labeled_slices_per_volume``, ``seed``, ``phantom_shape``); 2D, 4 classes.
    * an **ACDC root** (folder with ``train_slices.list`` and ``slices/``):
      the first ``labeled_count`` slices, or the slices of the first
      ``labeled_patients`` patients (default 7 -> 136), are labeled, the rest
      unlabeled; 2D, 4 classes.
    * an **LA root** (folder with ``cases/`` and ``train.list``): the first
      ``labeled_cases`` cases are labeled; 3D ``(X, Y, Z)`` volumes, 2 classes.
    * a **NIfTI image** (``.nii``/``.nii.gz``, 3D or 4D) with ``labels`` a
      NIfTI label file on the same grid, painted on some slices: painted
      slices are labeled, all others unlabeled; ``extra_unlabeled`` NIfTI
      images add unlabeled slices. 4D files are split into their frames
      (labels must then be 4D too). Intensities are scaled to [0, 1] per
      volume when ``normalize``. ``num_classes`` defaults to max label + 1
      (at least 2); 2D.
    """
    if labeled is not None:
        labeled_patients = labeled_cases = labeled_slices_per_volume = int(labeled)
    if isinstance(source, str) and source.strip().lower() == "phantom":
        return phantom_train_data(n_volumes, labeled_slices_per_volume, seed, phantom_shape)
    path = Path(source)
    if path.is_dir():
        if (path / "train_slices.list").is_file():
            return acdc_train_data(path, labeled_count, labeled_patients)
        if (path / "cases").is_dir():
            return la_train_data(path, labeled_cases)
        raise M3HLInputError(
            f"'{path}' is a folder but neither an ACDC root (no 'train_slices.list') nor an LA root "
            "(no 'cases/' folder)."
        )
    if is_nifti_name(path):
        return nifti_train_data(path, labels, extra_unlabeled, num_classes, normalize)
    if not path.exists():
        raise M3HLInputError(f"Training source '{source}' not found: give 'phantom', an ACDC or LA root folder, "
                             "or a NIfTI image with its labels.")
    raise M3HLInputError(f"Unsupported training source '{source}': give 'phantom', an ACDC or LA root folder, "
                         "or a NIfTI (.nii/.nii.gz) image with its labels.")


def load_val_volumes(source: PathLike, ndim: int = 2, limit: Optional[int] = None,
                     names_file: Optional[PathLike] = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Labeled volumes to validate or evaluate on: ``(name, image, label)``.

    * ``"phantom"``: phantom volumes with seeds unused by training data.
    * an ACDC root: the validation patients of ``val.list`` (``volumes/``).
    * an LA root: there is no validation split in the shared data (the
      authors selected on the test set); the cases after the labeled ones are
      used, which are the *unlabeled training* cases: a transductive check,
      not a held-out score. Volumes are ``(X, Y, Z)`` as stored.

    ``names_file`` (ACDC: volume names under ``volumes/``; LA: case IDs under
    ``cases/``) replaces the default list, e.g. the 20 test patients'
    ``test.list`` where those volumes are present.
    """
    if limit is not None and int(limit) < 1:
        raise M3HLInputError(f"limit={limit}: score at least 1 volume (leave the limit out to score all)")
    if isinstance(source, str) and source.strip().lower() == "phantom":
        if names_file is not None:
            raise M3HLInputError("a list of volume names was given, but the phantom has no named volumes")
        return phantom_val_volumes(limit or 2)
    path = Path(source)
    listed = read_list(names_file) if names_file is not None else None
    if (path / "volumes").is_dir() and (listed is not None or (path / "val.list").is_file()):
        names = listed if listed is not None else read_list(path / "val.list")
        return acdc_val_volumes(path, names[:limit] if limit else names)
    if (path / "cases").is_dir():
        rest = listed if listed is not None else la_split(path)[1]
        cases = LACases(path, rest[:limit] if limit else rest, True)
        return [(name, *cases[i]) for i, name in enumerate(cases.names)]
    raise M3HLInputError(
        f"'{source}' holds no validation volumes: give 'phantom', an ACDC folder with val.list and volumes/, "
        "or an LA folder with cases/"
    )
