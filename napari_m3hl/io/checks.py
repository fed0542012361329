"""Checks on image and label arrays and on NIfTI headers before reading.

Re-exported by :mod:`napari_m3hl.io.nifti` (import them from there). Every failure
the user can fix raises :class:`~napari_m3hl.errors.M3HLInputError` naming the
file (or layer) and what to do; the ``warn_*``/``fill_*`` helpers return a
warning text instead where the command can go on.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np

from napari_m3hl.errors import M3HLInputError

PathLike = Union[str, Path]


def available_memory() -> int | None:
    """Bytes of memory the system can still give (``MemAvailable`` on Linux);
    None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _check_nifti_header(img, path: Path, shape: tuple[int, ...]) -> None:
    """Refuse what cannot be read as a grey-value volume, before reading the voxels:
    colour (RGB) and complex data, an empty axis, a truncated ``.nii`` payload and
    a size that does not fit in memory."""
    dtype = np.dtype(img.header.get_data_dtype())
    if dtype.fields is not None or dtype.kind == "V":
        raise M3HLInputError(
            f"'{path}' holds colour (RGB) voxels ({dtype}); convert it to a single grey-value channel first."
        )
    if dtype.kind == "c":
        raise M3HLInputError(
            f"'{path}' holds complex voxels ({dtype}); save the magnitude image (e.g. abs()) and give that."
        )
    if any(s == 0 for s in img.shape):
        raise M3HLInputError(f"'{path}' has an empty axis (shape {tuple(img.shape)}); the file holds no voxels.")
    n_vox = int(np.prod([int(s) for s in img.shape], dtype=np.float64))
    stored = n_vox * dtype.itemsize
    if path.name.lower().endswith(".nii"):
        offset = int(img.header.get_data_offset() or 0)
        size = path.stat().st_size
        if size < offset + stored:
            raise M3HLInputError(
                f"'{path}' is truncated: its header claims {'x'.join(map(str, img.shape))} {dtype} voxels "
                f"({_gib(stored)}) but the file holds {_gib(size)}. Re-export or copy the file again."
            )
    needed = n_vox * 4 + stored  # the float32 copy plus the stored array while converting
    avail = available_memory()
    if avail is not None and needed > avail:
        raise M3HLInputError(
            f"'{path}' claims {'x'.join(map(str, img.shape))} voxels: reading it needs about {_gib(needed)} "
            f"of memory but only {_gib(avail)} is available. Crop or downsample the volume, or check its header."
        )


def validate_image(image: np.ndarray, name: str) -> None:
    """Raise :class:`M3HLInputError` when ``image`` (any shape) is empty,
    holds NaN/inf, or is constant. ``name`` names the source in the message."""
    image = np.asarray(image)
    if image.size == 0:
        raise M3HLInputError(f"{name}: the image is empty (shape {image.shape}).")
    if not np.all(np.isfinite(image)):
        raise M3HLInputError(f"{name}: the image contains NaN or infinite values; fix or re-export it.")
    if float(np.max(image)) == float(np.min(image)):
        raise M3HLInputError(
            f"{name}: the image is constant (every voxel = {float(np.min(image))}); it cannot be segmented."
        )


def validate_label(label: np.ndarray, num_classes: int, name: str) -> None:
    """Raise :class:`M3HLInputError` when ``label`` holds non-integer, negative
    or ``>= num_classes`` values. ``name`` names the source in the message."""
    label = np.asarray(label)
    if label.size == 0:
        return
    if label.dtype.kind == "f":
        if not np.all(np.isfinite(label)) or np.any(label != np.round(label)):
            raise M3HLInputError(f"{name}: labels must be integer class indices, found fractional/NaN values.")
    elif label.dtype.kind not in "iub":
        raise M3HLInputError(f"{name}: labels must be integers, got dtype {label.dtype}.")
    lo, hi = label.min(), label.max()
    if lo < 0:
        raise M3HLInputError(f"{name}: labels contain the negative value {lo}; classes are 0..{num_classes - 1}.")
    if hi >= num_classes:
        raise M3HLInputError(
            f"{name}: labels contain the value {int(hi)} but there are only {num_classes} classes "
            f"(0..{num_classes - 1}); relabel or raise the number of classes."
        )


def fill_non_finite(data: np.ndarray, path: PathLike) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """NaN/inf voxels (e.g. outside a resampled field of view) set to the lowest
    finite value, so the rest can be segmented.

    Returns ``(data, mask, warning)``: ``mask`` (bool, True where the voxel was
    not finite; those voxels should be labelled background) and a warning text
    naming ``path``, both None when every voxel is finite. Raises
    :class:`M3HLInputError` when no voxel is finite."""
    bad = ~np.isfinite(data)
    if not bad.any():
        return data, None, None
    if bad.all():
        raise M3HLInputError(f"'{path}' holds no finite voxel (all NaN or infinite); it cannot be segmented.")
    filled = np.where(bad, np.min(data[~bad]), data).astype(np.float32)
    return filled, bad, (f"warning: '{path}' has {int(bad.sum())} NaN or infinite voxel(s); they are labelled "
                         "background and the rest is segmented.")


def warn_if_constant(data: np.ndarray, path: PathLike) -> str | None:
    """A warning text when ``data`` is constant (it segments as all background), else None."""
    if data.size and float(data.max()) == float(data.min()):
        return (f"warning: '{path}' is constant (every voxel = {float(data.min()):g}); "
                "its segmentation will be all background. Is this the right file?")
    return None
