"""npe2 writer: a Labels layer to NIfTI with the source image's geometry.

The affine and header come from the layer metadata (``affine``, ``header``),
which the reader, the sample data and the widget's "New labels layer" /
segmentation layers fill from the source image. Without them, a diagonal
affine is built from the layer's ``scale`` and ``translate`` and a warning
says so.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from napari_m3hl.errors import M3HLInputError
from napari_m3hl.io.files import is_nifti_name


def nifti_path(path: str | Path) -> Path:
    """``path`` with ``.nii.gz`` appended unless it already ends in ``.nii``/``.nii.gz``."""
    p = Path(path)
    if not is_nifti_name(p):
        p = p.with_name(p.name + ".nii.gz")
    return p


def geometry_from_meta(meta: dict[str, Any], ndim: int) -> tuple[np.ndarray, Any, bool]:
    """(affine, header, exact) for a layer's ``meta`` (napari layer attributes).

    ``exact`` is False when no source affine was stored and one was derived
    from ``scale`` / ``translate`` (the last three axes, ``(Z, Y, X)`` order).
    """
    from napari_m3hl.io.nifti import affine_from_spacing

    metadata = meta.get("metadata") or {}
    affine = metadata.get("affine")
    header = metadata.get("header")
    if affine is not None:
        return np.asarray(affine, dtype=np.float64), header, True
    scale = tuple(meta.get("scale") or (1.0,) * ndim)[-3:]
    translate = tuple(meta.get("translate") or (0.0,) * ndim)[-3:]
    origin = (float(translate[2]), float(translate[1]), float(translate[0]))
    return affine_from_spacing(scale, origin=origin), header, False


def _refuse_source_image(target: Path, meta: dict[str, Any]) -> None:
    """Refuse to write labels over the image they were drawn on (a labels layer
    made from an image carries the image's ``source_path``)."""
    import os

    src = (meta.get("metadata") or {}).get("source_path")
    try:
        same = bool(src) and target.is_file() and os.path.samefile(target, src)
    except OSError:
        same = False
    if not same:
        return
    from napari_m3hl.io.nifti import load_nifti
    from napari_m3hl._napari._reader import looks_like_labels

    vol = load_nifti(target)
    if not looks_like_labels(target, vol.data, vol.header):
        raise M3HLInputError(
            f"'{target}' is the image these labels were drawn on; saving there would replace the scan with the "
            "labels. Choose another file name (e.g. with '_labels')."
        )


def save_labels_nifti(path: str | Path, data: Any, meta: dict[str, Any]) -> Path:
    """Write labels ``(Z, Y, X)`` / ``(T, Z, Y, X)`` with the geometry in ``meta``.

    Returns the written path. Raises :class:`M3HLInputError` for data that is
    not a 3D/4D integer label volume, and for a path that is the image the
    labels were drawn on (the metadata's ``source_path``). Warns (napari notification) when the
    affine had to be derived from the layer scale.
    """
    from napari_m3hl.io.nifti import save_nifti_labels

    labels = np.asarray(data)
    if labels.ndim not in (3, 4):
        raise M3HLInputError(
            f"cannot save labels of shape {labels.shape} as NIfTI: a (Z, Y, X) or (T, Z, Y, X) volume is needed"
        )
    target = nifti_path(path)
    _refuse_source_image(target, meta)
    affine, header, exact = geometry_from_meta(meta, labels.ndim)
    if not exact:
        from napari.utils.notifications import show_warning

        show_warning(
            f"Layer '{meta.get('name', 'labels')}' has no source NIfTI geometry; "
            "writing a diagonal affine from its scale. Create labels with 'New labels layer' "
            "(or open them from a NIfTI file) to keep the scanner geometry."
        )
    return save_nifti_labels(labels, target, affine, header)


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer writer for Labels layers."""
    return [str(save_labels_nifti(path, data, meta))]
