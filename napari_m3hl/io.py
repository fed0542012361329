"""Reading and writing NIfTI and h5 files with the geometry kept.

Array conventions (see ``docs/architecture.md``):

* NIfTI stores voxels ``(X, Y, Z[, T])``. :func:`load_nifti` transposes to
  ``(Z, Y, X)`` (3D) or ``(T, Z, Y, X)`` (4D) so the through-plane axis comes
  first; :func:`save_nifti_labels` / :func:`save_nifti_image` transpose back.
* ACDC h5 files hold ``image`` float32 in [0, 1] and ``label`` uint8, as
  ``(H, W)`` slices or ``(D, H, W)`` volumes.
* LA h5 files (``mri_norm2.h5``) hold ``(X, Y, Z)`` volumes; they are returned
  as stored (no transpose), because the LA patch size ``112 x 112 x 80`` and
  the published sliding-window strides are given in that order.

Every failure the user can fix raises :class:`~napari_m3hl.errors.M3HLInputError`
naming the file and what to do.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .errors import M3HLInputError
from .files import atomic_path, is_nifti_name, nifti_suffix
from .io_checks import (  # noqa: F401 - re-exported
    _check_nifti_header,
    available_memory,
    fill_non_finite,
    validate_image,
    validate_label,
    warn_if_constant,
)

PathLike = Union[str, Path]

__all__ = [
    "NiftiVolume",
    "load_nifti",
    "fill_non_finite",
    "warn_if_constant",
    "available_memory",
    "save_nifti_labels",
    "save_nifti_image",
    "affine_from_spacing",
    "load_h5_volume",
    "load_h5_slice",
    "load_la_case",
    "validate_image",
    "validate_label",
    "normalize_intensity",
    "scale_intensity",
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


def load_nifti(path: PathLike) -> NiftiVolume:
    """Read a 3D or 4D NIfTI file (``.nii`` / ``.nii.gz``).

    Trailing singleton axes beyond the third are dropped (``(X, Y, Z, 1)`` is
    read as 3D). Raises :class:`M3HLInputError` for a missing or unreadable
    file, 2D or more than 4D data, colour or complex voxels, an empty axis, a
    truncated file and a volume too large for the available memory (checked
    from the header before reading). NaN/inf voxels are read as they are (see
    :func:`check_finite`).
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise M3HLInputError(f"NIfTI file not found: '{path}'. Check the path (expected a .nii or .nii.gz file).")
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


def _save_atomic(img, path: Path) -> None:
    """``nib.save`` to a temporary file beside ``path``, then rename: an existing
    file is only replaced by a complete one."""
    import nibabel as nib

    with atomic_path(path, suffix=nifti_suffix(path)) as tmp:
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


def save_nifti_labels(labels: np.ndarray, path: PathLike, affine: np.ndarray, header=None) -> Path:
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
    """
    import nibabel as nib

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
    _save_atomic(_image_class(hdr)(data, aff, header=hdr), path)
    return path


def save_nifti_image(image: np.ndarray, path: PathLike, affine: np.ndarray, header=None) -> Path:
    """Write a float32 image ``(Z, Y, X)`` / ``(T, Z, Y, X)`` as NIfTI.

    Same geometry handling as :func:`save_nifti_labels`; data are stored as
    float32 without scaling.
    """
    import nibabel as nib

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


# --------------------------------------------------------------------------- h5


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


INTENSITY = ("percentile", "minmax")


def scale_intensity(image: np.ndarray, how: str = "percentile") -> np.ndarray:
    """A raw image scaled to [0, 1] (float32, same shape) the way a network
    expects it: ``percentile`` (:func:`normalize_intensity`, 0.5-99.5 %
    clipped) or ``minmax`` (the plain range, as the ACDC training volumes)."""
    if how not in INTENSITY:
        raise M3HLInputError(f"intensity scaling must be one of {INTENSITY}, got {how!r}")
    if how == "percentile":
        return normalize_intensity(image)
    img = np.asarray(image, dtype=np.float32)
    if not np.all(np.isfinite(img)):
        raise M3HLInputError("scale_intensity: the image contains NaN or infinite values.")
    if img.size == 0:
        return img.copy()
    lo, hi = float(img.min()), float(img.max())
    return np.zeros_like(img) if hi <= lo else ((img - lo) / (hi - lo)).astype(np.float32, copy=False)


def normalize_intensity(image: np.ndarray, lower: float = 0.5, upper: float = 99.5) -> np.ndarray:
    """Robust min-max scaling to [0, 1] (float32, same shape).

    Values are clipped to the ``lower``/``upper`` percentiles and mapped
    linearly onto [0, 1], matching the [0, 1] range of the ACDC training data.
    When the percentiles coincide the plain min/max is used; a constant image
    becomes all zeros.
    """
    image = np.asarray(image, dtype=np.float32)
    if not np.all(np.isfinite(image)):
        raise M3HLInputError("normalize_intensity: the image contains NaN or infinite values.")
    if image.size == 0:
        return image.copy()
    lo, hi = np.percentile(image, [lower, upper])
    if hi <= lo:
        lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        return np.zeros_like(image)
    out = (np.clip(image, lo, hi) - lo) / (hi - lo)
    return out.astype(np.float32, copy=False)
