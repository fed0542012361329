"""The Run panel of the dock widget: Train, Pause, Resume, Stop, progress, results.

:class:`RunPanel` holds the run's controls (Train / Pause / Resume / Stop,
progress, loss plot and quality numbers, the safeguard's verdict, Predict,
Export, checkpoints, the status line) and starts runs: it validates the
input, copies the layer data and hands a request to the
:class:`napari_m3hl._napari.run.controller.RunController`. The run's events are drawn by
:class:`napari_m3hl._napari.run.view.RunView`, the results by :class:`napari_m3hl._napari.run.outputs.Outputs`, the
few-slice path by :class:`napari_m3hl._napari.run.finetune.FineTune` (the Run group's helpers,
on the shared :class:`napari_m3hl._napari.panels.state.PanelState`).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QCheckBox, QComboBox, QFileDialog, QGroupBox, QLabel, QProgressBar, QPushButton, \
    QSizePolicy, QVBoxLayout

from napari_m3hl.errors import M3HLInputError
from napari_m3hl._napari.layers import control as lc
from napari_m3hl._napari.layers import overlays as ov
from napari_m3hl._napari.run import request as rq
from napari_m3hl._napari.run.jobs import TrainRequest
from napari_m3hl._napari.panels.layout import KEEP_START, row
from napari_m3hl._napari.panels.plot import LossPlot, quality_text
from napari_m3hl._napari.run.request import RunState
from napari_m3hl._napari.panels.slots import on_signal
from napari_m3hl._napari.panels.state import PanelState, breakable


class RunPanel(QGroupBox):
    """Run: the run's controls, and starting, pausing and stopping runs."""

    def __init__(self, st: PanelState) -> None:
        super().__init__("Run")
        self.st = st
        lay = QVBoxLayout(self)
        self.run_dir_label = QLabel()
        self.run_dir_label.setWordWrap(True)
        self.run_dir_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.train_btn = QPushButton("Train")
        self.pause_btn = QPushButton("Pause")
        self.resume_btn = QPushButton("Resume")
        self.stop_btn = QPushButton("Stop")
        self.train_btn.setToolTip(
            "Train on the labeled slices and the unlabeled rest; previews appear as overlay layers"
        )
        self.stop_btn.setToolTip("Stop after the current step; the checkpoint and the segmentation are kept")
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("idle")
        self.progress.setTextVisible(True)
        self.progress_label = QLabel("")
        self.progress_label.setWordWrap(True)
        self.progress_label.setObjectName("m3hl_progress")
        self.loss_plot = LossPlot()
        self.quality_label = QLabel("Dice, painted\n–\nchange, unpainted\n–")
        self.quality_label.setObjectName("m3hl_quality")
        self.quality_label.setToolTip("Shown with each pseudo-label preview while training")
        self.which_combo = QComboBox()
        self.which_combo.addItems(("student", "teacher"))
        self.which_combo.setToolTip("Which network segments: the student, or its EMA teacher")
        self.predict_btn = QPushButton("Predict")
        self.predict_btn.setToolTip("Segment the whole image with the latest model into 'M³HL segmentation'")
        self.export_btn = QPushButton("Export…")
        self.export_btn.setToolTip("Save 'M³HL segmentation' as NIfTI with the image's affine and header; the "
                                   "slices you painted are written exactly as painted. After a fine-tune over "
                                   "More volumes, each one's segmentation is written beside it as "
                                   "<name>_<its layer>.nii.gz")
        self.clean_check = QCheckBox("Clean: each structure's largest 3D part")
        self.clean_check.setChecked(True)
        self.clean_check.setToolTip(
            "Keep only the largest connected piece of the RV, myocardium and LV in every segmentation (Predict, the "
            "end of a run, the few-slice fine-tune): stray blobs away from the heart go. Your painted slices are "
            "exported as painted either way. Untick to see everything the network segments.")
        self.prediction_only_check = QCheckBox("Export the network's segmentation only")
        self.prediction_only_check.setToolTip(
            "Export 'M³HL segmentation' as it is, without putting your painted slices over it")
        self.verdict_label = QLabel("")
        self.verdict_label.setWordWrap(True)
        self.verdict_label.setObjectName("m3hl_verdict")
        self.verdict_label.setToolTip("The safeguard's check of the last fine-tune against your painted slices "
                                      "and the start model's segmentation")
        self.keep_start_btn = QPushButton(KEEP_START)
        self.keep_start_btn.setToolTip("Show the start model's segmentation in 'M³HL segmentation' instead of the "
                                       "fine-tuned one (press again to switch back); Export writes what is shown")
        self.save_ckpt_btn = QPushButton("Save checkpoint…")
        self.load_ckpt_btn = QPushButton("Load checkpoint…")
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        self.status_label.setObjectName("m3hl_status")
        self.status_label.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Minimum)
        lay.addWidget(self.run_dir_label)
        lay.addWidget(row(self.train_btn, self.pause_btn, self.resume_btn, self.stop_btn))
        lay.addWidget(self.progress)
        lay.addWidget(self.progress_label)
        lay.addWidget(row(self.loss_plot, self.quality_label))
        lay.addWidget(self.verdict_label)
        lay.addWidget(self.keep_start_btn)
        lay.addWidget(row(QLabel("Network"), self.which_combo, self.predict_btn, self.export_btn))
        lay.addWidget(self.clean_check)
        lay.addWidget(self.prediction_only_check)
        lay.addWidget(row(self.save_ckpt_btn, self.load_ckpt_btn))
        lay.addWidget(self.status_label)
        self.run_dir_label.setText(breakable(f"Run folder: {self.st.runner.out_dir}"))

    def connect(self) -> None:
        """Connect the buttons (once every part of the widget exists)."""
        outputs = self.st.outputs
        on_signal(self.train_btn.clicked, self.start_training)
        on_signal(self.pause_btn.clicked, self.pause)
        on_signal(self.resume_btn.clicked, self.resume)
        on_signal(self.stop_btn.clicked, self.stop)
        on_signal(self.predict_btn.clicked, outputs.predict)
        on_signal(self.export_btn.clicked, outputs.export)
        on_signal(self.save_ckpt_btn.clicked, outputs.save_checkpoint)
        on_signal(self.load_ckpt_btn.clicked, outputs.load_checkpoint)
        on_signal(self.keep_start_btn.clicked, self.st.fine_tune.toggle_start_segmentation)

    def show_progress(self, value: int | None = None, maximum: int | None = None, fmt: str | None = None) -> None:
        """Set the progress bar (``maximum``: its range 0..maximum) without
        QProgressBar's synchronous repaint in ``setValue`` (~20 ms of the GUI
        thread under software OpenGL): it repaints with the rest of the window."""
        bar = self.progress
        bar.setUpdatesEnabled(False)
        try:
            if maximum is not None:
                bar.setRange(0, maximum)
            if value is not None:
                bar.setValue(value)
            if fmt is not None:
                bar.setFormat(fmt)
        finally:
            bar.setUpdatesEnabled(True)

    def update_buttons(self) -> None:
        has_model = bool(self.st.runner.checkpoint)
        self.predict_btn.setEnabled(has_model)
        self.save_ckpt_btn.setEnabled(has_model)
        self.export_btn.setEnabled(lc.SEGMENTATION in self.st.viewer.layers)

    def set_running(self, running: bool, paused: bool = False) -> None:
        self.load_ckpt_btn.setEnabled(not running)
        self.train_btn.setEnabled(not running)
        self.pause_btn.setEnabled(running and not paused)
        self.resume_btn.setEnabled(running and paused)
        self.stop_btn.setEnabled(running)

    def set_run_folder(self, path: str | Path) -> None:
        """Write the next runs' checkpoints under ``path`` (``run-NN`` subfolders)."""
        self.st.runner.out_dir = Path(path)
        self.run_dir_label.setText(breakable(f"Run folder: {self.st.runner.out_dir}"))
        self.st.session_panel.show_session_folder(autosave_only=self.st.session_folder is None)

    def ask_save_path(self, caption: str, default: str, filters: str) -> str:
        path, _ = QFileDialog.getSaveFileName(self, caption, default, filters)
        return path

    def _make_request(self, resume_from: str | Path | None = None,
                      iterations: int | None = None) -> tuple[TrainRequest, RunState]:
        """The request for a run: the start mode's, or ``resume_from`` for
        ``iterations`` in all (Train on). Raises M3HLInputError on bad input."""
        image, labels = rq.check_layers(self.st.data_panel.image_layer(), self.st.data_panel.labels_layer())
        lab = np.asarray(labels.data)
        config = self.st.model_panel.build_config()
        if iterations is not None:
            config = config.replace(iterations=int(iterations))
        from napari_m3hl.runtime import resolve_device

        resolve_device(config.device)  # cheap; raises a clear error for an absent GPU
        rq.check_labels(labels.name, lab, config)
        if self.st.data_panel.extra_pairs():
            raise M3HLInputError("More volumes with labels train in the few-slice fine-tune (Start 'Fine-tune from "
                                 "file'); for this run set their labels to 'unlabeled' or untick them.")
        model = self.st.model_panel
        init_from, resume_from = rq.start_files(model.start_mode(), model.start_path.text(), resume_from)
        images, labels_copy, extra, names = rq.copy_frames(image, lab, self.st.data_panel.extra_layers())
        preview_frame = rq.frame_in_view(self.st.viewer, image)
        run_dir, self.st.n_runs = rq.next_run_dir(self.st.runner.out_dir, self.st.n_runs)
        token = self.st.versions.token([image, labels])
        req = TrainRequest(
            config=config, images=images, labels=labels_copy, extra=extra, names=names,
            preview_frame=preview_frame, out_dir=run_dir, init_from=init_from, resume_from=resume_from,
            token=token, preview_every_s=self.st.preview_every_s, mix_preview_every_s=self.st.mix_preview_every_s,
            autosave=self.st.session_panel.autosave_snapshot(),
        )
        state = RunState(image=image, labels=labels, token=token, preview_frame=preview_frame,
                         class_names=tuple(config.class_names), run_dir=run_dir, batch_size=config.batch_size)
        return req, state

    def start_training(self, resume_from: str | Path | None = None, iterations: int | None = None) -> bool:
        """Validate, copy the data and start a training worker. Returns False on bad input.

        With Start *Fine-tune from file* this is the few-slice
        fine-tune (:meth:`napari_m3hl._napari.run.finetune.FineTune.start_fewslice`); otherwise the preset's M³HL run.
        ``resume_from`` / ``iterations``: continue that checkpoint up to
        ``iterations`` in all (Train on) instead of the Start mode's choice.
        """
        if self.st.runner.training:
            self.st.error("A training run is going: stop it before starting another.")
            return False
        model = self.st.model_panel
        plan = model.plan()
        if resume_from is None and plan.fewslice:
            return self.st.fine_tune.start_fewslice()
        try:
            req, state = self._make_request(resume_from, iterations)
        except M3HLInputError as exc:
            self.st.error(str(exc))
            return False
        how = "train on" if resume_from is not None else model.start_mode().value.lower()
        self.st.finetune = None
        self.verdict_label.setText("")
        self.begin_run(state, how, str(req.resume_from or req.init_from or ""), req.config.iterations,
                       req.config.to_dict(), patch=req.config.patch_size)
        self.st.status(f"Training in {state.run_dir}" + ("" if resume_from is not None else f" ({plan.reason})"))
        self.st.runner.start_training(req, connect=self.run_handlers())
        return True

    def run_handlers(self) -> dict[str, Any]:
        """The training worker's handlers: the run's events drawn (:class:`napari_m3hl._napari.run.view.RunView`)."""
        view = self.st.run_view
        return {"yielded": lambda e: view.on_event(e), "errored": view.on_train_error,
                "aborted": view.on_train_aborted, "finished": view.on_train_finished}

    def begin_run(self, state: RunState, how: str, source: str, iterations: int, config: dict[str, Any],
                  patch: tuple[int, ...] | None = None, previews: tuple[str, ...] = (lc.PSEUDO_LABELS,)) -> None:
        """Record the run, reset the progress display and schedule the overlay
        layers: the preview layers ``previews`` (a fine-tune's segmentation
        preview, the pseudo-labels), and the mix overlays for an M³HL run with
        ``patch`` (a fine-tune's mix overlays come with its first mix preview)."""
        self.st.run = state
        labeled = lc.labeled_slices(np.asarray(state.labels.data))
        self.st.run_history.append({
            "run_dir": str(state.run_dir), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "how": how,
            "from": source, "image": state.image.name, "labels": state.labels.name,
            "labeled_slices": [int(i) for i in labeled] if state.image.ndim == 3 else int(labeled.size),
            "config": config, "kind": "few-slice" if state.fewslice else "m3hl",
        })
        self.st.session_panel.show_session_folder(autosave_only=self.st.session_folder is None)
        self._queue_overlays(state, patch, previews)
        self.loss_plot.clear()
        self.quality_label.setText(quality_text(None)[0])
        self.show_progress(0, iterations, "preparing data…")
        self.progress_label.setText("")
        self.run_dir_label.setText(breakable(f"Run folder: {state.run_dir}"))
        self.st.set_running(True)
        self.st.update_buttons()

    def _queue_overlays(self, state: RunState, patch: tuple[int, ...] | None, previews: tuple[str, ...]) -> None:
        """Add (once) or clear the run's overlay layers from queued callbacks,
        one piece per event-loop turn (the preview layer is built in one turn
        and added in the next), so the click on Train returns at once and no
        turn stalls long (docs/benchmarks.md). A step skips a layer that a
        preview of this run already drew."""
        steps: list[tuple[str | None, Any]] = []  # (preview layer, step); None: a mix overlay
        for name in previews:
            steps += [(name, step) for step in ov.preview_steps(self.st.viewer, state.image, state.class_names, name)]
        if patch is not None:
            steps += [(None, lambda: ov.prepare_mix(self.st.viewer, state.image, patch, state.class_names,
                                                    targets=False)),
                      (None, lambda: ov.prepare_mix(self.st.viewer, state.image, patch, state.class_names,
                                                    targets=True))]

        def run_step(k: int) -> None:
            if self.st.run is not state or not lc.layer_in(self.st.viewer, state.image):
                return
            name, step = steps[k]
            drawn = name in state.drawn if name is not None else state.mix_shown
            if not drawn:
                step()
            if k + 1 < len(steps):
                QTimer.singleShot(0, lambda: run_step(k + 1))

        QTimer.singleShot(0, lambda: run_step(0))

    def pause(self) -> None:
        if self.st.runner.training:
            self.st.runner.pause()
            self.st.set_running(True, paused=True)
            self.progress.setFormat("paused at %v / %m")
            self.st.status("Paused: press Resume to continue or Stop to keep the current model.")

    def resume(self) -> None:
        if self.st.runner.training:
            self.st.runner.resume()
            self.st.set_running(True, paused=False)
            self.progress.setFormat("%v / %m")
            self.st.status("Training resumed.")

    def stop(self) -> None:
        """Stop after the current step; the trainer saves ``last.pt`` and the segmentation follows."""
        if self.st.runner.training:
            self.st.runner.stop()
            self.stop_btn.setEnabled(False)
            self.pause_btn.setEnabled(False)
            self.resume_btn.setEnabled(False)
            self.progress.setFormat("stopping… %v / %m")
            self.st.status("Stopping after the current step; saving the checkpoint…")
