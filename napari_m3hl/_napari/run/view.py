"""The dock widget's view of a training run: the events a worker yields, drawn.

:class:`RunView` (a helper of the Run panel, on the shared
:class:`napari_m3hl._napari.panels.state.PanelState`) draws each event of the training worker in the GUI thread: progress and the loss plot
(at most once per ``progress_every_s``: every repaint of the dock makes Qt
compose the whole window with napari's OpenGL canvas, CPU time taken from
training where rendering is software; the loss plot still gets every point),
the preview overlay (updated in place, dropped when the layers changed since
Train), the quality numbers beside the plot, the mix preview, the end of the
run; few-slice events go to :class:`napari_m3hl._napari.run.finetune.FineTune`.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
from napari.layers import Labels
from qtpy.QtCore import QTimer

from napari_m3hl.training import events as ev
from napari_m3hl._napari.layers import control as lc
from napari_m3hl._napari.layers import overlays as ov
from napari_m3hl._napari.run.file_jobs import AutosaveFailed
from napari_m3hl._napari.run.jobs import DataReady, PreviewQuality
from napari_m3hl._napari.panels.plot import quality_text
from napari_m3hl._napari.panels.state import PanelState
from napari_m3hl._napari.run.workers import describe_error


def _fmt_time(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class RunView:
    """Draws the training worker's events (GUI thread), on the shared state.

    ``progress_every_s``: the least time between two drawings of the progress
    bar, its text and the loss plot. A ``Progress`` that comes sooner waits
    (with those before it) for a single-shot timer or for the next event of
    another kind, whichever comes first, so the last one is always drawn and
    the order of what is shown is the worker's.
    """

    def __init__(self, st: PanelState, progress_every_s: float = 1.0) -> None:
        self.st = st
        self.progress_every_s = progress_every_s
        self._pending: list[ev.Progress] = []
        self._last_drawn = float("-inf")  # time.perf_counter() of the last progress drawing
        self._timer = QTimer(st.run_panel.loss_plot)  # deleted with the panel: no drawing after it is gone
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self.flush_progress)

    def on_event(self, e: Any) -> None:
        """Draw one event from the training worker (GUI thread)."""
        if isinstance(e, ev.Progress):
            self._pending.append(e)
            wait = self._last_drawn + self.progress_every_s - time.perf_counter()
            if wait <= 0:
                self.flush_progress()
            elif not self._timer.isActive():
                self._timer.start(max(1, int(wait * 1000)))
            return
        self.flush_progress()
        if isinstance(e, ev.VolumePreview):
            self._on_volume_preview(e)
        elif isinstance(e, ev.MixPreview):
            self._on_mix_preview(e)
        elif isinstance(e, PreviewQuality):
            self._on_quality(e)
        elif isinstance(e, DataReady):
            self.st.status(
                f"Start model loaded; its segmentation is in '{lc.PREVIEW}'. Fine-tuning on {e.n_labeled} "
                f"painted slices ({e.n_unlabeled} not painted or unlabeled)…" if self.st.run is not None and self.st.run.fewslice else
                f"Data ready: {e.n_labeled} labeled and {e.n_unlabeled} unlabeled slices; building the network…"
            )
        elif isinstance(e, ev.TrainStarted):
            self.st.run_panel.show_progress(e.start_iteration, e.total_iterations, "%v / %m")
            fewslice = self.st.run is not None and self.st.run.fewslice
            self.st.status(
                f"Training on {e.device}: {e.n_labeled} labeled, {e.n_unlabeled} unlabeled slices "
                f"({e.mode}); " + ("the preview follows each check." if fewslice else
                                   f"previews every {self.st.preview_every_s or '-'} s.")
            )
        elif isinstance(e, AutosaveFailed):
            self.st.warn(f"Could not autosave the session to {e.folder} ({e.error}); training goes on and your "
                       "layers are unchanged. Save session… to another folder to keep the work.")
        elif isinstance(e, ev.CheckpointSaved):
            self.st.runner.checkpoint = e.path
            self.st.update_buttons()
        elif isinstance(e, ev.TrainFinished):
            self._on_finished_event(e)
        else:
            self.st.fine_tune.fewslice_event(e)

    def flush_progress(self) -> None:
        """Draw the progress that waits (the last one's bar and text, every
        point in the loss plot), if any."""
        self._timer.stop()
        pending, self._pending = self._pending, []
        if not pending or self.st.runner.closed:  # closed: the panel's controls are going
            return
        for e in pending:
            self.st.run_panel.loss_plot.add(e.iteration, e.losses)  # update() only: one repaint for all
        self._on_progress(pending[-1])
        self._last_drawn = time.perf_counter()

    def _on_progress(self, e: ev.Progress) -> None:
        """The progress bar and its text for ``e`` (the loss plot is fed by :meth:`flush_progress`)."""
        fmt = None
        if not (self.st.runner.control and self.st.runner.control.stop_requested):
            fmt = "%v / %m" if not self.st.runner.paused else "paused at %v / %m"
        self.st.run_panel.show_progress(e.iteration, e.total_iterations, fmt)
        terms = " · ".join(f"{k} {v:.3f}" for k, v in e.losses.items())
        self.st.run_panel.progress_label.setText(
            f"iteration {e.iteration}/{e.total_iterations} · {e.images_per_s:.1f} img/s · "
            f"elapsed {_fmt_time(e.elapsed_s)} · ETA {_fmt_time(e.eta_s)}\n{terms}"
        )

    def current_token(self) -> tuple | None:
        """Token of the run's image/labels now; None when a layer was removed."""
        run = self.st.run
        if run is None or not lc.layer_in(self.st.viewer, run.image) or not lc.layer_in(self.st.viewer, run.labels):
            return None
        return self.st.versions.token([run.image, run.labels])

    def _on_volume_preview(self, e: ev.VolumePreview) -> None:
        self.show_preview(e.labels, e.iteration, e.token)

    def show_preview(self, labels: np.ndarray, iteration: int, token: Any, name: str = lc.PSEUDO_LABELS) -> None:
        """Draw a preview (one frame, (D, H, W)) in the preview layer ``name``
        (the teacher's pseudo-labels, or a fine-tune's segmentation preview), in
        place; dropped when the image or labels changed since Train (``token``
        None: the run's own)."""
        run = self.st.run
        if run is None:
            return
        if (run.token if token is None else token) != self.current_token():
            run.dropped_previews += 1
            self.st.run_panel.progress_label.setText(
                self.st.run_panel.progress_label.text().split("\n")[0]
                + f"\n'{name}' not updated: the image or labels changed since Train"
            )
            return
        index = (run.preview_frame,) if run.image.ndim == 4 else ()
        layer = self.st.viewer.layers[name] if name in self.st.viewer.layers else None
        if isinstance(layer, Labels) and tuple(layer.data.shape) == tuple(run.image.data.shape):
            lc.update_changed(layer, labels, index)  # in place: only the changed pixels are redrawn
        else:
            data = labels
            if index:
                data = np.zeros(run.image.data.shape, np.uint8)
                data[index] = labels
            layer = lc.upsert_labels(self.st.viewer, name, data, run.class_names, like=run.image,
                                     opacity=0.45, editable=False)
        layer.editable = False
        run.preview_iteration = iteration
        run.drawn.add(name)
        if run.first_preview_s is None:
            run.first_preview_s = time.perf_counter() - run.started

    def _on_quality(self, e: PreviewQuality) -> None:
        """Dice against the painted slices and the change of the unpainted ones, beside the loss plot."""
        text, tip = quality_text(e)
        self.st.run_panel.quality_label.setText(text)
        self.st.run_panel.quality_label.setToolTip(tip)

    def show_teacher_dice(self, dice: float) -> None:
        """Add the teacher's Dice on the painted slices (0..1) under the numbers beside the loss plot."""
        label = self.st.run_panel.quality_label
        first = label.text().split("\nteacher")[0]
        label.setText(f"{first}\nteacher {dice:.2f}")
        label.setToolTip(label.toolTip().split("\n\nteacher")[0] + "\n\nteacher: Dice of the M³HL teacher's "
                         f"pseudo-labels on the painted slices against your paint ('{lc.PSEUDO_LABELS}' shows "
                         "them on the other slices: what the network is taught there)")

    def _on_mix_preview(self, e: ev.MixPreview) -> None:
        """Show the two mixed images side by side, to the right of the volume."""
        run = self.st.run
        if run is None:
            return
        montage, targets = ov.mix_montage(e.images, e.targets)
        ov.show_mix(self.st.viewer, run.image, montage, targets, e.images.shape[-2:], run.class_names)
        run.mix_shown = True

    def _on_finished_event(self, e: ev.TrainFinished) -> None:
        run = self.st.run
        if run is not None:
            run.finished = e
        if e.checkpoint:
            self.st.runner.checkpoint = e.checkpoint
            self.st.model_iteration = int(e.iteration) + (run.iteration_offset if run is not None else 0)
            self.st.model_resumable = True
            self.st.model_is_fewslice = bool(run is not None and run.fewslice)
        if self.st.run_history:
            self.st.run_history[-1].update({"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "iteration": int(e.iteration),
                                         "stopped": bool(e.stopped), "checkpoint": e.checkpoint})
        how = "Stopped" if e.stopped else "Finished"
        self.st.status(f"{how} at iteration {e.iteration}; checkpoint {e.checkpoint or '(not saved)'}")
        self.st.run_panel.progress.setFormat(f"{how.lower()} at %v / %m")
        if run is not None and run.fewslice:
            return  # the few-slice result follows, with its segmentation (_on_fewslice_result)
        if self.st.auto_predict and e.checkpoint and run is not None and lc.layer_in(self.st.viewer, run.image):
            self.st.outputs.analyse_run(run.image, run.preview_frame if run.image.ndim == 4 else 0)

    def on_train_error(self, exc: BaseException) -> None:
        self.flush_progress()
        run = self.st.run
        self.st.error(describe_error(exc, "Training", run.batch_size if run else None, self.st.runner.checkpoint))
        self.st.run_panel.progress.setFormat("failed at %v / %m")

    def on_train_aborted(self) -> None:
        self.flush_progress()
        self.st.status(f"Training cancelled; last checkpoint: {self.st.runner.checkpoint or 'none'}")

    def on_train_finished(self) -> None:
        self.flush_progress()
        self.st.set_running(False)
        self.st.update_buttons()
