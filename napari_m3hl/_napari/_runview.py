"""The dock widget's view of a training run: the events a worker yields, drawn.

:class:`RunViewMixin` (mixed into :class:`._widget.M3HLWidget`) draws each
event of the training worker in the GUI thread: progress and the loss plot,
the preview overlay (updated in place, dropped when the layers changed since
Train), the quality numbers beside the plot, the mix preview, the end of the
run; few-slice events go to :class:`._finetune.FineTuneMixin`.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
from napari.layers import Labels

from .. import events as ev
from . import _layers as lc
from . import _overlays as ov
from ._jobs import AutosaveFailed, DataReady, PreviewQuality
from ._plot import quality_text
from ._workers import describe_error


def _fmt_time(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class RunViewMixin:
    """Draws the training worker's events (GUI thread)."""

    # ---------------------------------------------------------------- events
    def _on_event(self, e: Any) -> None:
        """Draw one event from the training worker (GUI thread)."""
        if isinstance(e, ev.Progress):
            self._on_progress(e)
        elif isinstance(e, ev.VolumePreview):
            self._on_volume_preview(e)
        elif isinstance(e, ev.MixPreview):
            self._on_mix_preview(e)
        elif isinstance(e, PreviewQuality):
            self._on_quality(e)
        elif isinstance(e, DataReady):
            self._status(
                f"Start model loaded; its segmentation is in '{lc.PSEUDO_LABELS}'. Fine-tuning on {e.n_labeled} "
                f"painted slices ({e.n_unlabeled} not painted)…" if self.run is not None and self.run.fewslice else
                f"Data ready: {e.n_labeled} labeled and {e.n_unlabeled} unlabeled slices; building the network…"
            )
        elif isinstance(e, ev.TrainStarted):
            self.progress.setRange(0, e.total_iterations)
            self.progress.setValue(e.start_iteration)
            self.progress.setFormat("%v / %m")
            fewslice = self.run is not None and self.run.fewslice
            self._status(
                f"Training on {e.device}: {e.n_labeled} labeled, {e.n_unlabeled} unlabeled slices "
                f"({e.mode}); " + ("the preview follows each check." if fewslice else
                                   f"previews every {self.preview_every_s or '-'} s.")
            )
        elif isinstance(e, AutosaveFailed):
            self._warn(f"Could not autosave the session to {e.folder} ({e.error}); training goes on and your "
                       "layers are unchanged. Save session… to another folder to keep the work.")
        elif isinstance(e, ev.CheckpointSaved):
            self.runner.checkpoint = e.path
            self._update_buttons()
        elif isinstance(e, ev.TrainFinished):
            self._on_finished_event(e)
        else:
            self._fewslice_event(e)

    def _on_progress(self, e: ev.Progress) -> None:
        self.progress.setMaximum(e.total_iterations)
        self.progress.setValue(e.iteration)
        if not (self.runner.control and self.runner.control.stop_requested):
            self.progress.setFormat("%v / %m" if not self.runner.paused else "paused at %v / %m")
        terms = " · ".join(f"{k} {v:.3f}" for k, v in e.losses.items())
        self.progress_label.setText(
            f"iteration {e.iteration}/{e.total_iterations} · {e.images_per_s:.1f} img/s · "
            f"elapsed {_fmt_time(e.elapsed_s)} · ETA {_fmt_time(e.eta_s)}\n{terms}"
        )
        self.loss_plot.add(e.iteration, e.losses)

    def current_token(self) -> tuple | None:
        """Token of the run's image/labels now; None when a layer was removed."""
        run = self.run
        if run is None or not lc.layer_in(self.viewer, run.image) or not lc.layer_in(self.viewer, run.labels):
            return None
        return self.versions.token([run.image, run.labels])

    def _on_volume_preview(self, e: ev.VolumePreview) -> None:
        self._show_preview(e.labels, e.iteration, e.token)

    def _show_preview(self, labels: np.ndarray, iteration: int, token: Any) -> None:
        """Draw a preview (one frame, (D, H, W)) in the preview layer, in place;
        dropped when the image or labels changed since Train (``token`` None:
        the run's own)."""
        run = self.run
        if run is None:
            return
        if (run.token if token is None else token) != self.current_token():
            run.dropped_previews += 1
            self.progress_label.setText(
                self.progress_label.text().split("\n")[0]
                + "\npseudo-label preview skipped: the image or labels changed since Train"
            )
            return
        index = (run.preview_frame,) if run.image.ndim == 4 else ()
        layer = self.viewer.layers[lc.PSEUDO_LABELS] if lc.PSEUDO_LABELS in self.viewer.layers else None
        if isinstance(layer, Labels) and tuple(layer.data.shape) == tuple(run.image.data.shape):
            lc.update_changed(layer, labels, index)  # in place: only the changed pixels are redrawn
        else:
            data = labels
            if index:
                data = np.zeros(run.image.data.shape, np.uint8)
                data[index] = labels
            layer = lc.upsert_labels(self.viewer, lc.PSEUDO_LABELS, data, run.class_names, like=run.image,
                                     opacity=0.45, editable=False)
        layer.editable = False
        run.preview_iteration = iteration
        if run.first_preview_s is None:
            run.first_preview_s = time.perf_counter() - run.started

    def _on_quality(self, e: PreviewQuality) -> None:
        """Dice against the painted slices and the change of the unpainted ones, beside the loss plot."""
        text, tip = quality_text(e)
        self.quality_label.setText(text)
        self.quality_label.setToolTip(tip)

    def _on_mix_preview(self, e: ev.MixPreview) -> None:
        """Show the two mixed images side by side, to the right of the volume."""
        run = self.run
        if run is None:
            return
        montage, targets = ov.mix_montage(e.images, e.targets)
        ov.show_mix(self.viewer, run.image, montage, targets, e.images.shape[-2:], run.class_names)
        run.mix_shown = True

    def _on_finished_event(self, e: ev.TrainFinished) -> None:
        run = self.run
        if run is not None:
            run.finished = e
        if e.checkpoint:
            self.runner.checkpoint = e.checkpoint
            self.model_iteration = int(e.iteration) + (run.iteration_offset if run is not None else 0)
            self.model_resumable = True
            self.model_is_fewslice = bool(run is not None and run.fewslice)
        if self.run_history:
            self.run_history[-1].update({"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "iteration": int(e.iteration),
                                         "stopped": bool(e.stopped), "checkpoint": e.checkpoint})
        how = "Stopped" if e.stopped else "Finished"
        self._status(f"{how} at iteration {e.iteration}; checkpoint {e.checkpoint or '(not saved)'}")
        self.progress.setFormat(f"{how.lower()} at %v / %m")
        if run is not None and run.fewslice:
            return  # the few-slice result follows, with its segmentation (_on_fewslice_result)
        if self.auto_predict and e.checkpoint and run is not None and lc.layer_in(self.viewer, run.image):
            self.analyse_run(run.image, run.preview_frame if run.image.ndim == 4 else 0)

    def _on_train_error(self, exc: BaseException) -> None:
        run = self.run
        self._error(describe_error(exc, "Training", run.batch_size if run else None, self.runner.checkpoint))
        self.progress.setFormat("failed at %v / %m")

    def _on_train_aborted(self) -> None:
        self._status(f"Training cancelled; last checkpoint: {self.runner.checkpoint or 'none'}")

    def _on_train_finished(self) -> None:
        self.set_running(False)
        self._update_buttons()
