"""The "Train M³HL" dock widget: wires the layout to layers and workers.

* layout: :class:`._layout.TrainWidgetLayout` (controls only);
* layer control: :class:`._picker.LayerPickerWidget` (pickers, info line,
  messages) and :mod:`._layers` (overlay names, in-place updates, colours,
  data version tokens);
* backend: :class:`._run.RunController` (owns the training run; the jobs of
  :mod:`._jobs` and :mod:`._fewslice` in thread workers, :mod:`._workers`);
* behaviour by group, mixed in: :class:`._runview.RunViewMixin` (the run's
  events drawn), :class:`._outputs.OutputsMixin` (Predict, segmentation
  layer, Export, checkpoints), :class:`._finetune.FineTuneMixin` (the
  few-slice fine-tune and its safeguard), :class:`._assist.AssistMixin`
  (suggest, accept, train on), :class:`._sessions.SessionMixin` (session folders).

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
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QFileDialog

from ..config import TrainConfig, list_presets, load_preset, read_preset
from ..errors import M3HLInputError
from . import _layers as lc
from . import _overlays as ov
from . import _request as rq
from ._assist import AssistMixin
from ._finetune import FineTuneMixin
from ._jobs import TrainRequest
from ._layout import START_MODES
from ._picker import LayerPickerWidget, breakable
from ._plot import quality_text
from ._request import RunState
from ._outputs import OutputsMixin
from ._run import RunController
from ._runview import RunViewMixin
from ._sessions import SessionMixin
from ._slots import on_signal

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


class M3HLWidget(RunViewMixin, OutputsMixin, FineTuneMixin, AssistMixin, SessionMixin, LayerPickerWidget):
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
        one piece per event-loop turn (the preview layer is built in one turn
        and added in the next), so the click on Train returns at once and no
        turn stalls long (docs/benchmarks.md). A step skips a layer that a
        preview of this run already drew."""
        steps = ov.preview_steps(self.viewer, state.image, state.class_names)
        n_preview = len(steps)
        if patch is not None:
            steps += [lambda: ov.prepare_mix(self.viewer, state.image, patch, state.class_names, targets=False),
                      lambda: ov.prepare_mix(self.viewer, state.image, patch, state.class_names, targets=True)]

        def run_step(k: int) -> None:
            if self.run is not state or not lc.layer_in(self.viewer, state.image):
                return
            drawn = state.preview_iteration is not None if k < n_preview else state.mix_shown
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

    # ================================================================ teardown
    def cleanup(self, wait_ms: int = 10000) -> None:
        """Stop training (its checkpoint is still written) and wait for workers."""
        self.runner.shutdown(wait_ms=wait_ms)
