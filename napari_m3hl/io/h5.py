"""Reading the h5 files of the shared data sets.

* ACDC h5 files hold ``image`` float32 in [0, 1] and ``label`` uint8, as
  ``(H, W)`` slices or ``(D, H, W)`` volumes.
* LA h5 files (``mri_norm2.h5``) hold ``(X, Y, Z)`` volumes; they are returned
  as stored (no transpose), because the LA patch size ``112 x 112 x 80`` and
  the published sliding-window strides are given in that order.

Every failure raises :class:`~napari_m3hl.errors.M3HLInputError` naming the
file; re-exported by :mod:`napari_m3hl.io.nifti`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np

from napari_m3hl.errors import M3HLInputError

PathLike = Union[str, Path]


def _read_h5(path: PathLike, ndim: int, need_label: Optional[bool], what: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Read ``image`` (+ ``label``) from an h5 file. ``need_label``: True =
    required, None = read when present, False = not read."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise M3HLInputError(f"{what} file not found: '{path}'. Check the data folder.")
    try:
        with h5py.File(path, "r") as f:
            if "image" not in f:
                raise M3HLInputError(
                    f"'{path}' has no 'image' dataset (found {sorted(f.keys())}); "
                    "expected the ACDC/LA h5 layout with 'image' and 'label'."
                )
            image = np.asarray(f["image"][()], dtype=np.float32)
            label = None
            if "label" in f:
                if need_label is not False:
                    label = np.asarray(f["label"][()])
            elif need_label:
                raise M3HLInputError(
                    f"'{path}' has no 'label' dataset (found {sorted(f.keys())}); "
                    "a labeled sample needs both 'image' and 'label'."
                )
    except M3HLInputError:
        raise
    except Exception as exc:
        raise M3HLInputError(f"Cannot read '{path}' as HDF5 ({exc}); the file is probably corrupt.") from exc
    if image.ndim != ndim:
        raise M3HLInputError(f"'{path}': 'image' has shape {image.shape}, expected a {ndim}D array for {what}.")
    if not np.all(np.isfinite(image)):
        raise M3HLInputError(f"'{path}': 'image' contains NaN or infinite values; re-export the data.")
    if label is not None:
        if label.shape != image.shape:
            raise M3HLInputError(
                f"'{path}': 'label' shape {label.shape} differs from 'image' shape {image.shape}."
            )
        if label.dtype.kind == "f" and (not np.all(np.isfinite(label)) or np.any(label != np.round(label))):
            raise M3HLInputError(f"'{path}': 'label' must hold integer class indices.")
        if label.size and (label.min() < 0 or label.max() > 255):
            raise M3HLInputError(f"'{path}': 'label' values must lie in 0..255.")
        label = label.astype(np.uint8, copy=False)
    return image, label


def load_h5_volume(path: PathLike) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Read an ACDC volume file (``volumes/<name>.h5``).

    Returns ``image`` float32 ``(D, H, W)`` and ``label`` uint8 ``(D, H, W)``,
    or ``None`` when the file has no ``label`` dataset.
    """
    return _read_h5(path, 3, need_label=None, what="h5 volume")


def load_h5_slice(path: PathLike, need_label: bool = True) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Read an ACDC slice file (``slices/<name>.h5``).

    Returns ``image`` float32 ``(H, W)`` and ``label`` uint8 ``(H, W)``. With
    ``need_label=False`` the label is not read and ``None`` is returned.
    """
    return _read_h5(path, 2, need_label=need_label, what="h5 slice")


def load_la_case(path: PathLike, need_label: bool = True) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Read an LA case (``cases/<ID>/mri_norm2.h5``).

    Returns ``image`` float32 and ``label`` uint8, both **as stored, in
    ``(X, Y, Z)`` order** (about 170 x 140 x 88, image z-score normalised) --
    unlike every other loader here, no transpose to ``(D, H, W)`` is done, so
    the LA patch ``(112, 112, 80)`` applies directly. ``need_label=False``
    skips the label (returns ``None``).
    """
    return _read_h5(path, 3, need_label=need_label, what="LA case")
