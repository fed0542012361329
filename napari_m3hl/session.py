"""Annotation sessions on disk: a folder that survives closing napari.

A session folder holds

- ``labels.nii.gz``: the user's label map with the image's geometry,
- ``checkpoint.pt``: the latest training checkpoint (resumable), if any,
- ``settings.json``: the widget's settings (preset, M³HL parameters, ...),
- ``session.json``: what the session is about (image source, layer names,
  class names, labeled slices, time stamps, the run manifest).

Writes go to a temporary file first and are renamed into place, so a crash
never leaves a half-written session file.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import M3HLInputError

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


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_labels(folder: str | Path, labels: np.ndarray, affine: np.ndarray, header: Any = None) -> Path:
    """Write ``labels.nii.gz`` atomically (used for the autosave at each Train)."""
    from .io import save_nifti_labels

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".labels.tmp.nii.gz"
    save_nifti_labels(labels, tmp, affine, header)
    os.replace(tmp, folder / LABELS)
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
    folder.mkdir(parents=True, exist_ok=True)
    save_labels(folder, labels, affine, header)
    if checkpoint is not None:
        _copy_checkpoint(folder, checkpoint)
    _atomic_write_text(folder / SETTINGS, json.dumps(settings or {}, indent=2, default=str))
    labeled = [int(i) for i in np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))] if labels.ndim == 3 else []
    info = {"saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "labeled_slices": labeled, **(meta or {})}
    _atomic_write_text(folder / META, json.dumps(info, indent=2, default=str))
    return folder


def _copy_checkpoint(folder: Path, checkpoint: str | Path) -> None:
    src = Path(checkpoint)
    if not src.is_file():
        raise M3HLInputError(f"checkpoint {src} does not exist; train first or choose another file")
    if src.resolve() != (folder / CHECKPOINT).resolve():
        tmp = folder / ".checkpoint.tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, folder / CHECKPOINT)


def save_checkpoint_copy(folder: str | Path, checkpoint: str | Path, meta_update: dict[str, Any] | None = None) -> Path:
    """Copy ``checkpoint`` into the session folder as ``checkpoint.pt`` (atomically)
    and merge ``meta_update`` into ``session.json``; used when a run ends."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _copy_checkpoint(folder, checkpoint)
    meta_path = folder / META
    info = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    info.update(meta_update or {})
    info["checkpoint_saved"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _atomic_write_text(meta_path, json.dumps(info, indent=2, default=str))
    return folder / CHECKPOINT


def load_session(folder: str | Path) -> Session:
    """Read a session folder written by :func:`save_session`."""
    from .io import load_nifti

    folder = Path(folder)
    if not (folder / LABELS).is_file():
        raise M3HLInputError(f"{folder} is not an M³HL session folder (no {LABELS}); choose the folder you saved")
    vol = load_nifti(folder / LABELS)
    labels = np.rint(vol.data).astype(np.uint8)
    ckpt = folder / CHECKPOINT
    settings = json.loads((folder / SETTINGS).read_text()) if (folder / SETTINGS).is_file() else {}
    meta = json.loads((folder / META).read_text()) if (folder / META).is_file() else {}
    return Session(folder, labels, vol.affine, vol.header, ckpt if ckpt.is_file() else None, settings, meta)
