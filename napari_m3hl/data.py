"""Sample sources: ACDC slices/volumes, LA cases, partly-labeled volumes, phantom.

A *slice set* is any object with ``__len__`` and ``__getitem__(i) -> (image,
label)``: ``image`` float32 ``(H, W)`` for 2D sets (``(X, Y, Z)`` for the LA
3D set, see :class:`LACases`), ``label`` uint8 of the same shape, or ``None``
for unlabeled samples. The trainer takes one labeled and one unlabeled set in
a :class:`TrainData`.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .errors import M3HLInputError
from .io import (
    load_h5_slice,
    load_h5_volume,
    load_la_case,
    load_nifti,
    normalize_intensity,
    validate_image,
    validate_label,
)

__all__ = [
    "ACDC_CLASSES", "LA_CLASSES",
    "read_list", "patient_of", "patient_slice_counts", "slices_for_patients",
    "ACDCSlices", "acdc_split", "acdc_val_volumes",
    "LACases", "la_split",
    "VolumeSlices", "PartlyLabeledVolume",
    "phantom_train_data", "phantom_val_volumes",
    "TrainData", "load_train_data", "default_class_names",
]

PathLike = Union[str, Path]
ACDC_CLASSES: tuple[str, ...] = ("background", "RV", "Myo", "LV")
LA_CLASSES: tuple[str, ...] = ("background", "left atrium")


# --------------------------------------------------------------------------- helpers


def read_list(path: PathLike) -> list[str]:
    """Non-empty, stripped lines of a ``.list`` file."""
    path = Path(path)
    if not path.is_file():
        raise M3HLInputError(f"List file not found: '{path}'. Point to the data folder that contains it.")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


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


class _LRU:
    """Tiny least-recently-used cache (``maxsize`` entries)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = int(maxsize)
        self._d: OrderedDict = OrderedDict()

    def get(self, key):
        if key in self._d:
            self._d.move_to_end(key)
            return self._d[key]
        return None

    def put(self, key, value) -> None:
        if self.maxsize <= 0:
            return
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.maxsize:
            self._d.popitem(last=False)


# --------------------------------------------------------------------------- ACDC


class ACDCSlices:
    """ACDC training slices ``root/slices/<name>.h5``, read lazily.

    ``__getitem__(i)`` -> ``(image float32 (H, W) in [0, 1], label uint8
    (H, W))`` or ``(image, None)`` when ``labeled`` is False (the label is
    then not even read). The last ``cache_size`` slices read are kept.
    """

    def __init__(self, root: PathLike, names: Sequence[str], labeled: bool, cache_size: int = 256) -> None:
        self.root = Path(root)
        self.names = list(names)
        self.labeled = bool(labeled)
        self._cache = _LRU(cache_size)
        folder = self.root / "slices"
        missing = [n for n in self.names if not (folder / f"{n}.h5").is_file()]
        if missing:
            raise M3HLInputError(
                f"{len(missing)} ACDC slice file(s) missing in '{folder}', e.g. '{missing[0]}.h5'. "
                "Check that the ACDC root holds the complete 'slices' folder."
            )

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
        name = self.names[i]
        hit = self._cache.get(name)
        if hit is None:
            hit = load_h5_slice(self.root / "slices" / f"{name}.h5", need_label=self.labeled)
            self._cache.put(name, hit)
        return hit


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


# --------------------------------------------------------------------------- LA


class LACases:
    """LA cases ``root/cases/<ID>/mri_norm2.h5``, read lazily.

    ``__getitem__(i)`` -> ``(image float32 (X, Y, Z), label uint8 (X, Y, Z))``
    **as stored** (z-score normalised image; not transposed to ``(D, H, W)``,
    the LA patch ``112 x 112 x 80`` is in this order), or ``(image, None)`` when
    ``labeled`` is False. Keeps the last ``cache_size`` cases (~10 MB each).
    """

    def __init__(self, root: PathLike, names: Sequence[str], labeled: bool, cache_size: int = 16) -> None:
        self.root = Path(root)
        self.names = list(names)
        self.labeled = bool(labeled)
        self._cache = _LRU(cache_size)
        missing = [n for n in self.names if not self._path(n).is_file()]
        if missing:
            raise M3HLInputError(
                f"{len(missing)} LA case file(s) missing, e.g. '{self._path(missing[0])}'. "
                "Check that the LA root holds 'cases/<ID>/mri_norm2.h5' for every listed case."
            )

    def _path(self, name: str) -> Path:
        return self.root / "cases" / name / "mri_norm2.h5"

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
        name = self.names[i]
        hit = self._cache.get(name)
        if hit is None:
            hit = load_la_case(self._path(name), need_label=self.labeled)
            self._cache.put(name, hit)
        return hit


def la_split(root: PathLike, labeled: int = 8) -> tuple[list[str], list[str]]:
    """Split ``root/train.list`` into (first ``labeled`` cases, the rest)."""
    names = read_list(Path(root) / "train.list")
    if not 0 < int(labeled) <= len(names):
        raise M3HLInputError(f"labeled={labeled} must lie in 1..{len(names)} for '{root}'.")
    return names[: int(labeled)], names[int(labeled):]


# --------------------------------------------------------------------------- in-memory volumes


class VolumeSlices:
    """Slice set over in-memory volumes without copying.

    ``volumes``: list of float32 ``(D, H, W)``; ``labels``: matching list of
    uint8 volumes or None entries; ``index``: ``(volume, slice)`` pairs.
    ``labeled=False`` returns ``None`` labels.
    """

    def __init__(self, volumes: Sequence[np.ndarray], labels: Sequence[Optional[np.ndarray]],
                 index: Sequence[tuple[int, int]], labeled: bool) -> None:
        self.volumes = list(volumes)
        self.labels = list(labels)
        self.index = [(int(v), int(z)) for v, z in index]
        self.labeled = bool(labeled)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
        v, z = self.index[i]
        lab = self.labels[v]
        return self.volumes[v][z], (lab[z] if (self.labeled and lab is not None) else None)


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
        :func:`napari_m3hl.io.normalize_intensity`.
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
        if lab is None:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(lab.reshape(lab.shape[0], -1).any(axis=1)).astype(np.int64)

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


# --------------------------------------------------------------------------- phantom


def phantom_train_data(
    n_volumes: int = 4,
    labeled_slices_per_volume: int = 2,
    seed: int = 0,
    shape: tuple[int, int, int] = (10, 216, 256),
) -> "TrainData":
    """2D training data from phantom volumes.

    In each of ``n_volumes`` phantoms (cohort ``seed``) ``labeled_slices_per_volume``
    slices, evenly spread between base and apex (ends excluded when possible),
    keep their labels; all other slices are unlabeled.
    """
    from .phantom import make_phantom_cohort

    if n_volumes < 1:
        raise M3HLInputError(f"n_volumes={n_volumes} must be >= 1.")
    d = int(shape[0])
    if not 1 <= labeled_slices_per_volume <= d:
        raise M3HLInputError(f"labeled_slices_per_volume={labeled_slices_per_volume} must lie in 1..{d}.")
    keep = _spread(d, labeled_slices_per_volume)
    phantoms = make_phantom_cohort(n_volumes, seed=seed, shape=shape)
    labels = []
    for ph in phantoms:
        lab = np.zeros_like(ph.label)
        lab[keep] = ph.label[keep]
        labels.append(lab)
    plv = PartlyLabeledVolume.from_volumes([p.image for p in phantoms], labels, num_classes=4,
                                           names=[f"phantom {p.seed}" for p in phantoms])
    data = plv.train_data(ACDC_CLASSES)
    data.unlabeled_truth = VolumeSlices(plv.volumes, [p.label for p in phantoms], plv.unlabeled_index, labeled=True)
    return data


def _spread(d: int, n: int) -> np.ndarray:
    """``n`` distinct slice indices in ``0..d-1`` spread evenly, ends excluded if room."""
    if n + 2 <= d:
        return np.round(np.linspace(0, d - 1, n + 2)[1:-1]).astype(int)
    return np.round(np.linspace(0, d - 1, n)).astype(int)


def phantom_val_volumes(n: int = 2, seed: int = 1000,
                        shape: tuple[int, int, int] = (10, 216, 256)) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``n`` fully labeled phantom volumes ``(name, image (D, H, W), label (D, H, W))``
    (same format as :func:`acdc_val_volumes`); use a ``seed`` unlike the training one."""
    from .phantom import make_phantom_cohort

    return [(f"phantom_{p.seed}", p.image, p.label) for p in make_phantom_cohort(n, seed=seed, shape=shape)]


# --------------------------------------------------------------------------- TrainData


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """ACDC names for 4 classes, background/foreground for 2, else ``class k``."""
    if num_classes == 4:
        return ACDC_CLASSES
    if num_classes == 2:
        return ("background", "foreground")
    return ("background",) + tuple(f"class {k}" for k in range(1, num_classes))


@dataclass
class TrainData:
    """What the trainer needs: two slice sets and the class layout.

    ``labeled`` / ``unlabeled``: slice sets (unlabeled may be empty; the
    trainer decides what to do then); ``ndim``: 2 (slices) or 3 (volumes);
    ``num_classes`` incl. background; ``class_names`` one per class (empty:
    :func:`default_class_names`).
    """

    labeled: object
    unlabeled: object
    ndim: int
    num_classes: int
    class_names: tuple[str, ...] = ()
    in_channels: int = 1
    #: Optional slice set with the true labels of the ``unlabeled`` samples
    #: (ACDC, the phantom), used only to score pseudo-labels, never to train.
    unlabeled_truth: object = None

    def __post_init__(self) -> None:
        if len(self.labeled) == 0:  # type: ignore[arg-type]
            raise M3HLInputError("no labeled slice to train on: label at least one slice (or give labeled cases).")
        if self.ndim not in (2, 3):
            raise M3HLInputError(f"ndim={self.ndim} must be 2 or 3.")
        if self.num_classes < 2:
            raise M3HLInputError(f"num_classes={self.num_classes} must be >= 2.")
        self.class_names = tuple(self.class_names) or default_class_names(self.num_classes)
        if len(self.class_names) != self.num_classes:
            raise M3HLInputError(
                f"{len(self.class_names)} class names {self.class_names} for {self.num_classes} classes."
            )


# --------------------------------------------------------------------------- dispatcher


def _is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _nifti_volumes(path: Path) -> tuple[list[np.ndarray], np.ndarray, tuple]:
    """Frames ``(Z, Y, X)`` of a 3D/4D NIfTI file, its affine and data shape."""
    vol = load_nifti(path)
    frames = [vol.data] if vol.data.ndim == 3 else list(vol.data)
    return frames, vol.affine, vol.data.shape


def load_train_data(
    source: PathLike,
    labels: Optional[PathLike] = None,
    *,
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
    if isinstance(source, str) and source.strip().lower() == "phantom":
        return phantom_train_data(n_volumes, labeled_slices_per_volume, seed, phantom_shape)
    path = Path(source)
    if path.is_dir():
        if (path / "train_slices.list").is_file():
            lab_names, unl_names = acdc_split(path, labeled_count, labeled_patients)
            return TrainData(ACDCSlices(path, lab_names, True), ACDCSlices(path, unl_names, False),
                             ndim=2, num_classes=4, class_names=ACDC_CLASSES,
                             unlabeled_truth=ACDCSlices(path, unl_names, True))
        if (path / "cases").is_dir():
            lab_names, unl_names = la_split(path, labeled_cases)
            return TrainData(LACases(path, lab_names, True), LACases(path, unl_names, False),
                             ndim=3, num_classes=2, class_names=LA_CLASSES)
        raise M3HLInputError(
            f"'{path}' is a folder but neither an ACDC root (no 'train_slices.list') nor an LA root "
            "(no 'cases/' folder)."
        )
    if _is_nifti(path):
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
