"""The object that owns the widget's training run and its helper jobs.

:class:`RunController` holds the run folder (a temporary folder per napari
session unless the user sets one), the :class:`~napari_m3hl.training.trainer.TrainControl`
of the current run, the latest checkpoint and the running workers. Its
methods start the jobs of :mod:`napari_m3hl._napari.run.jobs` in thread workers (:mod:`napari_m3hl._napari.run.workers`)
with GUI-thread callbacks; they never block. ("Session" in this package
means only the user's session folder, :mod:`napari_m3hl.io.session`.)
"""
from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from napari_m3hl.errors import M3HLInputError
from napari_m3hl.training.trainer import TrainControl
from napari_m3hl._napari.run import jobs as _jobs
from napari_m3hl._napari.run import file_jobs
from napari_m3hl._napari.run.workers import Handler, await_workers, job_pool, start_worker

if TYPE_CHECKING:  # pragma: no cover
    from napari_m3hl._napari.run.fewslice import FewSliceRequest


def default_run_folder() -> Path:
    """A per-session folder in the temporary directory (created by the first run)."""
    import secrets
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.gettempdir()) / f"m3hl-runs-{stamp}-{secrets.token_hex(3)}"


class RunController:
    """One training run at a time plus helper jobs, each in a thread worker."""

    def __init__(self, out_dir: str | Path | None = None) -> None:
        self.out_dir = Path(out_dir) if out_dir else default_run_folder()
        self.control: TrainControl | None = None
        self.train_worker = None
        self.checkpoint: str | None = None  # latest usable checkpoint or model file
        self._workers: dict = {}  # running worker → its job's name
        self._later: dict[int, str] = {}  # GUI steps queued by :meth:`later` → their names
        self.closed = False  # the panel was closed (:meth:`close`)
        self.train_ended: threading.Event | None = None  # set when the latest training worker finished

    # ---------------------------------------------------------------- workers
    def _start(self, func: Callable, *args: Any, connect: dict[str, Handler], train: bool = False, **kwargs: Any):
        """Start job ``func`` in a worker; known as running (and as the training
        run when ``train``) before it starts, until it finished."""
        from qtpy.QtCore import Qt

        connect = {name: self._while_open(handler) for name, handler in connect.items()}
        worker = start_worker(func, *args, connect=connect, on_finished=[self._done], start=False, **kwargs)
        self._workers[worker] = func.__name__
        if train:
            self.train_worker = worker
            self.train_ended = threading.Event()  # set in the worker's thread: a close waits on it, not on the GUI
            worker.finished.connect(self.train_ended.set, Qt.DirectConnection)
        job_pool().start(worker)
        return worker

    def _while_open(self, handler: Handler) -> Handler:
        """``handler``, skipped once the panel closed (:meth:`close`): its
        controls are gone, and a job still running would draw into them."""
        def call(*args: Any) -> Any:
            return None if self.closed else handler(*args)

        return call

    def close(self, wait_ms: int = 0) -> bool:
        """The panel is gone: the running jobs' results are not drawn any more,
        the run is told to stop (it saves its checkpoint, as Stop does), helper
        jobs are asked to quit, and the GUI waits up to ``wait_ms`` for the
        training worker to finish (helpers are not waited for: their results
        are dropped). True when no training worker is left running. A second
        call does nothing."""
        if self.closed:
            return True
        self.closed = True
        self.shutdown()
        ended = self.train_ended
        if ended is None or ended.is_set():
            return True
        return ended.wait(wait_ms / 1000) if wait_ms else False

    def _done(self, worker: Any) -> None:
        self._workers.pop(worker, None)
        if self.train_worker is worker:
            self.train_worker = None

    @property
    def training(self) -> bool:
        return self.train_worker is not None

    @property
    def busy(self) -> bool:
        """True while any job runs or a GUI step of one is queued (:meth:`later`)."""
        return bool(self._workers) or bool(self._later)

    def running_jobs(self) -> list[str]:
        """Names of the jobs running now and of the queued GUI steps."""
        return sorted([*self._workers.values(), *self._later.values()])

    def later(self, name: str, *steps: Callable[[], None]) -> None:
        """Run ``steps`` in later turns of the GUI event loop, one per turn: a
        job's events arrive in batches, and a costly step (adding a layer)
        among them would lengthen that turn's stall. Counts as running until
        the last step ran (a step that raises ends the chain)."""
        from qtpy.QtCore import QTimer

        key = object()
        self._later[id(key)] = name
        pending = list(steps)

        def run() -> None:
            if self.closed:
                pending.clear()
            try:
                if pending:
                    pending.pop(0)()
            except BaseException:
                pending.clear()
                raise
            finally:
                if pending:
                    QTimer.singleShot(0, run)
                else:
                    self._later.pop(id(key), None)

        QTimer.singleShot(0, run)

    def start_training(self, req: _jobs.TrainRequest, connect: dict[str, Handler]):
        if self.training:
            raise M3HLInputError("a training run is already going; stop it first")
        req.out_dir = req.out_dir or self.out_dir
        if req.cpu_threads is None:
            req.cpu_threads = _jobs.gui_cpu_threads()
        self.control = TrainControl()
        return self._start(_jobs.train_job, req, self.control, connect=connect, train=True)

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

    @property
    def stopping(self) -> bool:
        return self.control is not None and self.control.stop_requested

    def _need_model(self) -> str:
        if not self.checkpoint:
            raise M3HLInputError("no model yet: train first, or load a checkpoint / model file")
        return self.checkpoint

    def predict(self, volumes: Sequence[np.ndarray], connect: dict[str, Handler], which: str = "student",
                device: str = "auto", batch_size: int = 8, clean: bool = True):
        return self._start(_jobs.predict_job, self._need_model(), list(volumes), which, device, batch_size,
                           _jobs.gui_cpu_threads(), clean, connect=connect)

    def analyse(self, volume: np.ndarray, method: str, connect: dict[str, Handler], device: str = "auto",
                which: str = "student"):
        return self._start(_jobs.analyse_job, self._need_model(), volume, method, device, _jobs.gui_cpu_threads(),
                           which, connect=connect)

    def analyse_run(self, volumes: Sequence[np.ndarray], frame: int, method: str | None, which: str,
                    connect: dict[str, Handler], device: str = "auto", clean: bool = True):
        """The end-of-run job: segment every frame and score frame ``frame`` from one checkpoint load."""
        return self._start(_jobs.run_analysis_job, self._need_model(), list(volumes), frame, method, which, device,
                           8, _jobs.gui_cpu_threads(), clean, connect=connect)

    def measure(self, labels: np.ndarray, spacing: Sequence[float] | None, source: str,
                connect: dict[str, Handler]):
        """Clinical measures of a segmentation (:mod:`napari_m3hl._napari.run.measure`)."""
        from napari_m3hl._napari.run.measure import measure_job

        return self._start(measure_job, labels, spacing, source, connect=connect)

    def save_measurements(self, csv_path: str | Path, result: Any, labels: np.ndarray | None,
                          painted: np.ndarray | None, spacing: Sequence[float] | None, source: str,
                          connect: dict[str, Handler]):
        """Write measurements as CSV + JSON (re-measuring ``labels`` with ``painted`` over them when given)."""
        from napari_m3hl._napari.run.measure import save_measurements_job

        return self._start(save_measurements_job, str(csv_path), result, labels, painted, spacing, source,
                           connect=connect)

    def warm_up(self, arch: str = "unet2d", num_classes: int = 4):
        """Pay the engine's first-use costs in a worker now (see :func:`napari_m3hl._napari.run.jobs.warm_up_job`)."""
        return self._start(_jobs.warm_up_job, arch, num_classes, _jobs.gui_cpu_threads(), connect={})

    def save_session(self, snap: _jobs.SessionSnapshot, connect: dict[str, Handler]):
        return self._start(file_jobs.save_session_job, snap, connect=connect)

    def open_session(self, folder: str | Path, open_sources: Sequence[str], connect: dict[str, Handler]):
        return self._start(file_jobs.open_session_job, str(folder), list(open_sources), connect=connect)

    def load_checkpoint(self, path: str | Path, arch: str, num_classes: int, connect: dict[str, Handler]):
        return self._start(file_jobs.load_checkpoint_job, str(path), arch, num_classes, connect=connect)

    def save_checkpoint(self, dst: str | Path, connect: dict[str, Handler]):
        if not self.checkpoint:
            raise M3HLInputError("no checkpoint to save yet: train first (or stop a run)")
        return self._start(file_jobs.copy_file_job, self.checkpoint, dst, connect=connect)

    def export(self, path: str | Path, labels: np.ndarray, meta: dict[str, Any], connect: dict[str, Handler],
               painted: np.ndarray | None = None):
        """Write ``labels`` (the user's ``painted`` slices win where given) as NIfTI."""
        return self._start(file_jobs.export_job, str(path), labels, meta, painted, connect=connect)

    def start_fewslice(self, req: "FewSliceRequest", connect: dict[str, Handler]):
        """Start the few-slice fine-tune of :mod:`napari_m3hl._napari.run.fewslice` as the training run."""
        from napari_m3hl._napari.run.fewslice import fewslice_job

        if self.training:
            raise M3HLInputError("a training run is already going; stop it first")
        if req.cpu_threads is None:
            req.cpu_threads = _jobs.fewslice_cpu_threads()
        self.control = TrainControl()
        return self._start(fewslice_job, req, self.control, connect=connect, train=True)

    def shutdown(self, wait_ms: int = 0) -> bool:
        """Stop the run (it still saves its checkpoint) and ask helpers to quit;
        wait up to ``wait_ms`` for them. True when every job finished (the
        training worker is not quit: that would end it before it saves)."""
        self.stop()
        for w in list(self._workers):
            if w is not self.train_worker:
                w.quit()
        return await_workers(wait_ms) if wait_ms else not self._workers
