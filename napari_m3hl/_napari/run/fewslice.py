"""The widget's few-slice fine-tune, as a worker job of plain data.

When **Start** is *Fine-tune from file* (the default: the shipped cardiac
model), **Train** runs the engine's few-slice loop
(:mod:`napari_m3hl.fewslice.loop`, the path of ``m3hl train --data IMG
--labels PAINTED``) with the same defaults (:class:`~napari_m3hl.fewslice.loop.FewSliceOptions`)
and the Method the panel names (supervised or M³HL), over the picked image and
labels, the ticked extra volumes with their labels and the ticked unlabeled
ones (a cine's frames are volumes of their own: the painted ones labeled, the
rest unlabeled), and ends with the safeguard's verdict
(:mod:`napari_m3hl.fewslice.safeguard`).

:func:`fewslice_job` runs in a thread worker: it loads the start model,
segments every volume with it, fine-tunes, and yields the start model's
segmentation of the first painted volume (:class:`StartSegmentation`, the
first preview), the trainer's events (with ``MixPreview`` in M³HL mode), each
:class:`~napari_m3hl.fewslice.loop.Check` followed by its
:class:`napari_m3hl._napari.run.jobs.PreviewQuality`, in M³HL mode the teacher's
:class:`~napari_m3hl.fewslice.loop.PseudoLabels`, and last the
:class:`~napari_m3hl.fewslice.loop.FewSliceResult` (its ``volumes`` in the
order of :func:`job_order`). No Qt and no napari layer here.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from napari_m3hl.fewslice.loop import Check, FewSliceOptions, FewSliceResult
from napari_m3hl.training.trainer import TrainControl
from napari_m3hl._napari.run.file_jobs import SessionSnapshot, autosave_checkpoint, autosave_labels
from napari_m3hl._napari.run.jobs import DataReady, preview_quality, torch_threads

@dataclass
class StartSegmentation:
    """Yielded by :func:`fewslice_job` before training: the start model's
    segmentation of the first painted volume, (D, H, W) uint8 (the first preview)."""

    labels: np.ndarray


#: FewSliceOptions fields the widget's settings (Advanced form, ``config_overrides``) may set.
OPTION_FIELDS = frozenset(f.name for f in dataclasses.fields(FewSliceOptions))


def fewslice_options(settings: dict[str, Any], device: str, overrides: dict[str, Any],
                     mode: str | None = None) -> FewSliceOptions:
    """The few-slice options of a run: the engine's defaults, then the Advanced
    form's ``iterations`` / ``batch_size`` / ``lr`` / ``ema_decay`` (``settings``),
    the ``device``, the panel's Method (``mode``: ``"supervised"`` or ``"m3hl"``;
    None: the engine's default), then ``overrides`` (keys that are not option
    fields, such as ``patch_size``, are skipped: the network keeps the start
    model's input)."""
    picked = {k: settings[k] for k in ("iterations", "batch_size", "lr", "ema_decay") if k in settings}
    picked["device"] = device
    if mode is not None:
        picked["mode"] = mode
    picked.update({k: v for k, v in overrides.items() if k in OPTION_FIELDS})
    return dataclasses.replace(FewSliceOptions(), **picked)


@dataclass
class VolumeIn:
    """One volume of a few-slice request. ``image``: (D, H, W) view of a layer's
    data (converted in the worker); ``painted``: (D, H, W) copy of its labels
    when they paint some slice of it, else None (unlabeled data); ``source``:
    which image layer of the request it comes from (0: the picked image);
    ``frame``: its time frame in a cine (None for a volume)."""

    name: str
    image: np.ndarray
    painted: np.ndarray | None
    source: int = 0
    frame: int | None = None


def job_order(volumes: list[VolumeIn]) -> list[int]:
    """Indices of ``volumes`` in the fine-tune's order (the engine's
    ``FewSliceJob.volumes`` and ``FewSliceResult.volumes``): the painted
    volumes, then the unlabeled ones, each in the request's order."""
    painted = [i for i, v in enumerate(volumes) if v.painted is not None]
    return painted + [i for i, v in enumerate(volumes) if v.painted is None]


@dataclass
class FewSliceRequest:
    """What a few-slice worker needs, as plain data (no layers).

    ``volumes``: every volume to train on and segment (the first painted one is
    the one previewed); ``start``: the model file to fine-tune; ``base``: the
    first start model's segmentation of the previewed volume when this run
    continues an earlier fine-tune (Train on), so that the safeguard compares
    with it rather than with the model continued; ``token``: the layer state
    the previews belong to; ``mix_preview_every_s``: period of the M³HL mix
    preview (None: none).
    """

    start: Path
    volumes: list[VolumeIn]
    options: FewSliceOptions
    class_names: tuple[str, ...]
    out_dir: Path
    token: object = None
    base: np.ndarray | None = None
    cpu_threads: int | None = None
    autosave: SessionSnapshot | None = None
    mix_preview_every_s: float | None = None


def fewslice_job(req: FewSliceRequest, control: TrainControl) -> Iterator[Any]:
    """Worker generator: autosave the labels (if asked), prepare the fine-tune
    (start model loaded, its segmentation of every volume), then yield the
    events of :func:`napari_m3hl.fewslice.loop.run` with a ``PreviewQuality`` after
    each ``Check``; the final checkpoint is copied into the session folder."""
    from napari_m3hl.fewslice import loop as fs
    from napari_m3hl.training.events import TrainFinished
    from napari_m3hl.fewslice.safeguard import check_finetune

    failed = autosave_labels(req.autosave)
    if failed is not None:
        yield failed
    finished = None
    with torch_threads(req.cpu_threads):
        ordered = [req.volumes[i] for i in job_order(req.volumes)]
        labeled = [(np.asarray(v.image, dtype=np.float32), v.painted) for v in ordered if v.painted is not None]
        unlabeled = [np.asarray(v.image, dtype=np.float32) for v in ordered if v.painted is None]
        job = fs.prepare_volumes(req.start, labeled, unlabeled, req.options, [v.name for v in ordered])
        n_painted = sum(int(v.painted_slices.size) for v in job.volumes)
        n_slices = sum(int(v.image.shape[0]) for v in job.volumes)
        yield DataReady(n_painted, n_slices - n_painted, job.image)
        yield StartSegmentation(job.base)
        yield preview_quality(0, job.base, job.painted, None, req.class_names)
        previous: np.ndarray | None = job.base
        for e in fs.run(job, out_dir=req.out_dir, control=control, mix_preview_every_s=req.mix_preview_every_s):
            if isinstance(e, FewSliceResult) and req.base is not None and req.base.shape == e.labels.shape:
                verdict = check_finetune(req.base, e.labels, job.painted, job.config.num_classes,
                                         tuple(job.config.class_names))
                first = dataclasses.replace(e.volumes[0], base=req.base, verdict=verdict)
                e = dataclasses.replace(e, base=req.base, verdict=verdict, volumes=[first] + e.volumes[1:])
            if isinstance(e, TrainFinished):
                finished = e
            yield e
            if isinstance(e, Check):
                yield preview_quality(e.iteration, e.labels, job.painted, previous, req.class_names)
                previous = e.labels
    failed = autosave_checkpoint(req.autosave, finished, req.out_dir)
    if failed is not None:
        yield failed
