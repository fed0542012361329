"""npe2 reader: 3D/4D NIfTI (``.nii``, ``.nii.gz``) images and label maps.

Layer data are in the package order ``(Z, Y, X)`` / ``(T, Z, Y, X)`` (see
``docs/architecture.md``), ``scale`` is the voxel spacing (mm; time step for
the T axis), and ``metadata`` keeps the file's ``affine``, ``header`` and
``source_path`` so the writer can export labels with exactly the source
geometry. A file that looks like a label map (integer data type with few
distinct values, or a name containing "label", "seg" or "gt") becomes a
Labels layer with the class colours.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from napari_m3hl.errors import M3HLInputError
from napari_m3hl.io.files import is_nifti_name, stem

LayerData = tuple[np.ndarray, dict[str, Any], str]

#: At most this many distinct values in an integer-typed file: a label map.
MAX_LABEL_VALUES = 32
_LABEL_NAME = re.compile(r"(label|seg|(^|[^a-z])gt([^a-z]|$)|mask)", re.IGNORECASE)
_is_nifti = is_nifti_name
_stem = stem


def get_reader(path: str | Sequence[str]) -> Callable[[Any], list[LayerData]] | None:
    """Return :func:`read_nifti` when every path is a NIfTI file, else None."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or not all(_is_nifti(p) for p in paths):
        return None
    return read_nifti


def looks_like_labels(path: Path, data: np.ndarray, header: Any) -> bool:
    """Whether a NIfTI file holds a label map rather than an image.

    True when the stored data type is integer, unscaled, with at most
    :data:`MAX_LABEL_VALUES` distinct non-negative values, or when the file
    name names labels (``label``, ``seg``, ``gt``, ``mask``) and the values
    are non-negative integers.
    """
    integral = bool(np.all(data >= 0)) and bool(np.all(np.mod(data, 1) == 0))
    if not integral:
        return False
    if _LABEL_NAME.search(_stem(path)):
        return True
    try:
        dtype = np.dtype(header.get_data_dtype())
        slope, inter = header.get_slope_inter()
    except Exception:  # noqa: BLE001 - unusual header: decide by values only
        dtype, slope, inter = np.dtype(np.float32), None, None
    unscaled = slope in (None, 1.0) and inter in (None, 0.0)
    if dtype.kind not in "iub" or not unscaled:
        return False
    return np.unique(data).size <= MAX_LABEL_VALUES


def _label_dtype(data: np.ndarray) -> np.dtype:
    hi = int(data.max()) if data.size else 0
    if hi <= np.iinfo(np.uint8).max:
        return np.dtype(np.uint8)
    if hi <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def label_class_names(n_values: int) -> tuple[str, ...] | None:
    """Class names for a label map whose largest value is ``n_values - 1``:
    ACDC (background, RV, Myo, LV) up to 4 values, background/foreground for a
    binary map, ``class k`` up to 16 classes, None (napari's colours) beyond."""
    from napari_m3hl.labels import ACDC_CLASSES, default_class_names

    if n_values <= 2:
        return default_class_names(2)
    if n_values <= 4:
        return ACDC_CLASSES
    return default_class_names(n_values) if n_values <= 16 else None


def read_nifti(path: str | Sequence[str]) -> list[LayerData]:
    """Read one or more NIfTI files into napari layer-data tuples."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    return [_read_one(Path(p)) for p in paths]


def _read_one(path: Path) -> LayerData:
    from napari_m3hl.io.nifti import load_nifti

    vol = load_nifti(path)  # raises M3HLInputError with a clear message
    data = vol.data
    meta: dict[str, Any] = {
        "name": _stem(path),
        "scale": tuple(float(s) if s > 0 else 1.0 for s in vol.spacing),
        "metadata": {"affine": vol.affine, "header": vol.header, "source_path": str(vol.path)},
    }
    if looks_like_labels(path, data, vol.header):
        from napari_m3hl._napari.layers.control import class_colormap, class_features

        labels = data.astype(_label_dtype(data))
        names = label_class_names(int(labels.max()) + 1 if labels.size else 2)
        if names is not None:
            meta["features"] = class_features(names)
            meta["colormap"] = class_colormap(len(names))
        return labels, meta, "labels"
    if data.ndim not in (3, 4):  # load_nifti guarantees this; keep the message clear anyway
        raise M3HLInputError(f"'{path}' has shape {data.shape}; a 3D or 4D volume is needed.")
    return data, meta, "image"
