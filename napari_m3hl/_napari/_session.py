"""Backend glue: the engine's long jobs in napari thread workers.

Every heavy step (building the training data, training, prediction,
``torch.save`` copies, checkpoint loading, NIfTI export) runs in a worker
thread made by :func:`napari.qt.threading.create_worker`. Worker functions
touch no Qt object and no napari layer: they get plain numpy arrays (copies
taken in the GUI thread) and hand back events / results, which the widget
turns into layer updates in the GUI thread.

Errors travel through ``worker.errored``; :func:`describe_error` turns them
into one clear sentence for a napari notification (bad input, device out of
memory, divergence, anything else with the checkpoint that is left).
"""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..config import TrainConfig
from ..errors import M3HLInputError
from ..trainer import TrainControl

Handler = Callable[..., Any]


@dataclass
class TrainRequest:
    """Everything a training worker needs, as plain data (no layers).

    ``images`` / ``labels``: ``(D, H, W)`` frames of the labeled pair (a 4D
    layer gives one entry per time frame), copies taken when Train was
    pressed; ``extra``: frames of extra unlabeled image layers;
    ``preview_frame``: index into ``images`` of the frame previewed with
    pseudo-labels; ``token``: identifies the layer state the previews belong
    to (see :class:`napari_m3hl._napari._layers.LayerVersions`).
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
class SessionSnapshot:
    """A session folder's content, as plain data taken in the GUI thread.

    ``labels``: copy of the user's whole Labels layer; ``geometry``: its
    ``scale``/``translate``/``metadata`` (NIfTI affine and header);
    ``checkpoint``: a checkpoint file to copy in (None: keep the folder's).
    """

    folder: Path
    labels: np.ndarray
    geometry: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None


@dataclass
class AutosaveFailed:
    """Yielded by a training job whose autosave failed; training goes on."""

    folder: str
    error: str


@dataclass
class SessionOpened:
    """What :func:`open_session_job` hands back: the session and, when the
    session's image was not open, that image read from its source file."""

    session: Any  # napari_m3hl.session.Session
    image: tuple | None = None  # (data, kwargs, "image") from the NIfTI reader


@dataclass
class DataReady:
    """First item a training worker yields: the data were built.

    ``preview_volume`` is the normalised ``(D, H, W)`` preview frame (the
    intensities the network sees); ``n_labeled`` / ``n_unlabeled`` count slices.
    """

    n_labeled: int
    n_unlabeled: int
    preview_volume: np.ndarray


def gui_cpu_threads() -> int:
    """Torch CPU threads for jobs started from the GUI: all cores but one, so
    the event loop (and the OpenGL canvas, software-rendered on machines
    without a GPU) keeps a core. OpenMP threads that must share their cores
    with another busy thread slow down many times over, so this matters most
    on small machines."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, n - 1)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``torch.set_num_threads(n)`` (None: unchanged), restored afterwards."""
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
    from ..data import PartlyLabeledVolume

    names = req.names or [f"image frame {i}" for i in range(len(req.images))]
    plv = PartlyLabeledVolume.from_volumes(
        req.images, req.labels, req.extra, num_classes=req.config.num_classes, normalize=True, names=names
    )
    return plv.train_data(req.config.class_names), plv.volumes[req.preview_frame]


def train_job(req: TrainRequest, control: TrainControl) -> Iterator[Any]:
    """Worker generator: autosave the session's labels (if asked), build the
    data, then yield the trainer's events; the final checkpoint is copied
    into the session folder at the end."""
    from .. import events as ev
    from ..trainer import train

    if req.autosave is not None:
        try:
            save_session_job(req.autosave)
        except OSError as exc:  # the labels are still in napari: warn, train anyway
            yield AutosaveFailed(str(req.autosave.folder), f"{exc.__class__.__name__}: {exc}")
    data, preview = build_train_data(req)
    yield DataReady(len(data.labeled), len(data.unlabeled), preview)
    finished = None
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
    if req.autosave is not None and finished is not None and finished.checkpoint:
        from ..session import save_checkpoint_copy

        try:
            save_checkpoint_copy(req.autosave.folder, finished.checkpoint,
                                 {"iteration": finished.iteration, "run_dir": str(req.out_dir)})
        except OSError as exc:  # the run's own checkpoint is still there
            yield AutosaveFailed(str(req.autosave.folder), f"{exc.__class__.__name__}: {exc}")


def predict_job(
    checkpoint: str | Path,
    volumes: Sequence[np.ndarray],
    which: str = "student",
    device: str = "auto",
    batch_size: int = 8,
    cpu_threads: int | None = None,
) -> Iterator[tuple[int, int]]:
    """Worker generator: segment each ``(D, H, W)`` frame; yields (done, total),
    returns uint8 labels stacked like the input (3D for one frame, else 4D)."""
    from ..checkpoint import image_interp, load_model
    from ..inference import predict_volume_2d
    from ..io import normalize_intensity
    from ..runtime import resolve_device, tune_malloc

    tune_malloc()
    dev = resolve_device(device)
    model, ckpt = load_model(checkpoint, which, dev)
    patch = tuple(ckpt["patch_size"])
    if len(patch) != 2:
        raise M3HLInputError(f"checkpoint {checkpoint} holds a {len(patch)}D model; the widget predicts with 2D models")
    out = []
    for i, vol in enumerate(volumes):
        yield (i, len(volumes))
        with torch_threads(cpu_threads):
            out.append(predict_volume_2d(model, normalize_intensity(vol), patch=patch, device=dev,
                                         batch_size=batch_size, resize_input=image_interp(ckpt)))
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
    frame and the per-slice uncertainty (:class:`napari_m3hl.suggest.SliceAnalysis`)
    of the network ``which`` (the one that segments).

    A checkpoint without a teacher (a shipped model file) scores the student,
    by entropy where ``method`` asks for disagreement; ``analysis.method`` and
    ``analysis.network`` say what was scored.
    """
    from ..checkpoint import image_interp, load_checkpoint, model_from_checkpoint
    from ..io import normalize_intensity
    from ..runtime import resolve_device, tune_malloc
    from ..suggest import analyse_volume

    tune_malloc()
    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint)
    patch = tuple(ckpt["patch_size"])
    if len(patch) != 2:
        raise M3HLInputError(f"checkpoint {checkpoint} holds a {len(patch)}D model; the widget suggests with 2D models")
    student = model_from_checkpoint(ckpt, "student", dev)
    teacher = model_from_checkpoint(ckpt, "teacher", dev) if "teacher" in ckpt else None
    if teacher is None:
        method = "entropy" if method == "disagreement" else method
        which = "student"
    with torch_threads(cpu_threads):
        return analyse_volume(student, normalize_intensity(volume), teacher, method, patch,
                              resize_input=image_interp(ckpt), device=dev, network=which)


def save_session_job(snap: SessionSnapshot) -> str:
    """Worker function: write the session folder (labels, settings, facts, checkpoint)."""
    from ..session import save_session
    from ._writer import geometry_from_meta

    affine, header, _ = geometry_from_meta(snap.geometry, np.ndim(snap.labels))
    folder = save_session(snap.folder, snap.labels, affine, header, checkpoint=snap.checkpoint,
                          settings=snap.settings, meta=snap.meta)
    return str(folder)


def open_session_job(folder: str | Path, open_sources: Sequence[str] = ()) -> SessionOpened:
    """Worker function: read a session folder; read its image file too when
    it is not among ``open_sources`` (source paths of the open layers) and exists."""
    from ..session import load_session

    sess = load_session(folder)
    src = sess.meta.get("image_source")
    image = None
    if src and str(src) not in set(map(str, open_sources)) and Path(src).is_file():
        from ._reader import read_nifti

        data, kwargs, kind = read_nifti(str(src))[0]
        if kind == "image":
            kwargs["name"] = sess.meta.get("image_name", kwargs.get("name"))
            image = (data, kwargs, kind)
    return SessionOpened(sess, image)


def load_checkpoint_job(path: str | Path, arch: str, num_classes: int, in_channels: int = 1) -> dict[str, Any]:
    """Worker function: read a checkpoint and check it fits the data; returns a summary."""
    from ..checkpoint import check_compatible, load_checkpoint

    ckpt = load_checkpoint(path)
    check_compatible(ckpt, arch, num_classes, in_channels, source=str(path))
    return {
        "path": str(path),
        "iteration": int(ckpt.get("iteration", 0)),
        "class_names": list(ckpt.get("class_names", [])),
        "patch_size": list(ckpt.get("patch_size", [])),
        "resumable": "optimizer" in ckpt,
        "config": ckpt.get("config", {}),
    }


def copy_file_job(src: str | Path, dst: str | Path) -> str:
    """Worker function: copy a checkpoint file (atomic rename at the end)."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise M3HLInputError(f"no checkpoint to save yet ({src} does not exist); train first")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    shutil.copy2(src, tmp)
    tmp.replace(dst)
    return str(dst)


def export_job(path: str | Path, labels: np.ndarray, meta: dict[str, Any]) -> str:
    """Worker function: write labels as NIfTI with the geometry in ``meta``."""
    from ..io import save_nifti_labels
    from ._writer import geometry_from_meta, nifti_path

    affine, header, _ = geometry_from_meta(meta, np.ndim(labels))
    return str(save_nifti_labels(labels, nifti_path(path), affine, header))


# --------------------------------------------------------------------- errors


class JobError(Exception):
    """A ``RuntimeError`` raised in a generator job, re-raised as a plain
    ``Exception``: superqt's ``GeneratorWorker`` treats a ``RuntimeError``
    from the generator as "worker deleted" and drops it (no ``errored``, no
    ``finished``), and torch reports most failures, device out-of-memory
    included, as ``RuntimeError``. ``original`` is the exception raised."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(f"{original.__class__.__name__}: {original}")
        self.original = original


def guarded(func: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    """Wrap a generator job so that its ``RuntimeError`` reaches ``worker.errored``."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
        try:
            return (yield from func(*args, **kwargs))
        except RuntimeError as exc:
            raise JobError(exc) from exc

    return wrapper


def unwrap_error(exc: BaseException) -> BaseException:
    """The exception a job raised (see :class:`JobError`)."""
    return exc.original if isinstance(exc, JobError) else exc


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a device (CUDA/MPS) or host allocation failure."""
    exc = unwrap_error(exc)
    oom = getattr(__import__("torch"), "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def describe_error(exc: BaseException, what: str = "Training", batch_size: int | None = None,
                   checkpoint: str | None = None) -> str:
    """One clear sentence (or two) for a failure in a worker."""
    exc = unwrap_error(exc)
    if is_out_of_memory(exc):
        if batch_size and batch_size > 4:
            hint = f"Lower the batch size (now {batch_size}; try {max(4, batch_size // 2 // 4 * 4)}) or the patch size"
        elif batch_size:
            hint = f"The batch size is already the smallest (now {batch_size}); lower the patch size"
        else:
            hint = "Lower the batch size or the patch size"
        return (
            f"{what} ran out of device memory. {hint} in Advanced, or choose device 'cpu'. "
            "Your layers are unchanged."
        )
    if isinstance(exc, M3HLInputError):
        return str(exc)
    if isinstance(exc, FloatingPointError):
        return str(exc)
    left = f" The last checkpoint is {checkpoint}." if checkpoint else ""
    return f"{what} failed: {exc.__class__.__name__}: {exc}. Your layers are unchanged.{left}"


def _notify_error(exc: BaseException) -> None:
    """Default ``errored`` handler: a clear napari notification."""
    from napari.utils import notifications

    notifications.show_error(describe_error(exc, "A background job"))


# --------------------------------------------------------------------- session


def default_run_folder() -> Path:
    """A per-session folder in the temporary directory (created by the first run)."""
    import secrets
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.gettempdir()) / f"m3hl-runs-{stamp}-{secrets.token_hex(3)}"


class TrainingSession:
    """The widget's backend: one training run at a time plus helper jobs.

    Holds the run folder (a temporary folder per session, made by the first
    run, or one the user sets), the :class:`TrainControl` of the current run, the latest
    checkpoint and the running workers. Methods start workers and connect the
    given GUI-thread callbacks; they never block.
    """

    def __init__(self, out_dir: str | Path | None = None) -> None:
        self.out_dir = Path(out_dir) if out_dir else default_run_folder()
        self.control: TrainControl | None = None
        self.train_worker = None
        self.checkpoint: str | None = None  # latest usable checkpoint or model file
        self._workers: set = set()

    # ---------------------------------------------------------------- workers
    def _start(self, func: Callable, *args: Any, connect: dict[str, Handler], **kwargs: Any):
        """Start ``func`` in a napari thread worker with ``connect`` handlers.

        The superqt worker classes are used so that errors reach only our
        ``errored`` handler (napari's classes would add a traceback
        notification of their own).
        """
        import inspect

        from napari.qt.threading import create_worker
        from superqt.utils import FunctionWorker, GeneratorWorker

        if inspect.isgeneratorfunction(func):
            func, cls = guarded(func), GeneratorWorker
        else:
            cls = FunctionWorker
        connect = dict(connect)
        connect.setdefault("errored", _notify_error)
        worker = create_worker(func, *args, _start_thread=False, _connect=connect, _worker_class=cls, **kwargs)
        self._workers.add(worker)
        worker.finished.connect(lambda w=worker: self._workers.discard(w))
        worker.start()
        return worker

    @property
    def training(self) -> bool:
        return self.train_worker is not None

    @property
    def busy(self) -> bool:
        """True while any job of this session runs."""
        return bool(self._workers)

    def start_training(self, req: TrainRequest, connect: dict[str, Handler]):
        if self.training:
            raise M3HLInputError("a training run is already going; stop it first")
        req.out_dir = req.out_dir or self.out_dir
        if req.cpu_threads is None:
            req.cpu_threads = gui_cpu_threads()
        self.control = TrainControl()
        worker = self._start(train_job, req, self.control, connect=connect)
        self.train_worker = worker

        def done() -> None:
            if self.train_worker is worker:
                self.train_worker = None

        worker.finished.connect(done)
        return worker

    def pause(self) -> None:
        if self.control is not None:
            self.control.pause()

    def resume(self) -> None:
        if self.control is not None:
            self.control.resume()

    def stop(self) -> None:
        """Ask the run to stop; it saves ``last.pt`` and reports ``TrainFinished``."""
        if self.control is not None:
            self.control.stop()

    @property
    def paused(self) -> bool:
        return self.control is not None and self.control.paused and self.training

    def predict(self, volumes: Sequence[np.ndarray], connect: dict[str, Handler], which: str = "student",
                device: str = "auto", batch_size: int = 8, checkpoint: str | None = None):
        ckpt = checkpoint or self.checkpoint
        if not ckpt:
            raise M3HLInputError("no model yet: train first, or load a checkpoint / model file")
        return self._start(predict_job, ckpt, list(volumes), which, device, batch_size, gui_cpu_threads(),
                           connect=connect)

    def analyse(self, volume: np.ndarray, method: str, connect: dict[str, Handler], device: str = "auto",
                which: str = "student"):
        if not self.checkpoint:
            raise M3HLInputError("no model yet: train first, or load a checkpoint / model file")
        return self._start(analyse_job, self.checkpoint, volume, method, device, gui_cpu_threads(), which,
                           connect=connect)

    def save_session(self, snap: SessionSnapshot, connect: dict[str, Handler]):
        return self._start(save_session_job, snap, connect=connect)

    def open_session(self, folder: str | Path, open_sources: Sequence[str], connect: dict[str, Handler]):
        return self._start(open_session_job, str(folder), list(open_sources), connect=connect)

    def load_checkpoint(self, path: str | Path, arch: str, num_classes: int, connect: dict[str, Handler]):
        return self._start(load_checkpoint_job, str(path), arch, num_classes, connect=connect)

    def save_checkpoint(self, dst: str | Path, connect: dict[str, Handler]):
        if not self.checkpoint:
            raise M3HLInputError("no checkpoint to save yet: train first (or stop a run)")
        return self._start(copy_file_job, self.checkpoint, dst, connect=connect)

    def export(self, path: str | Path, labels: np.ndarray, meta: dict[str, Any], connect: dict[str, Handler]):
        return self._start(export_job, str(path), labels, meta, connect=connect)

    def shutdown(self, wait_ms: int = 0) -> None:
        """Stop the run (it still saves its checkpoint) and ask helpers to quit."""
        self.stop()
        for w in list(self._workers):
            if w is not self.train_worker:
                w.quit()
        if wait_ms:
            from superqt.utils._qthreading import WorkerBase

            WorkerBase.await_workers(msecs=wait_ms)
