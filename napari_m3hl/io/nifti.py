"""Reading and writing NIfTI files with the geometry kept.

Array conventions (see ``docs/architecture.md``):

* NIfTI stores voxels ``(X, Y, Z[, T])``. :func:`load_nifti` transposes to
  ``(Z, Y, X)`` (3D) or ``(T, Z, Y, X)`` (4D) so the through-plane axis comes
  first; :func:`save_nifti_labels` / :func:`save_nifti_image` transpose back.
* The h5 readers of the shared data sets are in :mod:`napari_m3hl.io.h5`,
  intensity scaling in :mod:`napari_m3hl.io.intensity`, the checks before
  reading in :mod:`napari_m3hl.io.checks`; all re-exported here.

Every failure the user can fix raises :class:`~napari_m3hl.errors.M3HLInputError`
naming the file and what to do.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from napari_m3hl.errors import M3HLInputError
from napari_m3hl.io.files import atomic_path, is_nifti_name, nifti_suffix, why_not_a_file
from napari_m3hl.io.checks import (
    _check_nifti_header,
)

PathLike = Union[str, Path]

__all__ = [
    "NiftiVolume",
    "check_nifti_file",
    "load_nifti",
    "save_nifti_labels",
    "save_nifti_image",
    "affine_from_spacing",
]


# --------------------------------------------------------------------------- NIfTI


@dataclass
class NiftiVolume:
    """A NIfTI image in the package's axis order.

    Attributes
    ----------
    data:
        float32 ``(Z, Y, X)`` for 3D files, ``(T, Z, Y, X)`` for 4D files
        (the stored ``(X, Y, Z[, T])`` array transposed, scaling applied).
    spacing:
        Voxel sizes in the same axis order as ``data``: millimetres for the
        spatial axes; for 4D files the first entry is the time step in the
        header's time unit.
    affine:
        4x4 voxel ``(i, j, k)`` -> world (mm) matrix as stored, i.e. for the
        NIfTI ``(X, Y, Z)`` index order (not for ``data``'s order).
    header:
        The file's ``nibabel.Nifti1Header`` (``Nifti2Header`` for a NIfTI-2
        file; labels written with it are NIfTI-2 too, so no precision is lost).
    path:
        The file that was read.
    """

    data: np.ndarray
    spacing: tuple[float, ...]
    affine: np.ndarray
    header: Any
    path: Path


def _transpose_axes(ndim: int) -> tuple[int, ...]:
    return tuple(range(ndim - 1, -1, -1))


def _open_nifti(path: Path):
    """``(nibabel image, shape)`` of a NIfTI file, its header checked (nothing read
    beyond it); trailing singleton axes beyond the third dropped from ``shape``."""
    import nibabel as nib

    problem = why_not_a_file(path, "NIfTI file", "give a .nii or .nii.gz image file")
    if problem:
        raise M3HLInputError(problem)
    try:
        img = nib.load(str(path))
    except MemoryError as exc:
        raise M3HLInputError(f"Not enough memory to open '{path}'.") from exc
    except Exception as exc:  # nibabel raises several types for bad files
        raise M3HLInputError(
            f"Cannot read '{path}' as NIfTI ({exc}). Give a valid .nii or .nii.gz image file."
        ) from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise M3HLInputError(
            f"'{path}' is a {type(img).__name__}, not a NIfTI image. Convert it to .nii/.nii.gz first."
        )
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3:
        raise M3HLInputError(
            f"'{path}' holds {len(shape)}D data of shape {tuple(img.shape)}; a 3D (X, Y, Z) or "
            "4D (X, Y, Z, T) volume is needed."
        )
    if len(shape) > 4:
        raise M3HLInputError(
            f"'{path}' holds {len(shape)}D data of shape {tuple(img.shape)}; only 3D (X, Y, Z) and "
            "4D (X, Y, Z, T) volumes are supported."
        )
    _check_nifti_header(img, path, shape)
    return img, shape


def check_nifti_file(path: PathLike) -> None:
    """Everything :func:`load_nifti` refuses from the header alone (missing, a
    folder, not NIfTI, 2D or 5D+, colour, complex, an empty axis, truncated,
    too large for memory), without reading the voxels: a folder of inputs is
    checked whole before the first output is written."""
    _open_nifti(Path(path))


def load_nifti(path: PathLike) -> NiftiVolume:
    """Read a 3D or 4D NIfTI file (``.nii`` / ``.nii.gz``).

    Trailing singleton axes beyond the third are dropped (``(X, Y, Z, 1)`` is
    read as 3D). Raises :class:`M3HLInputError` for a missing or unreadable
    file, 2D or more than 4D data, colour or complex voxels, an empty axis, a
    truncated file and a volume too large for the available memory (checked
    from the header before reading). NaN/inf voxels are read as they are (see
    :func:`check_finite`).
    """
    path = Path(path)
    img, shape = _open_nifti(path)
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
    except MemoryError as exc:
        raise M3HLInputError(
            f"Not enough memory to read the voxels of '{path}' ({'x'.join(map(str, img.shape))}); "
            "close other programs or crop the volume."
        ) from exc
    except Exception as exc:  # truncated / corrupt payload
        raise M3HLInputError(
            f"Cannot read the voxel data of '{path}' ({exc}); the file is probably truncated or corrupt."
        ) from exc
    header = img.header
    zooms = tuple(float(z) for z in img.header.get_zooms()[: len(shape)])
    axes = _transpose_axes(len(shape))
    data = np.ascontiguousarray(np.transpose(data, axes), dtype=np.float32)
    spacing = tuple(zooms[a] for a in axes)
    return NiftiVolume(data=data, spacing=spacing, affine=np.array(img.affine, dtype=np.float64),
                       header=header, path=path)


def affine_from_spacing(spacing: tuple[float, ...], origin: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 NIfTI affine for an axis-aligned volume.

    ``spacing`` is in the package order ``(D, H, W)`` = ``(Z, Y, X)`` in mm; the
    affine maps NIfTI ``(X, Y, Z)`` indices, so it is ``diag(sx, sy, sz, 1)``
    with ``origin`` (mm, ``(x, y, z)``) as translation.
    """
    if len(spacing) < 3:
        raise M3HLInputError(f"spacing {spacing} must give 3 voxel sizes (D, H, W) in mm.")
    sz, sy, sx = (float(s) for s in spacing[-3:])
    affine = np.diag([sx, sy, sz, 1.0])
    affine[:3, 3] = origin
    return affine


def _prepare_header(header, data: np.ndarray, affine: np.ndarray, dtype: np.dtype):
    """Copy ``header`` (or make one), set shape/dtype, reset scaling; returns
    ``(header, affine_for_nibabel)``.

    When ``affine`` is the header's own affine (the usual case: labels written
    with the geometry of the image they were drawn on), the qform and sform and
    their codes are kept exactly as stored, even where they differ, and
    ``None`` is returned as the affine so nibabel leaves them alone. Otherwise
    the sform gets ``affine`` exactly and the qform its closest rigid+zoom
    approximation, both with the header's codes.
    """
    import nibabel as nib

    if header is None:
        hdr = nib.Nifti1Header()
        sform_code, qform_code = 2, 2  # aligned
    else:
        kind = nib.Nifti2Header if isinstance(header, nib.Nifti2Header) else nib.Nifti1Header
        hdr = kind.from_header(header)  # copies; converts Analyze
        sform_code, qform_code = int(hdr["sform_code"]), int(hdr["qform_code"])
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(dtype)
    hdr.set_slope_inter(None, None)
    if header is not None and np.allclose(hdr.get_best_affine(), affine, rtol=0, atol=1e-4):
        return hdr, None  # the source geometry, untouched
    if sform_code == 0:
        # The exact affine can only be stored in the sform: make it valid.
        sform_code = qform_code if qform_code > 0 else 2
    hdr.set_sform(affine, code=sform_code)
    hdr.set_qform(affine, code=qform_code)
    return hdr, affine


def _image_class(hdr):
    import nibabel as nib

    return nib.Nifti2Image if isinstance(hdr, nib.Nifti2Header) else nib.Nifti1Image


def _save_atomic(img, path: Path, replace: bool = True) -> None:
    """``nib.save`` to a temporary file beside ``path``, then rename: an existing
    file is only replaced by a complete one (never, with ``replace=False``)."""
    import nibabel as nib

    with atomic_path(path, suffix=nifti_suffix(path), replace=replace) as tmp:
        nib.save(img, str(tmp))


def _check_affine(affine, path: Path) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise M3HLInputError(
            f"affine for '{path}' must be a finite 4x4 matrix, got shape {affine.shape}; "
            "pass the affine of the image the labels belong to."
        )
    return affine


def _check_nifti_suffix(path: Path) -> None:
    if not is_nifti_name(path):
        raise M3HLInputError(f"Output file '{path}' must end in .nii or .nii.gz.")


def save_nifti_labels(labels: np.ndarray, path: PathLike, affine: np.ndarray, header=None,
                      replace: bool = True) -> Path:
    """Write a label volume as NIfTI.

    Parameters
    ----------
    labels:
        Integer labels ``(Z, Y, X)`` or ``(T, Z, Y, X)`` (package order); they
        are transposed back to ``(X, Y, Z[, T])``.
    path:
        ``.nii`` or ``.nii.gz`` output file.
    affine:
        4x4 matrix. When it is ``header``'s own affine, the header's qform and
        sform (and codes) are written back untouched, even where they differ;
        otherwise it is written exactly as the float32 sform and the qform gets
        the closest rigid+zoom approximation.
    header:
        Optional header to copy (e.g. ``NiftiVolume.header`` of the image):
        units, descriptions, time step and qform/sform are kept; the data
        type becomes uint8 (int16 when a label exceeds 255), ``scl_slope`` /
        ``scl_inter`` are reset so the labels stay integer, ``cal_min/max``
        are cleared. With a new affine, a header whose sform code is 0 gets
        the qform code (or "aligned") as sform code so the exact affine is
        stored. The file is written to a temporary name and renamed, so an
        existing file is only ever replaced by a complete one.
    replace:
        False: a file at ``path`` (written meanwhile by another command) is
        kept and :class:`FileExistsError` raised (:func:`napari_m3hl.files.atomic_path`).
    """
    path = Path(path)
    _check_nifti_suffix(path)
    affine = _check_affine(affine, path)
    labels = np.asarray(labels)
    if labels.ndim not in (3, 4):
        raise M3HLInputError(
            f"labels for '{path}' must be (Z, Y, X) or (T, Z, Y, X), got shape {labels.shape}."
        )
    if labels.dtype.kind == "b":
        labels = labels.astype(np.uint8)
    if labels.dtype.kind not in "iu":
        if labels.dtype.kind != "f" or not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise M3HLInputError(
                f"labels for '{path}' must hold integer class indices, got dtype {labels.dtype}."
            )
    lo = int(labels.min()) if labels.size else 0
    hi = int(labels.max()) if labels.size else 0
    if lo < 0:
        raise M3HLInputError(f"labels for '{path}' contain negative values ({lo}); class indices start at 0.")
    if hi > np.iinfo(np.int16).max:
        raise M3HLInputError(f"labels for '{path}' contain value {hi}, more than int16 can hold.")
    dtype = np.dtype(np.uint8) if hi <= 255 else np.dtype(np.int16)
    data = np.ascontiguousarray(np.transpose(labels, _transpose_axes(labels.ndim))).astype(dtype)
    hdr, aff = _prepare_header(header, data, affine, dtype)
    hdr["cal_min"], hdr["cal_max"] = 0, 0  # the image's display window means nothing for labels
    _save_atomic(_image_class(hdr)(data, aff, header=hdr), path, replace)
    return path


def save_nifti_image(image: np.ndarray, path: PathLike, affine: np.ndarray, header=None) -> Path:
    """Write a float32 image ``(Z, Y, X)`` / ``(T, Z, Y, X)`` as NIfTI.

    Same geometry handling as :func:`save_nifti_labels`; data are stored as
    float32 without scaling.
    """
    path = Path(path)
    _check_nifti_suffix(path)
    affine = _check_affine(affine, path)
    image = np.asarray(image)
    if image.ndim not in (3, 4):
        raise M3HLInputError(f"image for '{path}' must be (Z, Y, X) or (T, Z, Y, X), got shape {image.shape}.")
    data = np.ascontiguousarray(np.transpose(image, _transpose_axes(image.ndim)), dtype=np.float32)
    hdr, aff = _prepare_header(header, data, affine, np.dtype(np.float32))
    _save_atomic(_image_class(hdr)(data, aff, header=hdr), path)
    return path
