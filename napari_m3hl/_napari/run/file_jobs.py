"""Worker jobs that read and write files: session folders, checkpoints,
NIfTI export (plain data in, plain data out; no Qt object, no layer).
:mod:`napari_m3hl._napari.run.jobs` re-exports them beside the training and prediction jobs."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from napari_m3hl.errors import M3HLInputError


@dataclass
class ExtraSnapshot:
    """One ticked row of Data ▸ More volumes, as plain data taken in the GUI thread.

    ``image_shape``: the image layer's shape; ``image_source``: its file (None:
    none); ``labels``: copy of the row's labels layer (None: unlabeled);
    ``geometry``: that layer's ``scale``/``translate``/``metadata``, as
    :attr:`SessionSnapshot.geometry`."""

    image_name: str
    image_shape: tuple[int, ...]
    image_source: str | None = None
    labels_name: str | None = None
    labels: np.ndarray | None = None
    geometry: dict[str, Any] = field(default_factory=dict)


@dataclass
class SessionSnapshot:
    """A session folder's content, as plain data taken in the GUI thread.

    ``labels``: copy of the user's whole Labels layer; ``geometry``: its
    ``scale``/``translate``/``metadata`` (NIfTI affine and header);
    ``checkpoint``: a checkpoint file to copy in (None: keep the folder's);
    ``extras``: the ticked more volumes.
    """

    folder: Path
    labels: np.ndarray
    geometry: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    extras: list[ExtraSnapshot] = field(default_factory=list)


@dataclass
class AutosaveFailed:
    """Yielded by a training job whose autosave failed; training goes on."""

    folder: str
    error: str


def autosave_labels(snapshot: SessionSnapshot | None) -> AutosaveFailed | None:
    """Write ``snapshot`` (the labels when Train was pressed) into its session
    folder before a run starts; a failure is returned, not raised: the labels
    are still in napari and training goes on."""
    if snapshot is None:
        return None
    try:
        save_session_job(snapshot)
    except OSError as exc:
        return AutosaveFailed(str(snapshot.folder), f"{exc.__class__.__name__}: {exc}")
    return None


def autosave_checkpoint(snapshot: SessionSnapshot | None, finished: Any, out_dir: str | Path) -> AutosaveFailed | None:
    """Copy a finished run's checkpoint into the autosaved session folder of
    ``snapshot`` (nothing without one, or without a checkpoint). ``finished``:
    the run's ``TrainFinished`` event. A failed copy is returned, not raised:
    the run's own checkpoint is still there and training has ended well."""
    if snapshot is None or finished is None or not finished.checkpoint:
        return None
    from napari_m3hl.io.session import save_checkpoint_copy

    try:
        save_checkpoint_copy(snapshot.folder, finished.checkpoint,
                             {"iteration": finished.iteration, "run_dir": str(out_dir)})
    except OSError as exc:
        return AutosaveFailed(str(snapshot.folder), f"{exc.__class__.__name__}: {exc}")
    return None


@dataclass
class SessionOpened:
    """What :func:`open_session_job` hands back: the session and, when the
    session's image was not open, that image read from its source file."""

    session: Any  # napari_m3hl.io.session.Session
    image: tuple | None = None  # (data, kwargs, "image") from the NIfTI reader
    kind: str | None = None  # the session checkpoint's napari_m3hl.io.checkpoint.run_kind (None: no checkpoint)
    #: per more volume of the session (``session.extras``): its image read from its source file
    #: when that file was not open and exists, else None
    extra_images: list[tuple | None] = field(default_factory=list)
    #: per more volume: why its source file could not be read (None: read, open already, or no file)
    extra_errors: list[str | None] = field(default_factory=list)



def save_session_job(snap: SessionSnapshot) -> str:
    """Worker function: write the session folder (labels, settings, facts, checkpoint)."""
    from napari_m3hl.io.session import save_session
    from napari_m3hl._napari._writer import geometry_from_meta

    affine, header, _ = geometry_from_meta(snap.geometry, np.ndim(snap.labels))
    folder = save_session(snap.folder, snap.labels, affine, header, checkpoint=snap.checkpoint,
                          settings=snap.settings, meta=snap.meta, extras=[_session_volume(e) for e in snap.extras])
    return str(folder)


def _session_volume(extra: ExtraSnapshot) -> Any:
    """The :class:`napari_m3hl.io.session.SessionVolume` of a More volumes row (its labels' NIfTI geometry)."""
    from napari_m3hl.io.session import SessionVolume
    from napari_m3hl._napari._writer import geometry_from_meta

    affine = header = None
    if extra.labels is not None:
        affine, header, _ = geometry_from_meta(extra.geometry, np.ndim(extra.labels))
    return SessionVolume(extra.image_name, tuple(extra.image_shape), extra.image_source, extra.labels_name,
                         extra.labels, affine, header)


def _read_source_image(src: str | None, name: str | None, open_sources: Sequence[str]) -> tuple | None:
    """The image file ``src`` through the plugin's reader, as (data, kwargs, "image") named ``name``,
    when it is not among ``open_sources`` and exists; else None."""
    if not src or str(src) in set(map(str, open_sources)) or not Path(src).is_file():
        return None
    from napari_m3hl._napari._reader import read_nifti

    data, kwargs, layer_type = read_nifti(str(src))[0]
    if layer_type != "image":
        return None
    kwargs["name"] = name or kwargs.get("name")
    return data, kwargs, layer_type


def open_session_job(folder: str | Path, open_sources: Sequence[str] = ()) -> SessionOpened:
    """Worker function: read a session folder; read its image file too when
    it is not among ``open_sources`` (source paths of the open layers) and exists."""
    from napari_m3hl.io.checkpoint import load_checkpoint, run_kind
    from napari_m3hl.io.session import load_session

    sess = load_session(folder)
    kind = run_kind(load_checkpoint(sess.checkpoint)) if sess.checkpoint is not None else None
    src = sess.meta.get("image_source")
    image = None
    if src and str(src) not in set(map(str, open_sources)) and Path(src).is_file():
        from napari_m3hl._napari._reader import read_nifti

        data, kwargs, layer_type = read_nifti(str(src))[0]
        if layer_type == "image":
            kwargs["name"] = sess.meta.get("image_name", kwargs.get("name"))
            image = (data, kwargs, layer_type)
    extra_images: list[tuple | None] = []
    extra_errors: list[str | None] = []
    for vol in sess.extras:  # a more volume whose file cannot be read is left out, not the session
        try:
            extra_images.append(_read_source_image(vol.image_source, vol.image_name, open_sources))
            extra_errors.append(None)
        except (M3HLInputError, OSError) as exc:
            extra_images.append(None)
            extra_errors.append(str(exc))
    return SessionOpened(sess, image, kind, extra_images, extra_errors)


def load_checkpoint_job(path: str | Path, arch: str, num_classes: int, in_channels: int = 1) -> dict[str, Any]:
    """Worker function: read a checkpoint and check it fits the data; returns a summary."""
    from napari_m3hl.io.checkpoint import check_compatible, load_checkpoint, run_kind, unfinished_note

    ckpt = load_checkpoint(path)
    check_compatible(ckpt, arch, num_classes, in_channels, source=str(path))
    return {
        "path": str(path),
        "iteration": int(ckpt.get("iteration", 0)),
        "class_names": list(ckpt.get("class_names", [])),
        "patch_size": list(ckpt.get("patch_size", [])),
        "resumable": "optimizer" in ckpt,
        "config": ckpt.get("config", {}),
        "kind": run_kind(ckpt),
        "note": unfinished_note(ckpt, path),
    }


def copy_file_job(src: str | Path, dst: str | Path) -> str:
    """Worker function: copy a checkpoint file (atomic rename at the end)."""
    from napari_m3hl.io.files import atomic_copy

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise M3HLInputError(f"no checkpoint to save yet ({src} does not exist); train first")
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_copy(src, dst)
    return str(dst)


def export_job(path: str | Path, labels: np.ndarray, meta: dict[str, Any], painted: np.ndarray | None = None) -> str:
    """Worker function: write labels as NIfTI with the geometry in ``meta``;
    with ``painted`` (the user's labels, same shape), the slices painted there
    are written exactly as painted (:func:`napari_m3hl.fewslice.safeguard.merge_frames`)."""
    from napari_m3hl.io.nifti import save_nifti_labels
    from napari_m3hl.fewslice.safeguard import merge_frames
    from napari_m3hl._napari._writer import geometry_from_meta, nifti_path

    affine, header, _ = geometry_from_meta(meta, np.ndim(labels))
    target = nifti_path(path)
    _check_export_target(target, meta)
    return str(save_nifti_labels(merge_frames(labels, painted), target, affine, header))


def _check_export_target(target: Path, meta: dict[str, Any]) -> None:
    """Refuse an export onto the image the segmentation was made from (its
    ``source_path``) and into a folder that cannot be written, before writing."""

    from napari_m3hl.io.files import probe_writable, same_path

    src = (meta.get("metadata") or {}).get("source_path")
    if src and Path(str(src)).exists() and same_path(target, src):
        raise M3HLInputError(f"'{target}' is the image the segmentation was made from; exporting there would replace "
                             "the scan. Choose another file name (e.g. ending in _seg.nii.gz)")
    folder = target.parent
    try:
        probe_writable(folder)
    except OSError as exc:
        raise M3HLInputError(f"Cannot export into folder '{folder}': it is not writable ({exc.strerror or exc}); "
                             "choose a folder you can write to") from None
