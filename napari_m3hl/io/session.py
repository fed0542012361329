"""Annotation sessions on disk: a folder that survives closing napari.

A session folder holds

- ``labels.nii.gz``: the user's label map with the image's geometry,
- ``checkpoint.pt``: the latest training checkpoint (resumable), if any,
- ``settings.json``: the widget's settings (preset, M³HL parameters, ...),
- ``session.json``: what the session is about (image source, layer names,
  class names, labeled slices, time stamps, the run manifest, the more volumes),
- ``more/NN_labels.nii.gz``: the label map of each labeled "more volume" (other
  image layers trained on too; :class:`SessionVolume`), with that volume's geometry.

Writes go to a temporary file first and are renamed into place, so a crash
never leaves a half-written session file; :func:`save_session` renames its
files only when all of them are written, so a failed save (a full disk)
leaves the folder's earlier session whole.
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from napari_m3hl.errors import M3HLInputError
from napari_m3hl.io.files import atomic_copy, atomic_path, atomic_write_text, is_nifti_name, nifti_suffix, same_path
from napari_m3hl.labels import labeled_slices

LABELS = "labels.nii.gz"
CHECKPOINT = "checkpoint.pt"
SETTINGS = "settings.json"
META = "session.json"
#: The folder (inside a session folder) of the more volumes' label maps, and their file names.
MORE = "more"
MORE_LABELS = re.compile(r"^(\d+)_labels\.nii\.gz$")
#: The key of ``session.json`` that lists the more volumes.
MORE_KEY = "extra_volumes"


@dataclass
class SessionVolume:
    """One more volume of a session (the widget's Data ▸ More volumes): an image
    trained on beside the main one, with its label map when it was labeled.

    ``image_shape``: the image layer's shape, ``(Z, Y, X)`` or ``(T, Z, Y, X)``;
    ``image_source``: its file, None when it came from no file; ``labels``: the
    label map, uint8 of ``image_shape`` (None: the volume is unlabeled data);
    ``affine`` / ``header``: its NIfTI geometry; ``labels_file``: where the map
    lies in the session folder (set by :func:`load_session`)."""

    image_name: str
    image_shape: tuple[int, ...]
    image_source: str | None = None
    labels_name: str | None = None
    labels: np.ndarray | None = None
    affine: np.ndarray | None = None
    header: Any = None
    labels_file: Path | None = None


@dataclass
class Session:
    """A loaded session. ``labels`` is (Z, Y, X) uint8 as the plugin shows it."""

    folder: Path
    labels: np.ndarray
    affine: np.ndarray
    header: Any
    checkpoint: Path | None
    settings: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    extras: list[SessionVolume] = field(default_factory=list)


#: Types of the widget's session settings (``settings.json``), checked on load so a
#: session with a hand-edited or damaged settings file is refused before anything opens.
SETTING_TYPES: dict[str, tuple[type, ...]] = {
    "preset": (str,), "variant": (str,), "device": (str,), "start": (str,), "start_path": (str,),
    "network": (str,), "score": (str,), "spread": (bool,), "train_on_iterations": (int,), "advanced": (dict,),
}
ADVANCED_TYPES: dict[str, tuple[type, ...]] = {
    "iterations": (int,), "batch_size": (int,), "patch_size": (list, tuple), "block_size": (list, tuple),
    "mask_ratio": (int, float), "lam": (int, float), "alpha": (int, float), "lr": (int, float),
    "ema_decay": (int, float),
}


def check_session_labels(labels: np.ndarray, where: str) -> np.ndarray:
    """``labels`` as uint8, refusing what a cast would change: non-integer,
    negative or > 255 values (no wrap-around: -1 would become 255, 300 become 44)."""
    labels = np.asarray(labels)
    if labels.ndim not in (3, 4):
        raise M3HLInputError(f"{where}: labels must be a (Z, Y, X) or (T, Z, Y, X) volume, got shape {labels.shape}")
    if labels.dtype.kind == "b" or labels.dtype == np.uint8:
        return labels.astype(np.uint8, copy=False)
    if labels.dtype.kind not in "iuf":
        raise M3HLInputError(f"{where}: labels must be integer class indices, got dtype {labels.dtype}")
    if labels.size:
        if labels.dtype.kind == "f" and (not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels))):
            raise M3HLInputError(f"{where}: labels hold fractional or NaN values; class indices are whole numbers")
        lo, hi = labels.min(), labels.max()
        if lo < 0 or hi > 255:
            raise M3HLInputError(
                f"{where}: labels hold the value {lo if lo < 0 else hi}; class indices must lie in 0..255. "
                "Relabel them (nothing was written)."
            )
    return labels.astype(np.uint8)


def check_settings(settings: Any, path: Path) -> dict[str, Any]:
    """The session settings if every known key has the expected type; unknown keys pass."""
    if not isinstance(settings, dict):
        raise M3HLInputError(f"{path} must hold a JSON object of settings, not {type(settings).__name__}")
    for table, types, where in ((settings, SETTING_TYPES, ""), (settings.get("advanced") or {}, ADVANCED_TYPES, "advanced.")):
        if not isinstance(table, dict):
            break
        for key, kinds in types.items():
            v = table.get(key)
            if v is None:
                continue
            bad = not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds)
            if not bad and kinds == (list, tuple):
                bad = len(v) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)
            if bad:
                want = " or ".join(k.__name__ for k in kinds)
                raise M3HLInputError(
                    f"{path}: setting {where}{key} is {v!r}, expected {want if kinds != (list, tuple) else 'two sizes'}; "
                    "fix or delete the file (the labels and checkpoint are kept)"
                )
    return settings


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise M3HLInputError(
            f"{path} is not valid JSON ({exc}); fix it or delete it (the labels and checkpoint are kept)"
        ) from None
    except OSError as exc:
        raise M3HLInputError(f"cannot read {path}: {exc.strerror or exc}") from None


def save_labels(folder: str | Path, labels: np.ndarray, affine: np.ndarray, header: Any = None) -> Path:
    """Write ``labels.nii.gz`` atomically (used for the autosave at each Train)."""
    from napari_m3hl.io.nifti import save_nifti_labels

    folder = Path(folder)
    labels = check_session_labels(labels, f"session {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    save_nifti_labels(labels, folder / LABELS, affine, header)  # written to a temporary file, then renamed
    return folder / LABELS


def save_session(
    folder: str | Path,
    labels: np.ndarray,
    affine: np.ndarray,
    header: Any = None,
    checkpoint: str | Path | None = None,
    settings: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    extras: Sequence[SessionVolume] = (),
) -> Path:
    """Write (or update) a session folder; returns it.

    Args:
        labels: (Z, Y, X) label map (the plugin's axis order).
        affine, header: the source image's NIfTI geometry.
        checkpoint: a checkpoint file to copy in as ``checkpoint.pt``.
        settings: JSON-serialisable widget settings.
        meta: JSON-serialisable facts (image source, names, manifest).
        extras: the more volumes; each labeled one's map is written to
            ``more/NN_labels.nii.gz`` (NN: its place in ``extras``, from 01), all
            are listed in ``session.json``, and label maps of an earlier save
            that this one no longer lists are removed.
    """
    folder = Path(folder)
    labels = check_session_labels(labels, f"session {folder}")
    more = _check_extras(folder, extras, (meta or {}).get("image_source"))
    source = (meta or {}).get("image_source")
    for name in (LABELS, CHECKPOINT, SETTINGS, META):  # a session never replaces the image it was made on
        if source and Path(str(source)).exists() and same_path(folder / name, source):
            raise M3HLInputError(f"session folder {folder}: its {name} would replace the image {source}; choose "
                                 "another folder for the session")
    from napari_m3hl.io.nifti import save_nifti_labels

    src = _checkpoint_source(folder, checkpoint) if checkpoint is not None else None
    folder.mkdir(parents=True, exist_ok=True)
    labeled = [int(i) for i in labeled_slices(labels)] if labels.ndim == 3 else []
    info = {"saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "labeled_slices": labeled, **(meta or {}),
            MORE_KEY: [entry for entry, _, _ in more]}
    # every file is written to a temporary name first and all are renamed into place only when all are
    # complete: a failed write (a full disk) leaves the folder's earlier session whole and no partial file
    had_more = (folder / MORE).is_dir()
    try:
        with contextlib.ExitStack() as staged:
            def stage(path: Path) -> Path:  # a temporary name beside ``path``, renamed onto it as the block ends
                suffix = nifti_suffix(path) if is_nifti_name(path) else ".tmp"
                return staged.enter_context(atomic_path(path, suffix=suffix))

            save_nifti_labels(labels, stage(folder / LABELS), affine, header)
            _write_extra_labels(folder, more, target=stage)
            if src is not None:
                shutil.copyfile(src, stage(folder / CHECKPOINT))
            stage(folder / SETTINGS).write_text(json.dumps(settings or {}, indent=2, default=str))
            stage(folder / META).write_text(json.dumps(info, indent=2, default=str))
    except BaseException:
        if not had_more and (folder / MORE).is_dir() and not any((folder / MORE).iterdir()):
            (folder / MORE).rmdir()  # made for this save's maps, none of which was kept
        raise
    _remove_stale_extras(folder, more)
    return folder


def _checkpoint_source(folder: Path, checkpoint: str | Path) -> Path | None:
    """The checkpoint file to copy into ``folder`` (None: it is the folder's own ``checkpoint.pt``)."""
    src = Path(checkpoint)
    if not src.is_file():
        raise M3HLInputError(f"checkpoint {src} does not exist; train first or choose another file")
    return None if src.resolve() == (folder / CHECKPOINT).resolve() else src


def _copy_checkpoint(folder: Path, checkpoint: str | Path) -> None:
    src = _checkpoint_source(folder, checkpoint)
    if src is not None:
        atomic_copy(src, folder / CHECKPOINT)


def save_checkpoint_copy(folder: str | Path, checkpoint: str | Path, meta_update: dict[str, Any] | None = None) -> Path:
    """Copy ``checkpoint`` into the session folder as ``checkpoint.pt`` (atomically)
    and merge ``meta_update`` into ``session.json``; used when a run ends."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _copy_checkpoint(folder, checkpoint)
    meta_path = folder / META
    info = _read_json(meta_path)
    info = info if isinstance(info, dict) else {}
    info.update(meta_update or {})
    info["checkpoint_saved"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_text(meta_path, json.dumps(info, indent=2, default=str))
    return folder / CHECKPOINT


def load_session(folder: str | Path) -> Session:
    """Read a session folder written by :func:`save_session`.

    Everything is read and checked before anything is returned, so a damaged
    file (broken JSON, wrongly typed settings, labels outside 0..255 or not
    whole numbers) is refused with its name and nothing opens half-way."""
    from napari_m3hl.io.nifti import load_nifti

    folder = Path(folder)
    if not (folder / LABELS).is_file():
        raise M3HLInputError(f"{folder} is not an M³HL session folder (no {LABELS}); choose the folder you saved")
    vol = load_nifti(folder / LABELS)
    labels = check_session_labels(vol.data, str(folder / LABELS))
    ckpt = folder / CHECKPOINT
    settings = check_settings(_read_json(folder / SETTINGS), folder / SETTINGS)
    meta = _read_json(folder / META)
    if not isinstance(meta, dict):
        raise M3HLInputError(f"{folder / META} must hold a JSON object, not {type(meta).__name__}")
    extras = _load_extras(folder, meta.get(MORE_KEY) or [])
    return Session(folder, labels, vol.affine, vol.header, ckpt if ckpt.is_file() else None, settings, meta, extras)


def _load_extras(folder: Path, entries: Any) -> list[SessionVolume]:
    """The more volumes listed in ``session.json`` (``entries``), each labeled
    one's map read and checked (values, shape); a damaged entry or a missing,
    unreadable or mismatched labels file is refused naming it."""
    from napari_m3hl.io.nifti import load_nifti

    meta_path = folder / META
    if not isinstance(entries, list):
        raise M3HLInputError(f"{meta_path}: '{MORE_KEY}' must be a list of volumes, not {type(entries).__name__}; "
                             "fix or delete the file")
    out = []
    for k, e in enumerate(entries, start=1):
        shape = e.get("image_shape") if isinstance(e, dict) else None
        rel = e.get("labels_file") if isinstance(e, dict) else None
        if (not isinstance(e, dict) or not isinstance(e.get("image_name"), str)
                or not isinstance(shape, list) or len(shape) not in (3, 4)
                or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
                or not isinstance(e.get("image_source"), (str, type(None)))
                or not isinstance(e.get("labels_name"), (str, type(None)))
                or not (rel is None or isinstance(rel, str) and rel.startswith(f"{MORE}/")
                        and MORE_LABELS.match(rel[len(MORE) + 1:]))):
            raise M3HLInputError(f"{meta_path}: more volume {k} is damaged ({e!r:.120}); it needs an image name, "
                                 f"an image shape and a labels file under {MORE}/ or none; fix or delete the file")
        vol = SessionVolume(e["image_name"], tuple(shape), e.get("image_source"), e.get("labels_name"))
        if rel is not None:
            path = folder / rel
            if not path.is_file():
                raise M3HLInputError(f"{path} is missing: the session lists it as the labels of the more volume "
                                     f"'{vol.image_name}'; put it back or save the session again")
            nii = load_nifti(path)
            labels = check_session_labels(nii.data, str(path))
            if tuple(labels.shape) != vol.image_shape:
                raise M3HLInputError(f"{path}: labels of shape {tuple(labels.shape)} do not match the more volume "
                                     f"'{vol.image_name}' {vol.image_shape}; put the right file back or save the "
                                     "session again")
            vol = replace(vol, labels=labels, affine=nii.affine, header=nii.header, labels_file=path)
        out.append(vol)
    return out


def _check_extras(folder: Path, extras: Sequence[SessionVolume], source: Any
                  ) -> list[tuple[dict[str, Any], SessionVolume, str | None]]:
    """Each more volume's ``session.json`` entry, the volume, and its labels
    file (relative to ``folder``; None: unlabeled), checked before anything is
    written: label values (:func:`check_session_labels`), the map's shape
    against the image's, and no session file over one of the images."""
    out = []
    for k, vol in enumerate(extras, start=1):
        shape = tuple(int(n) for n in vol.image_shape)
        rel = None
        if vol.labels is not None:
            vol = replace(vol, labels=check_session_labels(
                vol.labels, f"session {folder}: labels '{vol.labels_name}' of the more volume '{vol.image_name}'"))
            if tuple(vol.labels.shape) != shape:
                raise M3HLInputError(
                    f"session {folder}: labels '{vol.labels_name}' {tuple(vol.labels.shape)} do not match the more "
                    f"volume '{vol.image_name}' {shape}; pick labels painted on that image (nothing was written)")
            rel = f"{MORE}/{k:02d}_labels.nii.gz"
        labeled = [int(i) for i in labeled_slices(vol.labels)] if vol.labels is not None and vol.labels.ndim == 3 else []
        entry = {"image_name": vol.image_name, "image_source": vol.image_source, "image_shape": list(shape),
                 "labels_name": vol.labels_name if rel else None, "labels_file": rel, "labeled_slices": labeled}
        out.append((entry, vol, rel))
    sources = [str(s) for s in [source, *(v.image_source for v in extras)] if s and Path(str(s)).exists()]
    names = [LABELS, CHECKPOINT, SETTINGS, META, *(rel for _, _, rel in out if rel)]
    for src in sources if extras else ():  # a session never replaces an image it was made on
        for name in names:
            if same_path(folder / name, src):
                raise M3HLInputError(f"session folder {folder}: its {name} would replace the image {src}; choose "
                                     "another folder for the session")
    return out


def _write_extra_labels(folder: Path, more: list[tuple[dict[str, Any], SessionVolume, str | None]],
                        target: Callable[[Path], Path] = lambda path: path) -> None:
    """Write each labeled more volume's map with that volume's geometry to
    ``target(its file)`` (the file itself: ``save_nifti_labels`` writes it
    atomically; or a staged temporary name, renamed into place by the caller)."""
    from napari_m3hl.io.nifti import affine_from_spacing, save_nifti_labels

    for _, vol, rel in more:
        if rel is not None:
            affine = vol.affine if vol.affine is not None else affine_from_spacing((1.0, 1.0, 1.0))
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            save_nifti_labels(vol.labels, target(folder / rel), affine, vol.header)


def _remove_stale_extras(folder: Path, more: list[tuple[dict[str, Any], SessionVolume, str | None]]) -> None:
    """Remove the more volumes' label maps of an earlier save that ``session.json`` no longer lists
    (only files named as :func:`save_session` names them), and ``more/`` when it is left empty."""
    keep = {rel for _, _, rel in more if rel}
    sub = folder / MORE
    if not sub.is_dir():
        return
    for path in sub.iterdir():
        if MORE_LABELS.match(path.name) and f"{MORE}/{path.name}" not in keep and path.is_file():
            path.unlink()
    if not any(sub.iterdir()):
        sub.rmdir()
