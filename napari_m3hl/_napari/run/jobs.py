"""Plain worker jobs: the engine's long steps as functions of plain data.

Every heavy step of the widget (building the training data, training,
prediction and slice analysis, ``torch.save`` copies, checkpoint loading,
NIfTI export, session folders) is a function here. A job touches no Qt
object and no napari layer: it gets numpy arrays (copies taken in the GUI
thread) and returns, or yields, plain results and events. The widget runs
them in thread workers through :class:`napari_m3hl._napari.run.controller.RunController`
(:mod:`napari_m3hl._napari.run.workers` starts the workers and words their errors).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from napari_m3hl.config import TrainConfig
from napari_m3hl.errors import M3HLInputError
from napari_m3hl.training.trainer import TrainControl
from napari_m3hl._napari.run.file_jobs import (
    SessionSnapshot, autosave_checkpoint, autosave_labels,
)

@dataclass
class TrainRequest:
    """Everything a training worker needs, as plain data (no layers).

    ``images`` / ``labels``: ``(D, H, W)`` frames of the labeled pair (a 4D
    layer gives one entry per time frame): the image frames are views of
    the layer's data (converted to float32 in the worker), the labels copies
    taken when Train was pressed; ``extra``: frames of extra unlabeled image
    layers (views);
    ``preview_frame``: index into ``images`` of the frame previewed with
    pseudo-labels; ``token``: identifies the layer state the previews belong
    to (see :class:`napari_m3hl._napari.layers.control.LayerVersions`).
    """

    config: TrainConfig
    images: list[np.ndarray]
    labels: list[np.ndarray]
    extra: list[np.ndarray] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    preview_frame: int = 0
    out_dir: Path | None = None
    init_from: Path | None = None
    resume_from: Path | None = None
    token: object = None
    preview_every_s: float | None = 5.0
    mix_preview_every_s: float | None = 5.0
    cpu_threads: int | None = None
    autosave: "SessionSnapshot | None" = None


@dataclass
class DataReady:
    """First item a training worker yields: the data were built.

    ``preview_volume`` is the normalised ``(D, H, W)`` preview frame (the
    intensities the network sees); ``n_labeled`` / ``n_unlabeled`` count slices.
    """

    n_labeled: int
    n_unlabeled: int
    preview_volume: np.ndarray


@dataclass
class PreviewQuality:
    """Yielded by a training job after each pseudo-label preview: how good
    the network is now, as a clinician judges a run.

    ``dice``: mean Dice (0..1) over the foreground classes of the preview
    against the painted slices of the preview frame (they have labels), None
    when no class is painted; ``per_class``: Dice per class name; ``relabelled``:
    share (0..1) of the pixels of the unpainted slices that are foreground in
    this or the previous preview and whose label changed between the two
    (None for the first preview): near 0 once the segmentation has settled.
    """

    iteration: int
    dice: float | None
    per_class: dict[str, float]
    relabelled: float | None


def preview_quality(iteration: int, pred: np.ndarray, labels: np.ndarray, previous: np.ndarray | None,
                    class_names: Sequence[str]) -> PreviewQuality:
    """:class:`PreviewQuality` of the ``(D, H, W)`` preview ``pred`` against the
    painted slices of ``labels`` (same shape) and the ``previous`` preview."""
    from napari_m3hl.metrics.quality import painted_dice, relabelled_share

    painted = labels.reshape(labels.shape[0], -1).any(axis=1)
    dice, per_class = painted_dice(pred, labels, class_names)
    relabelled = None
    if previous is not None and previous.shape == pred.shape and (~painted).any():
        relabelled = relabelled_share(pred[~painted], previous[~painted])
    return PreviewQuality(iteration, dice, per_class, relabelled)


def gui_cpu_threads() -> int:
    """Torch CPU threads for jobs started from the GUI: all cores but one
    (``runtime.thread_count("gui")``), so the event loop and the canvas keep a
    core; OpenMP threads that share their cores with another busy thread slow
    down many times over, so this matters most on small machines."""
    from napari_m3hl.runtime import thread_count

    return thread_count("gui")


def fewslice_cpu_threads() -> int:
    """Torch CPU threads for the widget's few-slice Train: every core
    (``runtime.thread_count("gui_fewslice")``, where the measurement is cited):
    a short fine-tune whose GUI side draws little, so the GUI path is as fast
    as the engine's own."""
    from napari_m3hl.runtime import thread_count

    return thread_count("gui_fewslice")


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``torch.set_num_threads(n)`` (None: unchanged), restored afterwards.

    A job's torch work, loading a model included, runs inside it: a pool
    thread starts with the process's count (every core by default), and the
    first parallel op a thread runs with more than one makes it an
    OpenMP team that lives as long as the thread. While more such threads
    exist than cores, libgomp cuts its spin-wait short in every team (it
    "throttles"), and the training threads then sleep and wake between
    torch's short parallel regions: a second few-slice Train on 2 cores ran
    15 % slower with the cores 20 % idle (docs/benchmarks.md).
    """
    import torch

    if not n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def build_train_data(req: TrainRequest):
    """(TrainData, normalised preview volume) for a request (runs in the worker)."""
    from napari_m3hl.data.volumes import PartlyLabeledVolume

    names = req.names or [f"image frame {i}" for i in range(len(req.images))]
    as_float = [np.asarray(f, dtype=np.float32) for f in req.images]  # here, not in the GUI thread
    extra = [np.asarray(f, dtype=np.float32) for f in req.extra]
    plv = PartlyLabeledVolume.from_volumes(
        as_float, req.labels, extra, num_classes=req.config.num_classes, normalize=True, names=names
    )
    return plv.train_data(req.config.class_names), plv.volumes[req.preview_frame]


def train_job(req: TrainRequest, control: TrainControl) -> Iterator[Any]:
    """Worker generator: autosave the session's labels (if asked), build the
    data, then yield the trainer's events, each pseudo-label preview followed
    by its :class:`PreviewQuality`; the final checkpoint is copied into the
    session folder at the end."""
    from napari_m3hl.training import events as ev
    from napari_m3hl.training.trainer import train

    failed = autosave_labels(req.autosave)
    if failed is not None:
        yield failed
    data, preview = build_train_data(req)
    yield DataReady(len(data.labeled), len(data.unlabeled), preview)
    finished = None
    previous: np.ndarray | None = None  # the last pseudo-label preview
    with torch_threads(req.cpu_threads):
        for e in train(
            req.config,
            data,
            req.out_dir,
            init_from=req.init_from,
            resume_from=req.resume_from,
            control=control,
            preview_volume=preview if req.config.ndim == 2 else None,
            preview_token=req.token,
            preview_every_s=req.preview_every_s,
            mix_preview_every_s=req.mix_preview_every_s,
        ):
            if isinstance(e, ev.TrainFinished):
                finished = e
            yield e
            if isinstance(e, ev.VolumePreview) and e.labels.shape == req.labels[req.preview_frame].shape:
                yield preview_quality(e.iteration, e.labels, req.labels[req.preview_frame], previous,
                                      req.config.class_names)
                previous = e.labels
    failed = autosave_checkpoint(req.autosave, finished, req.out_dir)
    if failed is not None:
        yield failed


@dataclass
class Networks:
    """A checkpoint's networks, loaded once for a job: the ``student`` and, when
    the file has one (and it was asked for), the ``teacher``, each a
    :class:`~napari_m3hl.inference.predictor.Predictor` (2D, eval mode, the checkpoint's
    input size and resizing)."""

    student: Any
    teacher: Any

    def net(self, which: str) -> Any:
        """The predictor ``which`` (the student when the file has no teacher)."""
        return self.teacher if which == "teacher" and self.teacher is not None else self.student


def load_networks(checkpoint: str | Path, device: str = "auto", with_teacher: bool = True,
                  clean: bool = True) -> Networks:
    """Read ``checkpoint`` once and build its 2D student (and teacher) predictors
    (``clean``: their segmentations keep each class's largest 3D component)."""
    from napari_m3hl.io.checkpoint import load_checkpoint
    from napari_m3hl.inference.predictor import Predictor
    from napari_m3hl.runtime import resolve_device, tune_malloc

    tune_malloc()
    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint)
    patch = tuple(ckpt["patch_size"])
    if len(patch) != 2:
        raise M3HLInputError(f"checkpoint {checkpoint} holds a {len(patch)}D model; the widget works with 2D models")
    student = Predictor.from_checkpoint(ckpt, "student", dev, clean=clean)
    teacher = Predictor.from_checkpoint(ckpt, "teacher", dev, clean=clean) if with_teacher and "teacher" in ckpt \
        else None
    return Networks(student, teacher)


def _segment(nets: Networks, volume: np.ndarray, which: str, batch_size: int) -> np.ndarray:
    from dataclasses import replace

    net = nets.net(which)
    return replace(net, batch_size=batch_size).predict(net.scale(volume))


def _analyse(nets: Networks, volume: np.ndarray, method: str, which: str) -> Any:
    from napari_m3hl.fewslice.suggest import analyse_volume

    if nets.teacher is None:  # a model file: score the student, by entropy where disagreement was asked
        method = "entropy" if method == "disagreement" else method
        which = "student"
    return analyse_volume(nets.student, nets.student.scale(volume), nets.teacher, method, network=which)


def predict_job(
    checkpoint: str | Path,
    volumes: Sequence[np.ndarray],
    which: str = "student",
    device: str = "auto",
    batch_size: int = 8,
    cpu_threads: int | None = None,
    clean: bool = True,
) -> Iterator[tuple[int, int]]:
    """Worker generator: segment each ``(D, H, W)`` frame (``clean``: see
    :func:`load_networks`); yields (done, total), returns uint8 labels stacked
    like the input (3D for one frame, else 4D)."""
    with torch_threads(cpu_threads):  # loading too: see torch_threads
        nets = load_networks(checkpoint, device, with_teacher=which == "teacher", clean=clean)
    out = []
    for i, vol in enumerate(volumes):
        yield (i, len(volumes))
        with torch_threads(cpu_threads):
            out.append(_segment(nets, vol, which, batch_size))
    yield (len(volumes), len(volumes))
    return out[0] if len(out) == 1 else np.stack(out)


def analyse_job(
    checkpoint: str | Path,
    volume: np.ndarray,
    method: str = "entropy",
    device: str = "auto",
    cpu_threads: int | None = None,
    which: str = "student",
) -> Any:
    """Worker function: student (and teacher) predictions of one ``(D, H, W)``
    frame and the per-slice uncertainty (:class:`napari_m3hl.fewslice.suggest.SliceAnalysis`)
    of the network ``which`` (the one that segments).

    A checkpoint without a teacher (a shipped model file) scores the student,
    by entropy where ``method`` asks for disagreement; ``analysis.method`` and
    ``analysis.network`` say what was scored.
    """
    with torch_threads(cpu_threads):  # loading too: see torch_threads
        return _analyse(load_networks(checkpoint, device), volume, method, which)


@dataclass
class RunAnalysis:
    """What :func:`run_analysis_job` hands back at the end of a run.

    ``segmentation``: uint8 labels of every frame by the network ``which``,
    stacked like the image (3D, or 4D for a cine); ``analysis``: the
    :class:`napari_m3hl.fewslice.suggest.SliceAnalysis` of frame ``frame`` (None when
    not asked for).
    """

    segmentation: np.ndarray
    analysis: Any = None
    frame: int = 0


def run_analysis_job(
    checkpoint: str | Path,
    volumes: Sequence[np.ndarray],
    frame: int = 0,
    method: str | None = "entropy",
    which: str = "student",
    device: str = "auto",
    batch_size: int = 8,
    cpu_threads: int | None = None,
    clean: bool = True,
) -> RunAnalysis:
    """Worker function for the end of a run: load the checkpoint once, segment
    every ``(D, H, W)`` frame with ``which`` (``clean``: see :func:`load_networks`)
    and, when ``method`` is given, score the slices of frame ``frame`` (whose
    segmentation then comes from the same forward passes)."""
    out: list[np.ndarray] = []
    analysis = None
    with torch_threads(cpu_threads):  # loading too: see torch_threads
        nets = load_networks(checkpoint, device, with_teacher=method is not None or which == "teacher", clean=clean)
        for i, vol in enumerate(volumes):
            if method is not None and i == frame:
                analysis = _analyse(nets, vol, method, which)
                seg = analysis.teacher if which == "teacher" and analysis.teacher is not None else analysis.student
                out.append(seg.astype(np.uint8))
            else:
                out.append(_segment(nets, vol, which, batch_size))
    return RunAnalysis(out[0] if len(out) == 1 else np.stack(out), analysis, frame)


def warm_up_job(arch: str = "unet2d", num_classes: int = 4, cpu_threads: int | None = None) -> float:
    """Worker function run when the widget opens: the engine's first-use
    costs (imports of the data, trainer, inference and suggestion modules,
    building a network, torch's first forward and backward pass, its first
    optimizer, whose construction imports ``torch._dynamo``: 1.3 s on 2 cores) are paid
    here instead of after the first click on Train. Returns seconds taken.

    Last, the objects that exist by then (napari's, Qt's, torch's: ~400 000)
    are moved out of the cyclic garbage collector's reach (``gc.freeze``):
    a full collection over them takes ~200 ms and holds the GIL, so it stalls
    the GUI thread whichever thread triggers it, and the first run's
    allocations trigger several (see docs/benchmarks.md). Frozen objects are
    still freed by reference counting; only cycles among them stay."""
    import gc
    import time

    t0 = time.perf_counter()
    import torch

    from napari_m3hl import data  # noqa: F401 - imported for their first-use cost
    from napari_m3hl.fewslice import loop as fewslice  # noqa: F401 - imported for their first-use cost
    from napari_m3hl.inference import slices2d as inference  # noqa: F401 - imported for their first-use cost
    from napari_m3hl.fewslice import suggest  # noqa: F401 - imported for their first-use cost
    from napari_m3hl.training import trainer  # noqa: F401 - imported for their first-use cost
    from napari_m3hl.method.networks import build_network

    with torch_threads(cpu_threads):
        net = build_network(arch, 1, num_classes)
        out = net(torch.zeros(2, 1, 64, 64))
        out.logits.float().mean().backward()
        torch.optim.SGD(net.parameters(), lr=0.01)
    del net, out
    if FREEZE_GC:
        gc.freeze()
    return time.perf_counter() - t0


#: Whether :func:`warm_up_job` freezes the garbage collector's long-lived objects.
FREEZE_GC = True
