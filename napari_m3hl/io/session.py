"""Annotation sessions on disk: a folder that survives closing napari.

A session folder holds

- ``labels.nii.gz``: the user's label map with the image's geometry,
- ``checkpoint.pt``: the latest training checkpoint (resumable), if any,
- ``settings.json``: the widget's settings (preset, M³HL parameters, ...),
- ``session.json``: what the session is about (image source, layer names,
  class names, labeled slices, time stamps, the run manifest).

Writes go to a temporary file first and are renamed into place, so a crash
never leaves a half-written session file; :func:`save_session` renames its
files only when all of them are written, so a failed save (a full disk)
leaves the folder's earlier session whole.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_m3hl.errors import M3HLInputError
from napari_m3hl.io.files import atomic_copy, atomic_path, atomic_write_text, same_path
from napari_m3hl.labels import labeled_slices

LABELS = "labels.nii.gz"
CHECKPOINT = "checkpoint.pt"
SETTINGS = "settings.json"
META = "session.json"


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
) -> Path:
    """Write (or update) a session folder; returns it.

    Args:
        labels: (Z, Y, X) label map (the plugin's axis order).
        affine, header: the source image's NIfTI geometry.
        checkpoint: a checkpoint file to copy in as ``checkpoint.pt``.
        settings: JSON-serialisable widget settings.
        meta: JSON-serialisable facts (image source, names, manifest).
    """
    folder = Path(folder)
    labels = check_session_labels(labels, f"session {folder}")
    source = (meta or {}).get("image_source")
    for name in (LABELS, CHECKPOINT, SETTINGS, META):  # a session never replaces the image it was made on
        if source and Path(str(source)).exists() and same_path(folder / name, source):
            raise M3HLInputError(f"session folder {folder}: its {name} would replace the image {source}; choose "
                                 "another folder for the session")
    from napari_m3hl.io.nifti import save_nifti_labels

    src = _checkpoint_source(folder, checkpoint) if checkpoint is not None else None
    folder.mkdir(parents=True, exist_ok=True)
    labeled = [int(i) for i in labeled_slices(labels)] if labels.ndim == 3 else []
    info = {"saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "labeled_slices": labeled, **(meta or {})}
    # every file is written to a temporary name first and all are renamed into place only when all are
    # complete: a failed write (a full disk) leaves the folder's earlier session whole and no partial file
    with contextlib.ExitStack() as staged:
        save_nifti_labels(labels, staged.enter_context(atomic_path(folder / LABELS, suffix=".nii.gz")), affine, header)
        if src is not None:
            shutil.copyfile(src, staged.enter_context(atomic_path(folder / CHECKPOINT)))
        staged.enter_context(atomic_path(folder / SETTINGS)).write_text(json.dumps(settings or {}, indent=2, default=str))
        staged.enter_context(atomic_path(folder / META)).write_text(json.dumps(info, indent=2, default=str))
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
    return Session(folder, labels, vol.affine, vol.header, ckpt if ckpt.is_file() else None, settings, meta)
