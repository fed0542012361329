"""Partly labeled volumes: images whose labels are painted on some slices
(the napari layers, or NIfTI files on disk), as 2D training data."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from napari_m3hl.errors import M3HLInputError
from napari_m3hl.io.nifti import load_nifti
from napari_m3hl.io.intensity import normalize_intensity
from napari_m3hl.io.checks import validate_image, validate_label
from napari_m3hl.labels import labeled_slices
from napari_m3hl.data.types import PathLike, TrainData, VolumeSlices
from napari_m3hl.labels import default_class_names


class PartlyLabeledVolume:
    """Volumes whose label layers are painted on only some slices.

    A slice counts as labeled when its label has any nonzero voxel; all other
    slices (and every slice of unlabeled volumes) become unlabeled samples.

    Parameters
    ----------
    image:
        float ``(D, H, W)``.
    label:
        integer (or integer-valued float) ``(D, H, W)``, same shape, values in
        ``0..num_classes-1``; or None for an unlabeled volume.
    num_classes:
        Number of classes including background.
    normalize:
        Scale each volume to [0, 1] with
        :func:`napari_m3hl.io.nifti.normalize_intensity`.
    name:
        Used in error messages (e.g. the napari layer name).

    Raises :class:`M3HLInputError` when shapes differ, labels are out of
    range, an image is NaN/inf/constant or not 3D, or no slice is labeled.
    """

    def __init__(self, image: np.ndarray, label: Optional[np.ndarray], num_classes: int = 4,
                 normalize: bool = False, name: str = "image") -> None:
        self._init([image], [label], num_classes, normalize, [name])

    @classmethod
    def from_volumes(
        cls,
        images: Sequence[np.ndarray],
        labels: Optional[Sequence[Optional[np.ndarray]]] = None,
        extra_unlabeled: Sequence[np.ndarray] = (),
        num_classes: int = 4,
        normalize: bool = False,
        names: Optional[Sequence[str]] = None,
    ) -> "PartlyLabeledVolume":
        """Several volumes: ``images[i]`` with ``labels[i]`` (entries may be
        None), plus ``extra_unlabeled`` volumes whose slices are all
        unlabeled. ``names`` name the volumes in errors (default ``image 0``,
        ...; extra volumes ``unlabeled 0``, ...)."""
        images = list(images)
        labels = list(labels) if labels is not None else [None] * len(images)
        if len(labels) != len(images):
            raise M3HLInputError(f"{len(images)} images but {len(labels)} label volumes; give one label (or None) per image.")
        names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
        extra = list(extra_unlabeled)
        names += [f"unlabeled {i}" for i in range(len(extra))]
        self = cls.__new__(cls)
        self._init(images + extra, labels + [None] * len(extra), num_classes, normalize, names)
        return self

    def _init(self, images: list, labels: list, num_classes: int, normalize: bool, names: list) -> None:
        if int(num_classes) < 2:
            raise M3HLInputError(f"num_classes={num_classes} must be >= 2 (background + at least one class).")
        self.num_classes = int(num_classes)
        self.names = list(names)
        self.volumes: list[np.ndarray] = []
        self.labels: list[Optional[np.ndarray]] = []
        for img, lab, name in zip(images, labels, self.names):
            img = np.asarray(img)
            if img.ndim != 3:
                raise M3HLInputError(f"{name}: expected a 3D (D, H, W) volume, got shape {img.shape}.")
            validate_image(img, name)
            img = normalize_intensity(img) if normalize else np.ascontiguousarray(img, dtype=np.float32)
            if lab is not None:
                lab = np.asarray(lab)
                if lab.shape != img.shape:
                    raise M3HLInputError(
                        f"{name}: label shape {lab.shape} differs from image shape {img.shape}; "
                        "the labels must be drawn on the same grid as the image."
                    )
                validate_label(lab, self.num_classes, f"{name} labels")
                lab = np.ascontiguousarray(lab.astype(np.uint8))
            self.volumes.append(img)
            self.labels.append(lab)
        self._labeled_index = [(v, int(z)) for v in range(len(self.volumes)) for z in self.labeled_slices(v)]
        if not self._labeled_index:
            raise M3HLInputError(
                f"no labeled slice in {', '.join(self.names) or 'the input'}: paint at least one slice of the "
                "labels layer (any nonzero class) before training."
            )
        labeled = set(self._labeled_index)
        self._unlabeled_index = [(v, z) for v, vol in enumerate(self.volumes)
                                 for z in range(vol.shape[0]) if (v, z) not in labeled]

    def labeled_slices(self, volume: int = 0) -> np.ndarray:
        """Indices (int64, ascending) of the slices of ``volume`` with any nonzero label."""
        lab = self.labels[volume]
        return np.zeros(0, dtype=np.int64) if lab is None else labeled_slices(lab)

    @property
    def labeled_index(self) -> list[tuple[int, int]]:
        """All labeled ``(volume, slice)`` pairs."""
        return list(self._labeled_index)

    @property
    def unlabeled_index(self) -> list[tuple[int, int]]:
        """All unlabeled ``(volume, slice)`` pairs."""
        return list(self._unlabeled_index)

    def labeled_set(self) -> VolumeSlices:
        """Slice set of labeled slices (``(H, W)`` image, uint8 label)."""
        return VolumeSlices(self.volumes, self.labels, self._labeled_index, labeled=True)

    def unlabeled_set(self) -> VolumeSlices:
        """Slice set of all other slices (label None)."""
        return VolumeSlices(self.volumes, self.labels, self._unlabeled_index, labeled=False)

    def train_data(self, class_names: Optional[Sequence[str]] = None) -> "TrainData":
        """:class:`TrainData` (2D) over these slices."""
        return TrainData(self.labeled_set(), self.unlabeled_set(), ndim=2, num_classes=self.num_classes,
                         class_names=tuple(class_names) if class_names else default_class_names(self.num_classes))


def _nifti_volumes(path: Path) -> tuple[list[np.ndarray], np.ndarray, tuple]:
    """Frames ``(Z, Y, X)`` of a 3D/4D NIfTI file, its affine and data shape."""
    vol = load_nifti(path)
    frames = [vol.data] if vol.data.ndim == 3 else list(vol.data)
    return frames, vol.affine, vol.data.shape


def nifti_train_data(
    path: PathLike,
    labels: Optional[PathLike],
    extra_unlabeled: Sequence[PathLike] = (),
    num_classes: Optional[int] = None,
    normalize: bool = True,
) -> TrainData:
    """2D :class:`TrainData` of a NIfTI image (3D or 4D) and its label file on
    the same grid (see :func:`napari_m3hl.data.load_train_data`)."""
    path = Path(path)
    if labels is None:
        raise M3HLInputError(
            f"'{path}' is a NIfTI image; also give its labels file (a NIfTI label map painted on some slices)."
        )
    images, affine, shape = _nifti_volumes(path)
    label_vols, lab_affine, lab_shape = _nifti_volumes(Path(labels))
    if lab_shape != shape:
        raise M3HLInputError(
            f"labels '{labels}' have shape {lab_shape} but image '{path}' has shape {shape} "
            "(package order); the labels must be drawn on the image's grid."
        )
    if not np.allclose(affine, lab_affine, atol=1e-3):
        raise M3HLInputError(
            f"labels '{labels}' have a different affine than image '{path}'; they belong to another image."
        )
    extras: list[np.ndarray] = []
    for e in extra_unlabeled:
        extras += _nifti_volumes(Path(e))[0]
    if num_classes is None:
        hi = max((int(np.nanmax(v)) for v in label_vols if v.size), default=0)
        num_classes = max(2, hi + 1)
    stem = path.name
    names = [stem] if len(images) == 1 else [f"{stem} frame {t}" for t in range(len(images))]
    plv = PartlyLabeledVolume.from_volumes(images, label_vols, extras, num_classes=num_classes,
                                           normalize=normalize, names=names)
    return plv.train_data()
