"""The widget's few-slice fine-tune, as a worker job of plain data.

When **Start** is *Fine-tune from file* (the default: the shipped cardiac
model) and the image is one volume, **Train** runs the engine's few-slice
loop (:mod:`napari_m3hl.fewslice.loop`, the path of ``m3hl train --data IMG
--labels PAINTED``) with the same defaults (:class:`~napari_m3hl.fewslice.loop.FewSliceOptions`),
and ends with the safeguard's verdict (:mod:`napari_m3hl.fewslice.safeguard`).

:func:`fewslice_job` runs in a thread worker: it loads the start model,
segments the volume with it, fine-tunes on the painted slices, and yields
the start model's segmentation (:class:`StartSegmentation`, the first
preview), the trainer's events, each :class:`~napari_m3hl.fewslice.loop.Check` (the whole
volume's segmentation at that iteration) followed by its
:class:`napari_m3hl._napari.run.jobs.PreviewQuality`, and last the
:class:`~napari_m3hl.fewslice.loop.FewSliceResult`. No Qt and no napari layer here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from napari_m3hl.fewslice.loop import Check, FewSliceOptions, FewSliceResult
from napari_m3hl.training.trainer import TrainControl
from napari_m3hl._napari.run import jobs as _jobs
from napari_m3hl._napari.run.file_jobs import AutosaveFailed, SessionSnapshot
from napari_m3hl._napari.run.jobs import DataReady, preview_quality, torch_threads

@dataclass
class StartSegmentation:
    """Yielded by :func:`fewslice_job` before training: the start model's
    segmentation of the volume, (D, H, W) uint8 (the first preview)."""

    labels: np.ndarray


#: FewSliceOptions fields the widget's settings (Advanced form, ``config_overrides``) may set.
OPTION_FIELDS = frozenset(f.name for f in dataclasses.fields(FewSliceOptions))


def fewslice_options(settings: dict[str, Any], device: str, overrides: dict[str, Any]) -> FewSliceOptions:
    """The few-slice options of a run: the engine's defaults, then the Advanced
    form's ``iterations`` / ``batch_size`` / ``lr`` / ``ema_decay`` (``settings``),
    the ``device``, then ``overrides`` (keys that are not option fields, such as
    ``patch_size``, are skipped: the network keeps the start model's input)."""
    picked = {k: settings[k] for k in ("iterations", "batch_size", "lr", "ema_decay") if k in settings}
    picked["device"] = device
    picked.update({k: v for k, v in overrides.items() if k in OPTION_FIELDS})
    return dataclasses.replace(FewSliceOptions(), **picked)


@dataclass
class FewSliceRequest:
    """What a few-slice worker needs, as plain data (no layers).

    ``image``: (D, H, W) view of the image layer (converted in the worker);
    ``painted``: (D, H, W) copy of the user's labels when Train was pressed;
    ``start``: the model file to fine-tune; ``base``: the first start model's
    segmentation when this run continues an earlier fine-tune (Train on), so
    that the safeguard compares with it rather than with the model continued;
    ``token``: the layer state the previews belong to.
    """

    start: Path
    image: np.ndarray
    painted: np.ndarray
    options: FewSliceOptions
    class_names: tuple[str, ...]
    out_dir: Path
    token: object = None
    base: np.ndarray | None = None
    cpu_threads: int | None = None
    autosave: SessionSnapshot | None = None


def fewslice_job(req: FewSliceRequest, control: TrainControl) -> Iterator[Any]:
    """Worker generator: autosave the labels (if asked), prepare the fine-tune
    (start model loaded, its segmentation of the volume), then yield the
    events of :func:`napari_m3hl.fewslice.loop.run` with a ``PreviewQuality`` after
    each ``Check``; the final checkpoint is copied into the session folder."""
    from napari_m3hl.fewslice import loop as fs
    from napari_m3hl.training.events import TrainFinished
    from napari_m3hl.fewslice.safeguard import check_finetune

    if req.autosave is not None:
        try:
            _jobs.save_session_job(req.autosave)
        except OSError as exc:
            yield AutosaveFailed(str(req.autosave.folder), f"{exc.__class__.__name__}: {exc}")
    finished = None
    with torch_threads(req.cpu_threads):
        job = fs.prepare(req.start, np.asarray(req.image, dtype=np.float32), req.painted, req.options)
        n_painted = int(job.painted_slices.size)
        yield DataReady(n_painted, int(job.image.shape[0]) - n_painted, job.image)
        yield StartSegmentation(job.base)
        yield preview_quality(0, job.base, job.painted, None, req.class_names)
        previous: np.ndarray | None = job.base
        for e in fs.run(job, out_dir=req.out_dir, control=control):
            if isinstance(e, FewSliceResult) and req.base is not None and req.base.shape == e.labels.shape:
                verdict = check_finetune(req.base, e.labels, job.painted, job.config.num_classes,
                                         tuple(job.config.class_names))
                e = dataclasses.replace(e, base=req.base, verdict=verdict)
            if isinstance(e, TrainFinished):
                finished = e
            yield e
            if isinstance(e, Check):
                yield preview_quality(e.iteration, e.labels, job.painted, previous, req.class_names)
                previous = e.labels
    if req.autosave is not None and finished is not None and finished.checkpoint:
        from napari_m3hl.io.session import save_checkpoint_copy

        try:
            save_checkpoint_copy(req.autosave.folder, finished.checkpoint,
                                 {"iteration": finished.iteration, "run_dir": str(req.out_dir)})
        except OSError as exc:
            yield AutosaveFailed(str(req.autosave.folder), f"{exc.__class__.__name__}: {exc}")
