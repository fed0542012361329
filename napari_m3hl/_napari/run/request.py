"""Train's input, checked and copied in the GUI thread.

Functions that turn the layers the user chose into a training request's
plain data: they check the layers and labels (raising
:class:`~napari_m3hl.errors.M3HLInputError` with a message that names the
layer, the shapes and what to do), pick the start file, copy the frames,
and name the next run folder. :class:`RunState` is what the widget keeps
about the run it started.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from napari.layers import Image, Labels

from napari_m3hl.training import events as ev
from napari_m3hl.config import TrainConfig
from napari_m3hl.errors import M3HLInputError
from napari_m3hl._napari.layers import control as lc
from napari_m3hl.app.plan import StartMode

if TYPE_CHECKING:  # pragma: no cover
    import napari


@dataclass
class RunState:
    """What the GUI remembers about the current / last training run."""

    image: Image
    labels: Labels
    token: tuple
    preview_frame: int
    class_names: tuple[str, ...]
    run_dir: Path
    batch_size: int
    started: float = field(default_factory=time.perf_counter)
    first_preview_s: float | None = None
    preview_iteration: int | None = None  # iteration of the pseudo-labels shown
    dropped_previews: int = 0
    finished: ev.TrainFinished | None = None
    fewslice: bool = False  # the few-slice fine-tune (napari_m3hl.fewslice.loop), not the preset's M³HL run
    iteration_offset: int = 0  # iterations of the model before this run (few-slice Train on)
    mix_shown: bool = False  # a mix preview of this run was drawn
    drawn: set[str] = field(default_factory=set)  # the preview layers this run drew into
    method: str = ""  # a fine-tune's FewSliceOptions.mode
    sources: list = field(default_factory=list)  # a fine-tune's image layers (0: the picked image)
    volume_refs: list[tuple[int, int | None]] = field(default_factory=list)  # (source, frame) per fine-tune volume


def msg_2d(image: Image) -> str:
    """Why a single 2D image cannot be trained on."""
    return (
        f"Image '{image.name}' is a single 2D image (shape {tuple(image.data.shape)}); M³HL needs a volume of "
        "slices (Z, Y, X) or a cine (T, Z, Y, X): the unlabeled slices are what it learns from."
    )


def check_layers(image: Image | None, labels: Labels | None) -> tuple[Image, Labels]:
    """The image and labels layers chosen for Train, or M3HLInputError saying what is wrong."""
    if image is None:
        raise M3HLInputError(
            "No image layer: open a cardiac MR volume (File ▸ Open, .nii/.nii.gz) or the sample "
            "(File ▸ Open Sample ▸ Synthetic cardiac MR phantom (M³HL))."
        )
    if image.rgb or image.ndim < 3:
        raise M3HLInputError(msg_2d(image))
    if image.ndim > 4:
        raise M3HLInputError(
            f"Image '{image.name}' has {image.ndim} axes {tuple(image.data.shape)}; use (Z, Y, X) or (T, Z, Y, X)."
        )
    if labels is None:
        raise M3HLInputError(
            f"No labels layer for '{image.name}': click 'New labels layer' and paint RV / Myo / LV on a few slices."
        )
    if tuple(labels.data.shape) != tuple(image.data.shape):
        raise M3HLInputError(
            f"Labels '{labels.name}' have shape {tuple(labels.data.shape)} but image '{image.name}' has shape "
            f"{tuple(image.data.shape)}; the labels must be painted on the image's grid "
            "(use 'New labels layer')."
        )
    if not np.allclose(labels.scale, image.scale, rtol=1e-4, atol=1e-6):
        raise M3HLInputError(
            f"Labels '{labels.name}' have voxel size {tuple(float(s) for s in labels.scale)} but image "
            f"'{image.name}' has {tuple(float(s) for s in image.scale)} (shape {tuple(image.data.shape)} "
            f"for both); they belong to different grids."
        )
    _check_same_place(image, labels)
    return image, labels


def _check_same_place(image: Image, labels: Labels) -> None:
    """Labels of the image's shape and voxel size must also lie where the image
    lies: the same NIfTI affine (when both came from files) and the same offset."""
    a_img, a_lab = image.metadata.get("affine"), labels.metadata.get("affine")
    if a_img is not None and a_lab is not None and not np.allclose(a_img, a_lab, atol=1e-3):
        d = np.asarray(a_lab, float)[:3, 3] - np.asarray(a_img, float)[:3, 3]
        raise M3HLInputError(
            f"Labels '{labels.name}' lie on another grid than image '{image.name}' (their NIfTI affines differ: "
            f"origin offset ({d[0]:.1f}, {d[1]:.1f}, {d[2]:.1f}) mm); they were painted on another image. Use "
            "'New labels layer' on this image, or open the labels drawn on it.")
    if not np.allclose(labels.translate, image.translate, atol=1e-3):
        d = np.asarray(labels.translate, float) - np.asarray(image.translate, float)
        raise M3HLInputError(
            f"Labels '{labels.name}' lie on another grid than image '{image.name}' (shifted by "
            f"{tuple(round(float(v), 1) for v in d)} in world units); use 'New labels layer' on this image.")


def check_labels(name: str, lab: np.ndarray, config: TrainConfig) -> None:
    """At least one painted slice, and no value beyond the preset's classes."""
    if lc.labeled_slices(lab).size == 0:
        raise M3HLInputError(
            f"No labeled slice in '{name}': paint RV / Myo / LV on at least one slice "
            f"(2-3 slices spread from base to apex work well)."
        )
    hi = int(lab.max())
    if hi >= config.num_classes:
        raise M3HLInputError(
            f"Labels '{name}' contain the value {hi}, but preset '{config.preset}' has {config.num_classes} "
            f"classes ({', '.join(config.class_names)}: 0..{config.num_classes - 1})."
        )


def start_files(mode: StartMode, start_file: str, resume_from: str | Path | None) -> tuple[Path | None, Path | None]:
    """(init_from, resume_from) for Start mode ``mode``
    with ``start_file``, or for continuing ``resume_from`` (Train on)."""
    start_file = start_file.strip()
    if resume_from is not None:
        resume_from = Path(resume_from)
        if not resume_from.is_file():
            raise M3HLInputError(f"The checkpoint to continue, '{resume_from}', no longer exists; press Train.")
        return None, resume_from
    if mode is StartMode.SCRATCH:
        return None, None
    if not start_file:
        raise M3HLInputError(f"'{mode.value}' needs a checkpoint or model file: click Browse….")
    if not Path(start_file).is_file():
        raise M3HLInputError(f"Checkpoint file '{start_file}' does not exist.")
    return (Path(start_file), None) if mode is StartMode.FINE_TUNE else (None, Path(start_file))


def copy_frames(image: Image, lab: np.ndarray, extra_layers: Sequence[Image]
                ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], list[str]]:
    """The ``(D, H, W)`` frames of the image and the extra unlabeled volumes
    (views of the layers' data: napari never writes image data, and the
    worker converts them to float32, so no whole-volume copy is made in the
    GUI thread), copies of the labels' frames (the user may paint on while
    training runs), and a name per image frame."""
    extra: list[np.ndarray] = []
    for lay in extra_layers:
        if lay.ndim not in (3, 4) or lay.rgb:
            raise M3HLInputError(f"Extra unlabeled layer '{lay.name}' {tuple(lay.data.shape)} is not a volume of slices.")
        extra += lc.frames(lay.data)
    images = lc.frames(image.data)
    labels = [np.array(f, copy=True) for f in lc.frames(lab)]
    names = [image.name] if image.ndim == 3 else [f"{image.name} frame {t}" for t in range(len(images))]
    return images, labels, extra, names


def fewslice_volumes(image: Image, lab: np.ndarray, pairs: Sequence[tuple[Image, Labels]],
                     extra: Sequence[Image]) -> tuple[list, list[Image]]:
    """The few-slice request's volumes (:class:`napari_m3hl._napari.run.fewslice.VolumeIn`)
    and their image layers: the picked image with its labels ``lab`` (a copy
    is taken), the ticked (image, labels) pairs, the ticked unlabeled images;
    a cine's frames are volumes of their own, painted or unlabeled."""
    from napari_m3hl._napari.run.fewslice import VolumeIn

    sources: list[Image] = [image] + [p[0] for p in pairs] + list(extra)
    paints = [lab] + [np.asarray(p[1].data) for p in pairs] + [None] * len(extra)
    volumes = []
    for s, (layer, painted) in enumerate(zip(sources, paints)):
        if layer.ndim not in (3, 4) or layer.rgb:
            raise M3HLInputError(f"Layer '{layer.name}' {tuple(layer.data.shape)} is not a volume of slices.")
        frames = lc.frames(layer.data)  # views: the worker converts them
        marks = lc.frames(painted) if painted is not None else [None] * len(frames)
        for t, (frame, mark) in enumerate(zip(frames, marks)):
            copy = np.array(mark, copy=True) if mark is not None and mark.any() else None
            name = layer.name if layer.ndim == 3 else f"{layer.name} frame {t}"
            volumes.append(VolumeIn(name, frame, copy, s, t if layer.ndim == 4 else None))
    return volumes, sources


def frame_in_view(viewer: "napari.Viewer", image: Image) -> int:
    """The time frame of a cine in view (0 for a 3D image)."""
    if image.ndim != 4:
        return 0
    idx = image.world_to_data(viewer.dims.point)[0]
    return int(np.clip(round(float(idx)), 0, image.data.shape[0] - 1))


def next_run_dir(out_dir: Path, n_runs: int) -> tuple[Path, int]:
    """The next free ``run-NN`` folder under ``out_dir`` and its number."""
    while True:
        n_runs += 1
        run_dir = Path(out_dir) / f"run-{n_runs:02d}"
        if not run_dir.exists():
            return run_dir, n_runs
