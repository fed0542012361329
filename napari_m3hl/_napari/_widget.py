"""The "Train M³HL" dock widget: wires the layout to layers and workers.

* layout: :class:`._layout.TrainWidgetLayout` (controls only);
* layer control: :class:`._picker.LayerPickerWidget` (pickers, info line,
  messages) and :mod:`._layers` (overlay names, in-place updates, colours,
  data version tokens);
* backend: :class:`._run.RunController` (owns the training run; the jobs of
  :mod:`._jobs` in thread workers, :mod:`._workers`).

Every Qt signal is connected through :func:`._slots.on_signal`, so no
signal's value (``clicked``'s ``checked`` flag) reaches an action's parameters.

Everything in this module runs in the GUI thread: it validates the input,
takes copies of the layer data, starts workers, and draws the events the
workers yield. The user's own layers are only read, never written.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QFileDialog

from .. import events as ev
from ..config import TrainConfig, list_presets, load_preset, read_preset
from ..errors import M3HLInputError
from . import _layers as lc
from . import _request as rq
from ._assist import AssistMixin, Suggestions
from ._finetune import FineTuneMixin
from ._jobs import AutosaveFailed, DataReady, PreviewQuality, RunAnalysis, TrainRequest
from ._layout import START_MODES
from ._picker import LayerPickerWidget, breakable
from ._plot import quality_text
from ._request import RunState
from ._run import RunController
from ._slots import on_signal
from ._workers import describe_error

if TYPE_CHECKING:  # pragma: no cover
    import napari

#: Defaults for interactive training on one volume (the presets are for cohorts,
#: 30 000 iterations). Measured on the 10-slice phantom with 2 painted slices,
#: 300 iterations, 256², batch 8 (student / EMA teacher Dice RV, Myo, LV):
#: reference variant 0.85 0.92 0.95 / 0.13 0.82 0.71; paper variant at lr 0.01
#: 0.96 0.69 0.95 / 0 0 0 (its eval-mode teacher, with BatchNorm statistics
#: averaged from the student's, labels everything background after so few
#: steps, so its pseudo-label preview stays empty); paper at its lr 0.001
#: 0.05 0.84 0.06. Hence: reference variant, lr 0.01.
GUI_ITERATIONS = 300
GUI_CPU_BATCH = 8
GUI_LR = 0.01
GUI_VARIANT = "reference"
CHECKPOINT_EVERY = 100


def _fmt_time(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def presets_2d() -> list[str]:
    """Presets with a 2D patch (the widget trains slice-wise 2D models)."""
    out = []
    for name in list_presets():
        try:
            settings = dict(read_preset(name).get("settings", {}))
        except M3HLInputError:
            continue
        if len(settings.get("patch_size", (0, 0))) == 2:
            out.append(name)
    return out


class M3HLWidget(FineTuneMixin, AssistMixin, LayerPickerWidget):
    """Dock widget: paint a few slices, train M³HL, watch, predict, export.

    Attributes useful to scripts and tests:

    * ``config_overrides``: extra :class:`TrainConfig` settings applied last
      (e.g. ``{"patch_size": (64, 64), "block_size": (16, 16)}``);
    * ``preview_every_s`` / ``mix_preview_every_s``: overlay periods;
    * ``auto_predict``: segment the image when a run ends;
    * ``last_error``: the message of the latest error shown.
    """

    #: Start the engine's warm-up job when the widget opens.
    warm_up_on_open = True

    def __init__(self, napari_viewer: "napari.viewer.Viewer", out_dir: str | Path | None = None) -> None:
        super().__init__(napari_viewer)
        self.runner = RunController(out_dir)
        self.config_overrides: dict[str, Any] = {}
        self.preview_every_s: float | None = 5.0
        self.mix_preview_every_s: float | None = 5.0
        self.auto_predict = True
        self.run: RunState | None = None
        self._n_runs = 0
        self._seg_token: tuple | None = None  # version of 'M³HL segmentation' when last written
        self._init_assist()
        self._init_finetune()

        self.run_dir_label.setText(breakable(f"Run folder: {self.runner.out_dir}"))
        self._show_session_folder(autosave_only=True)
        self.preset_combo.addItems(presets_2d())
        self.variant_combo.setCurrentText(GUI_VARIANT)
        self._connect()
        self._apply_preset()
        self.refresh_layers()
        self.set_running(False)
        self._update_buttons()
        if self.warm_up_on_open:  # first-use imports and torch set-up now, in a worker, not after Train
            self.runner.warm_up()

    # ================================================================ wiring
    def _connect(self) -> None:
        on_signal(self.preset_combo.currentIndexChanged, self._apply_preset)
        on_signal(self.variant_combo.currentIndexChanged, self._apply_preset)
        on_signal(self.device_combo.currentIndexChanged, self._apply_device_defaults)
        on_signal(self.start_combo.currentIndexChanged, self._update_buttons)
        on_signal(self.start_combo.currentIndexChanged, self._apply_start_defaults)
        on_signal(self.browse_btn.clicked, self._browse_start_file)
        on_signal(self.train_btn.clicked, self.start_training)
        on_signal(self.pause_btn.clicked, self.pause)
        on_signal(self.resume_btn.clicked, self.resume)
        on_signal(self.stop_btn.clicked, self.stop)
        on_signal(self.predict_btn.clicked, self.predict)
        on_signal(self.export_btn.clicked, self.export)
        on_signal(self.save_ckpt_btn.clicked, self.save_checkpoint)
        on_signal(self.load_ckpt_btn.clicked, self.load_checkpoint)

    # ================================================================ settings
    def _device_is_cpu(self) -> bool:
        from ..runtime import resolve_device

        try:
            return resolve_device(self.device_combo.currentText()).type == "cpu"
        except M3HLInputError:
            return True

    def _apply_preset(self) -> None:
        """Fill the advanced section from the preset, with GUI defaults for one volume."""
        name = self.preset_combo.currentText()
        if not name:
            return
        try:
            cfg = load_preset(name, self.variant_combo.currentText())
        except M3HLInputError as exc:
            self._error(str(exc))
            return
        self.show_settings(cfg.to_dict())
        self._apply_start_defaults()

    def _apply_start_defaults(self) -> None:
        """Iterations, batch, learning rate and EMA decay of the Start mode: the
        few-slice defaults (``FewSliceOptions``, as ``m3hl train --labels``) for
        *Fine-tune from file*, the panel's M³HL defaults otherwise."""
        from ..fewslice import FewSliceOptions

        if self.start_combo.currentIndex() == START_MODES.index("Fine-tune from file"):
            fs = FewSliceOptions()
            self.show_settings({"iterations": fs.iterations, "batch_size": fs.batch_size, "lr": fs.lr,
                                "ema_decay": fs.ema_decay})
            return
        name = self.preset_combo.currentText()
        if not name:
            return
        try:
            cfg = load_preset(name, self.variant_combo.currentText())
        except M3HLInputError:
            return
        self.show_settings({"iterations": GUI_ITERATIONS, "lr": max(cfg.lr, GUI_LR), "ema_decay": cfg.ema_decay,
                            "batch_size": GUI_CPU_BATCH if self._device_is_cpu() else cfg.batch_size})

    def _apply_device_defaults(self) -> None:
        batch = self.advanced_form.editor("batch_size")
        if self._device_is_cpu() and batch.value() > GUI_CPU_BATCH:
            batch.setValue(GUI_CPU_BATCH)

    def build_config(self) -> TrainConfig:
        """The run's config: preset + variant + advanced settings + ``config_overrides``."""
        overrides = {
            **self.settings(),
            "device": self.device_combo.currentText(),
            "checkpoint_every": CHECKPOINT_EVERY,
            "val_every": 0,
            **self.config_overrides,
        }
        return load_preset(self.preset_combo.currentText() or "acdc_unet2d", self.variant_combo.currentText(),
                           **overrides)

    def set_run_folder(self, path: str | Path) -> None:
        """Write the next runs' checkpoints under ``path`` (``run-NN`` subfolders)."""
        self.runner.out_dir = Path(path)
        self.run_dir_label.setText(breakable(f"Run folder: {self.runner.out_dir}"))
        self._show_session_folder(autosave_only=self.session_folder is None)

    def _browse_start_file(self) -> None:
        path = self._ask_open_path("Checkpoint or model file")
        if path:
            self.start_path.setText(path)
            if self.start_combo.currentIndex() == 0:
                self.start_combo.setCurrentIndex(1)

    # file dialogs: separate methods so scripts and tests can replace them
    def _ask_open_path(self, caption: str) -> str:
        from ..config import MODELS_DIR

        # start in the run folder once it has checkpoints, else among the shipped models
        start = self.runner.out_dir if self.runner.out_dir.is_dir() else MODELS_DIR
        path, _ = QFileDialog.getOpenFileName(self, caption, str(start), "Checkpoints (*.pt *.pth);;All files (*)")
        return path

    def _ask_save_path(self, caption: str, default: str, filters: str) -> str:
        path, _ = QFileDialog.getSaveFileName(self, caption, default, filters)
        return path

    # ================================================================ training
    def _make_request(self, resume_from: str | Path | None = None,
                      iterations: int | None = None) -> tuple[TrainRequest, RunState]:
        """The request for a run: the start mode's, or ``resume_from`` for
        ``iterations`` in all (Train on). Raises M3HLInputError on bad input."""
        image, labels = rq.check_layers(self.image_layer(), self.labels_layer())
        lab = np.asarray(labels.data)
        config = self.build_config()
        if iterations is not None:
            config = config.replace(iterations=int(iterations))
        from ..runtime import resolve_device

        resolve_device(config.device)  # cheap; raises a clear error for an absent GPU
        rq.check_labels(labels.name, lab, config)
        init_from, resume_from = rq.start_files(self.start_combo.currentIndex(), self.start_path.text(), resume_from)
        images, labels_copy, extra, names = rq.copy_frames(image, lab, self.extra_layers())
        preview_frame = rq.frame_in_view(self.viewer, image)
        run_dir, self._n_runs = rq.next_run_dir(self.runner.out_dir, self._n_runs)
        token = self.versions.token([image, labels])
        req = TrainRequest(
            config=config, images=images, labels=labels_copy, extra=extra, names=names,
            preview_frame=preview_frame, out_dir=run_dir, init_from=init_from, resume_from=resume_from,
            token=token, preview_every_s=self.preview_every_s, mix_preview_every_s=self.mix_preview_every_s,
            autosave=self.session_snapshot(self.autosave_folder(), with_checkpoint=False),
        )
        state = RunState(image=image, labels=labels, token=token, preview_frame=preview_frame,
                         class_names=tuple(config.class_names), run_dir=run_dir, batch_size=config.batch_size)
        return req, state

    def start_training(self, resume_from: str | Path | None = None, iterations: int | None = None) -> bool:
        """Validate, copy the data and start a training worker. Returns False on bad input.

        With Start *Fine-tune from file* on one volume this is the few-slice
        fine-tune (:meth:`start_fewslice`); otherwise the preset's M³HL run.
        ``resume_from`` / ``iterations``: continue that checkpoint up to
        ``iterations`` in all (Train on) instead of the Start mode's choice.
        """
        if self.runner.training:
            self._error("A training run is going: stop it before starting another.")
            return False
        if resume_from is None and self.uses_fewslice():
            return self.start_fewslice()
        try:
            req, state = self._make_request(resume_from, iterations)
        except M3HLInputError as exc:
            self._error(str(exc))
            return False
        how = ("train on" if resume_from is not None else START_MODES[self.start_combo.currentIndex()].lower())
        self.finetune = None
        self.verdict_label.setText("")
        self._begin_run(state, how, str(req.resume_from or req.init_from or ""), req.config.iterations,
                        req.config.to_dict(), patch=req.config.patch_size)
        self._status(f"Training in {state.run_dir}")
        self.runner.start_training(req, connect=self._run_handlers())
        return True

    def _run_handlers(self) -> dict[str, Any]:
        return {"yielded": self._on_event, "errored": self._on_train_error, "aborted": self._on_train_aborted,
                "finished": self._on_train_finished}

    def _begin_run(self, state: RunState, how: str, source: str, iterations: int, config: dict[str, Any],
                   patch: tuple[int, ...] | None = None) -> None:
        """Record the run, reset the progress display and schedule the overlay
        layers (the mix overlays only for an M³HL run with ``patch``)."""
        self.run = state
        labeled = lc.labeled_slices(np.asarray(state.labels.data))
        self.run_history.append({
            "run_dir": str(state.run_dir), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "how": how,
            "from": source, "image": state.image.name, "labels": state.labels.name,
            "labeled_slices": [int(i) for i in labeled] if state.image.ndim == 3 else int(labeled.size),
            "config": config, "kind": "few-slice" if state.fewslice else "m3hl",
        })
        self._show_session_folder(autosave_only=self.session_folder is None)
        self._queue_overlays(state, patch)
        self.loss_plot.clear()
        self.quality_label.setText(quality_text(None)[0])
        self.progress.setRange(0, iterations)
        self.progress.setValue(0)
        self.progress.setFormat("preparing data…")
        self.progress_label.setText("")
        self.run_dir_label.setText(breakable(f"Run folder: {state.run_dir}"))
        self.set_running(True)
        self._update_buttons()

    def _queue_overlays(self, state: RunState, patch: tuple[int, ...] | None) -> None:
        """Add (once) or clear the run's overlay layers from queued callbacks,
        one layer per event-loop turn, so the click on Train returns at once
        (adding a layer costs the GUI thread ~150 ms of vispy set-up). A step
        skips a layer that a preview of this run already drew."""
        steps = [lambda: lc.prepare_preview(self.viewer, state.image, state.class_names)]
        if patch is not None:
            steps += [lambda: lc.prepare_mix(self.viewer, state.image, patch, state.class_names, targets=False),
                      lambda: lc.prepare_mix(self.viewer, state.image, patch, state.class_names, targets=True)]

        def run_step(k: int) -> None:
            if self.run is not state or not lc.layer_in(self.viewer, state.image):
                return
            drawn = state.preview_iteration is not None if k == 0 else state.mix_shown
            if not drawn:
                steps[k]()
            if k + 1 < len(steps):
                QTimer.singleShot(0, lambda: run_step(k + 1))

        QTimer.singleShot(0, lambda: run_step(0))

    def pause(self) -> None:
        if self.runner.training:
            self.runner.pause()
            self.set_running(True, paused=True)
            self.progress.setFormat("paused at %v / %m")
            self._status("Paused: press Resume to continue or Stop to keep the current model.")

    def resume(self) -> None:
        if self.runner.training:
            self.runner.resume()
            self.set_running(True, paused=False)
            self.progress.setFormat("%v / %m")
            self._status("Training resumed.")

    def stop(self) -> None:
        """Stop after the current step; the trainer saves ``last.pt`` and the segmentation follows."""
        if self.runner.training:
            self.runner.stop()
            self.stop_btn.setEnabled(False)
            self.pause_btn.setEnabled(False)
            self.resume_btn.setEnabled(False)
            self.progress.setFormat("stopping… %v / %m")
            self._status("Stopping after the current step; saving the checkpoint…")

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
                f"Data ready: {e.n_labeled} labeled and {e.n_unlabeled} unlabeled slices; building the network…"
            )
        elif isinstance(e, ev.TrainStarted):
            self.progress.setRange(0, e.total_iterations)
            self.progress.setValue(e.start_iteration)
            self.progress.setFormat("%v / %m")
            self._status(
                f"Training on {e.device}: {e.n_labeled} labeled, {e.n_unlabeled} unlabeled slices "
                f"({e.mode}); previews every {self.preview_every_s or '-'} s."
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
                                     opacity=0.45)
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
        montage, targets = lc.mix_montage(e.images, e.targets)
        lc.show_mix(self.viewer, run.image, montage, targets, e.images.shape[-2:], run.class_names)
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

    # ================================================================ predict / export
    def _update_buttons(self) -> None:
        has_model = bool(self.runner.checkpoint)
        self.predict_btn.setEnabled(has_model)
        self.save_ckpt_btn.setEnabled(has_model)
        self.export_btn.setEnabled(lc.SEGMENTATION in self.viewer.layers)
        self._update_fewslice_buttons()
        needs_file = self.start_combo.currentIndex() > 0
        self.start_path.setVisible(needs_file)
        self.browse_btn.setVisible(needs_file)
        self._update_assist_buttons()

    def update_info(self, event: Any = None) -> None:
        """The info line, and the suggestion list (labeled slices drop out of it)."""
        super().update_info(event)
        if hasattr(self, "suggestions"):
            self.refresh_suggestions()

    def predict(self, image: Image | None = None) -> bool:
        """Segment ``image`` (default: the selected one) with the latest model in a worker."""
        image = image or self.image_layer()
        if image is None:
            self._error("No image layer to segment.")
            return False
        if image.rgb or image.ndim < 3:
            self._error(rq.msg_2d(image))
            return False
        if not self.runner.checkpoint:
            self._error("No model yet: train first, or load a checkpoint / model file.")
            return False
        volumes = lc.frames(image.data)  # views: the job converts them
        self.predict_btn.setEnabled(False)
        self._status(f"Segmenting '{image.name}' with the {self.which_combo.currentText()}…")
        names = self.current_class_names()

        def done(labels: np.ndarray) -> None:
            self._show_segmentation(labels, image, names)

        self.runner.predict(volumes, which=self.which_combo.currentText(), device=self.device_combo.currentText(),
                             connect={"returned": done, "errored": self._on_predict_error,
                                      "finished": self._update_buttons})
        return True

    def analyse_run(self, image: Image, frame: int = 0) -> bool:
        """After a run: one job segments ``image`` (every frame) and, with
        ``auto_suggest``, scores the slices of ``frame``, from one checkpoint load."""
        volumes = lc.frames(image.data)  # views: the job converts them
        method = self.score_combo.currentText() if self.auto_suggest else None
        which, ckpt, names = self.which_combo.currentText(), self.runner.checkpoint, self.current_class_names()
        self.predict_btn.setEnabled(False)
        self.suggest_btn.setEnabled(False)
        self._status(f"Segmenting '{image.name}' with the {which}" + (" and ranking its slices…" if method else "…"))

        def done(result: RunAnalysis) -> None:
            self._show_segmentation(result.segmentation, image, names)
            if result.analysis is not None:
                self._on_analysis(Suggestions(image, frame if image.ndim == 4 else None, result.analysis, ckpt))

        self.runner.analyse_run(volumes, frame, method, which, device=self.device_combo.currentText(), connect={
            "returned": done, "errored": self._on_predict_error, "finished": self._update_buttons})
        return True

    def _show_segmentation(self, labels: np.ndarray, image: Image, class_names: tuple[str, ...]) -> None:
        if not lc.layer_in(self.viewer, image) or tuple(labels.shape) != tuple(image.data.shape):
            self._warn("The image changed while segmenting; press Predict again.")
            return
        self._keep_user_edits()
        seg = lc.upsert_labels(self.viewer, lc.SEGMENTATION, labels, class_names, like=image, opacity=0.6)
        self._seg_token = self.versions.token([seg])
        counts = ", ".join(f"{n} {int((labels == c).sum())} vox" for c, n in enumerate(class_names) if c)
        self._status(f"Segmentation of '{image.name}' in layer '{lc.SEGMENTATION}' (editable): {counts}")
        self._update_buttons()

    def _keep_user_edits(self) -> None:
        """Before a new segmentation replaces 'M³HL segmentation' in place, copy
        it to its own layer if the user edited it since it was written."""
        if lc.SEGMENTATION not in self.viewer.layers or self._seg_token is None:
            return
        seg = self.viewer.layers[lc.SEGMENTATION]
        if self.versions.token([seg]) == self._seg_token:
            return
        with lc.keep_selection(self.viewer):
            kept = lc.add_class_labels(self.viewer, np.array(seg.data, copy=True), f"{lc.SEGMENTATION} (your edits)",
                                       self.current_class_names(), like=seg, visible=False)
        self._warn(f"Your edits of '{lc.SEGMENTATION}' are kept in layer '{kept.name}'.")

    def _on_predict_error(self, exc: BaseException) -> None:
        self._error(describe_error(exc, "Prediction", 8, self.runner.checkpoint))

    def export(self, path: str | None = None) -> bool:
        """Write 'M³HL segmentation' as NIfTI with the source affine/header (in a worker)."""
        if lc.SEGMENTATION not in self.viewer.layers:
            self._error("Nothing to export: train or press Predict first to make 'M³HL segmentation'.")
            return False
        layer = self.viewer.layers[lc.SEGMENTATION]
        if path is None:
            src = layer.metadata.get("source_path")
            default = str(self.runner.out_dir / "segmentation.nii.gz")
            if src and str(src).lower().endswith((".nii", ".nii.gz")):
                stem = Path(src).name.split(".nii")[0]
                default = str(Path(src).with_name(f"{stem}_m3hl_seg.nii.gz"))
            path = self._ask_save_path("Export segmentation as NIfTI", default, "NIfTI (*.nii.gz *.nii)")
        if not path:
            return False
        meta = {"name": layer.name, "scale": tuple(layer.scale), "translate": tuple(layer.translate),
                "metadata": dict(layer.metadata)}
        if meta["metadata"].get("affine") is None:
            self._warn("The image has no NIfTI geometry; exporting with a diagonal affine from the voxel size.")
        painted, what = self._painted_for_export(layer)
        self.runner.export(path, np.array(layer.data, copy=True), meta, painted=painted, connect={
            "returned": lambda p: self._status(f"Saved {p} ({what})"),
            "errored": lambda exc: self._error(describe_error(exc, "Export")),
        })
        return True

    def _painted_for_export(self, seg: Labels) -> tuple[np.ndarray | None, str]:
        """A copy of the user's labels to put over the segmentation (None: export it alone), and its words."""
        if self.prediction_only_check.isChecked():
            return None, "the network's segmentation only"
        labels = self.labels_layer()
        if labels is None or tuple(labels.data.shape) != tuple(seg.data.shape):
            self._warn(f"No labels layer of the segmentation's shape is chosen under Data ▸ Labels; exporting "
                       f"'{lc.SEGMENTATION}' alone.")
            return None, "the segmentation alone: no painted labels of its shape"
        return np.array(labels.data, copy=True), f"the slices painted in '{labels.name}' as painted"

    def save_checkpoint(self, path: str | None = None) -> bool:
        """Copy the latest checkpoint to a file the user picks (in a worker)."""
        if not self.runner.checkpoint:
            self._error("No checkpoint yet: train first (Stop also saves one).")
            return False
        default = str(Path.home() / "m3hl_checkpoint.pt")
        path = path or self._ask_save_path("Save checkpoint", default, "Checkpoints (*.pt)")
        if not path:
            return False
        self.runner.save_checkpoint(path, connect={
            "returned": lambda p: self._status(f"Checkpoint saved to {p}"),
            "errored": lambda exc: self._error(describe_error(exc, "Saving the checkpoint")),
        })
        return True

    def load_checkpoint(self, path: str | None = None) -> bool:
        """Load a checkpoint/model file (checked in a worker) for Predict and fine-tuning."""
        path = path or self._ask_open_path("Load checkpoint or model file")
        if not path:
            return False
        try:
            cfg = self.build_config()
        except M3HLInputError as exc:
            self._error(str(exc))
            return False
        self.runner.load_checkpoint(path, cfg.arch, cfg.num_classes, connect={
            "returned": self._on_checkpoint_loaded,
            "errored": lambda exc: self._error(describe_error(exc, "Loading the checkpoint")),
        })
        return True

    def _on_checkpoint_loaded(self, info: dict[str, Any]) -> None:
        self.runner.checkpoint = info["path"]
        self.model_iteration = int(info["iteration"])
        self.model_resumable = bool(info["resumable"])
        self.model_is_fewslice = (info.get("config") or {}).get("preset") == "fewslice"
        self.finetune = None
        self.start_path.setText(info["path"])
        self.start_combo.setCurrentIndex(1)
        self._update_buttons()
        self._status(
            f"Loaded {info['path']} (iteration {info['iteration']}, classes {', '.join(info['class_names'])}): "
            "Predict uses it, Train fine-tunes from it."
        )

    # ================================================================ teardown
    def cleanup(self, wait_ms: int = 10000) -> None:
        """Stop training (its checkpoint is still written) and wait for workers."""
        self.runner.shutdown(wait_ms=wait_ms)
