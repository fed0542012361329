"""The Session panel of the dock widget: save, autosave, reopen a session folder.

:class:`SessionPanel` (on the shared :class:`napari_m3hl._napari.panels.state.PanelState`) writes and
reads a session folder (:mod:`napari_m3hl.io.session`: the labels with the
image's geometry, the checkpoint, the panel's settings, the run history) in
workers; every Train autosaves the labels to it. The ticked rows of Data ▸
More volumes are saved with it (each image's name, file and shape, and the
labels of a labeled one) and ticked again when it is reopened. Everything
here runs in the GUI thread and only starts workers; an opened session's
labels come back as new layers, never over open ones.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFileDialog, QGroupBox, QLabel, QPushButton, QVBoxLayout

from napari_m3hl import __version__
from napari_m3hl.errors import M3HLInputError
from napari_m3hl._napari.layers import control as lc
from napari_m3hl._napari.run.file_jobs import ExtraSnapshot, SessionOpened, SessionSnapshot
from napari_m3hl.app.plan import StartMode
from napari_m3hl._napari.panels.layout import row
from napari_m3hl._napari.panels.slots import on_signal
from napari_m3hl._napari.panels.state import PanelState, breakable
from napari_m3hl._napari.run.workers import describe_error


class SessionPanel(QGroupBox):
    """Session: Save session… / Open session… / the session folder line, and the autosave snapshot."""

    def __init__(self, st: PanelState) -> None:
        super().__init__("Session")
        self.st = st
        lay = QVBoxLayout(self)
        self.save_session_btn = QPushButton("Save session…")
        self.save_session_btn.setToolTip(
            "Save labels (NIfTI, the image's geometry), checkpoint, settings and run history to a folder; "
            "each Train also autosaves the labels there"
        )
        self.open_session_btn = QPushButton("Open session…")
        self.open_session_btn.setToolTip("Reopen a saved session folder: image, labels, model and settings")
        self.session_label = QLabel("Session folder: none (Save session… picks one)")
        self.session_label.setWordWrap(True)
        self.session_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        lay.addWidget(row(self.save_session_btn, self.open_session_btn))
        lay.addWidget(self.session_label)
        on_signal(self.save_session_btn.clicked, self.save_session)
        on_signal(self.open_session_btn.clicked, self.open_session)

    def update_buttons(self) -> None:
        self.save_session_btn.setEnabled(self.st.data_panel.labels_layer() is not None)

    def set_running(self, running: bool, paused: bool = False) -> None:
        self.open_session_btn.setEnabled(not running)

    def session_settings(self) -> dict[str, Any]:
        """The widget's settings, as saved in a session's ``settings.json``."""
        model, annotate = self.st.model_panel, self.st.annotate_panel
        return {
            "preset": model.preset_combo.currentText(), "variant": model.variant_combo.currentText(),
            "device": model.device_combo.currentText(), "start": model.start_combo.currentText(),
            "start_path": model.start_path.text(), "network": self.st.run_panel.which_combo.currentText(),
            "score": annotate.score_combo.currentText(), "spread": annotate.spread_check.isChecked(),
            "train_on_iterations": annotate.train_on_spin.value(),
            "advanced": model.settings(),
        }

    def apply_session_settings(self, values: dict[str, Any]) -> None:
        """Restore :meth:`session_settings` (unknown or missing keys are skipped)."""
        for key, combo in (("preset", self.st.model_panel.preset_combo), ("variant", self.st.model_panel.variant_combo),
                           ("device", self.st.model_panel.device_combo), ("start", self.st.model_panel.start_combo),
                           ("network", self.st.run_panel.which_combo), ("score", self.st.annotate_panel.score_combo)):
            if values.get(key) and combo.findText(str(values[key])) >= 0:
                combo.setCurrentText(str(values[key]))
        if "start_path" in values:
            self.st.model_panel.start_path.setText(str(values["start_path"]))
        if "spread" in values:
            self.st.annotate_panel.spread_check.setChecked(bool(values["spread"]))
        if "train_on_iterations" in values:
            self.st.annotate_panel.train_on_spin.setValue(int(values["train_on_iterations"]))
        adv = dict(values.get("advanced", {}))
        if adv:
            self.st.model_panel.show_settings(adv)

    def session_snapshot(self, folder: Path, with_checkpoint: bool) -> SessionSnapshot:
        """Copies of what a session folder holds (GUI thread; the worker writes them)."""
        image, labels = self.st.data_panel.image_layer(), self.st.data_panel.labels_layer()
        if labels is None:
            raise M3HLInputError("No labels layer to save: choose yours under Data ▸ Labels (or New labels layer).")
        if image is not None and tuple(image.data.shape) != tuple(labels.data.shape):
            image = None
        meta = {
            "plugin_version": __version__,
            "image_name": image.name if image is not None else None,
            "image_source": (image.metadata.get("source_path") if image is not None else None)
            or labels.metadata.get("source_path"),
            "image_shape": list(labels.data.shape),
            "labels_name": labels.name,
            "class_names": list(self.st.model_panel.current_class_names()),
            "iteration": self.st.model_iteration,
            "resumable": self.st.model_resumable,
            "checkpoint_source": self.st.runner.checkpoint,
            "runs": list(self.st.run_history),
        }
        geometry = {"scale": tuple(labels.scale), "translate": tuple(labels.translate),
                    "metadata": {k: labels.metadata[k] for k in ("affine", "header") if k in labels.metadata}}
        return SessionSnapshot(folder=Path(folder), labels=np.array(labels.data, dtype=np.uint8, copy=True),
                               geometry=geometry, settings=self.session_settings(), meta=meta,
                               checkpoint=self.st.runner.checkpoint if with_checkpoint else None,
                               extras=[extra_snapshot(img, lab) for img, lab in self.st.data_panel.ticked_volumes()])

    def autosave_snapshot(self) -> SessionSnapshot:
        """What Train autosaves (labels and settings, no checkpoint) to :meth:`autosave_folder`."""
        return self.session_snapshot(self.autosave_folder(), with_checkpoint=False)

    def _ask_folder(self, caption: str, start: str) -> str:
        return QFileDialog.getExistingDirectory(self, caption, start)

    def save_session(self, folder: str | Path | None = None) -> bool:
        """Write the session folder (labels, checkpoint, settings, run manifest) in a worker."""
        if folder is None:
            folder = self._ask_folder("Save session to folder", str(self.autosave_folder().parent))
        if not folder:
            return False
        try:
            snap = self.session_snapshot(Path(folder), with_checkpoint=bool(self.st.runner.checkpoint))
        except M3HLInputError as exc:
            self.st.error(str(exc))
            return False
        self.st.session_folder = Path(folder)
        self.show_session_folder()

        def saved(path: str) -> None:
            self.st.status(f"Session saved to {path}; each Train autosaves the labels there.")

        self.st.runner.save_session(snap, connect={
            "returned": saved,
            "errored": lambda exc: self.st.error(describe_error(exc, f"Saving the session to {folder}")),
        })
        return True

    def open_session(self, folder: str | Path | None = None) -> bool:
        """Read a session folder in a worker; its image (opened from its source
        file when not open), labels (a new layer), model and settings come back."""
        if self.st.runner.training:
            self.st.error("A training run is going: stop it before opening a session.")
            return False
        if folder is None:
            folder = self._ask_folder("Open session folder", str(self.autosave_folder().parent))
        if not folder:
            return False
        sources = [str(lay.metadata.get("source_path")) for lay in self.st.viewer.layers
                   if isinstance(lay, Image) and lay.metadata.get("source_path")]
        self.st.status(f"Opening session {folder}…")
        self.st.runner.open_session(folder, sources, connect={
            "returned": self._on_session_opened,
            "errored": lambda exc: self.st.error(describe_error(exc, "Opening the session")),
        })
        return True

    def _find_session_image(self, opened: SessionOpened) -> Image | None:
        meta, shape = opened.session.meta, tuple(opened.session.labels.shape)
        images = [lay for lay in self.st.viewer.layers if isinstance(lay, Image) and not lc.is_overlay(lay)]
        src = meta.get("image_source")
        for lay in images:
            if src and str(lay.metadata.get("source_path")) == str(src) and tuple(lay.data.shape) == shape:
                return lay
        if opened.image is not None:
            data, kwargs, _ = opened.image
            if tuple(np.shape(data)) == shape:
                return self.st.viewer.add_image(data, **kwargs)
        for lay in [self.st.data_panel.image_layer()] + [lay for lay in images if lay.name == meta.get("image_name")]:
            if lay is not None and tuple(lay.data.shape) == shape:
                return lay
        return None

    def _on_session_opened(self, opened: SessionOpened) -> None:
        sess, meta = opened.session, opened.session.meta
        image = self._find_session_image(opened)
        if image is None:
            self.st.error(
                f"Session {sess.folder}: its image '{meta.get('image_name')}' ({meta.get('image_source') or 'no file'}) "
                f"is not open and its file was not found. Open an image of shape {tuple(sess.labels.shape)}, select it "
                "under Data ▸ Image and press Open session… again."
            )
            return
        names = tuple(meta.get("class_names") or self.st.model_panel.current_class_names())
        name = meta.get("labels_name") or f"{image.name} labels"
        if name in self.st.viewer.layers:
            name = f"{name} (session {time.strftime('%H:%M:%S')})"
        labels = lc.add_class_labels(self.st.viewer, sess.labels, name, names, like=image)
        labels.n_edit_dimensions = 2
        self.st.data_panel.image_combo.setCurrentText(image.name)
        self.st.data_panel.labels_combo.setCurrentText(labels.name)
        self.apply_session_settings(sess.settings)
        self.st.session_folder = sess.folder
        self.st.run_history = list(meta.get("runs", []))
        self.st.suggestions = None
        self.st.annotate_panel.refresh_suggestions()
        self.show_session_folder()
        if sess.checkpoint is not None:
            self.st.runner.checkpoint = str(sess.checkpoint)
            self.st.model_iteration = int(meta.get("iteration", 0))
            self.st.model_resumable = bool(meta.get("resumable", False))
            self.st.model_is_fewslice = opened.kind == "fewslice"
            self.st.model_panel.start_path.setText(str(sess.checkpoint))
            self.st.model_panel.set_start_mode(StartMode.FINE_TUNE)
        self.st.viewer.layers.selection.active = labels
        self.st.data_panel.update_info()
        self.st.update_buttons()
        what = (f"model at iteration {self.st.model_iteration} (Train on continues it)" if sess.checkpoint and
                self.st.model_resumable else "model" if sess.checkpoint else "no model")
        if sess.checkpoint is not None and self.st.auto_predict:
            self.st.outputs.predict(image=image)
        self.st.status(f"Session {sess.folder} opened: '{labels.name}' on '{image.name}', {what}. "
                     f"{self.st.data_panel.info_label.text()}")
        if sess.extras:
            self._restore_more_volumes(opened, image, labels, names)

    def _find_extra_image(self, k: int, opened: SessionOpened, taken: list[Image | None]) -> Image | None:
        """The image layer of the session's more volume ``k``: an open one of its
        file and shape, else its file as read by the worker (added now), else an
        open one of its name and shape; ``taken``: layers that are already another volume's."""
        vol, read = opened.session.extras[k], opened.extra_images[k] if k < len(opened.extra_images) else None
        fits = [lay for lay in self.st.viewer.layers if isinstance(lay, Image) and not lc.is_overlay(lay)
                and tuple(lay.data.shape) == vol.image_shape and not any(lc.same_layer(lay, t) for t in taken)]
        for lay in fits:
            if vol.image_source and str(lay.metadata.get("source_path")) == str(vol.image_source):
                return lay
        if read is not None and tuple(np.shape(read[0])) == vol.image_shape:
            return self.st.viewer.add_image(read[0], **read[1])
        return next((lay for lay in fits if lay.name == vol.image_name), None)

    def _restore_more_volumes(self, opened: SessionOpened, main_image: Image, main_labels: Labels,
                              names: tuple[str, ...]) -> None:
        """Bring back the session's more volumes, one layer added per event-loop
        turn (:meth:`RunController.later`): each image (found or added), each
        saved label map as a new labels layer, then their rows ticked. A volume
        whose image is neither open nor readable is skipped and named."""
        sess = opened.session
        images: list[Image | None] = [None] * len(sess.extras)
        labels: list[Labels | None] = [None] * len(sess.extras)

        def find(k: int) -> None:
            images[k] = self._find_extra_image(k, opened, [main_image, *images])

        def add_labels(k: int) -> None:
            vol, image = sess.extras[k], images[k]
            if image is None or vol.labels is None or not lc.layer_in(self.st.viewer, image):
                return
            name = vol.labels_name or f"{image.name} labels"
            if name in self.st.viewer.layers:
                name = f"{name} (session {time.strftime('%H:%M:%S')})"
            labels[k] = lc.add_class_labels(self.st.viewer, vol.labels, name, names, like=image)
            labels[k].n_edit_dimensions = 2

        def tick() -> None:
            dp, ticked, skipped = self.st.data_panel, [], []
            dp.refresh_layers()
            for k, vol in enumerate(sess.extras):
                image = images[k]
                if image is not None and lc.layer_in(self.st.viewer, image) and dp.tick_volume(image, labels[k]):
                    ticked.append(f"'{image.name}'" + (f" with '{labels[k].name}'" if labels[k] is not None else
                                                       " unlabeled"))
                    continue
                why = (opened.extra_errors[k] if k < len(opened.extra_errors) else None) or (
                    "not open and its file was not found" if vol.image_source else "not open (it came from no file)")
                kept = f"; its labels stay in {vol.labels_file}" if vol.labels_file is not None else ""
                skipped.append(f"'{vol.image_name}' ({vol.image_source or 'no file'}, {vol.image_shape}): {why}{kept}")
            if lc.layer_in(self.st.viewer, main_labels):
                self.st.viewer.layers.selection.active = main_labels
            dp.update_info()
            self.st.update_buttons()
            done = f"Session {sess.folder}: {len(ticked)} more volume(s) ticked under Data ▸ More volumes" + (
                f" ({', '.join(ticked)})" if ticked else "")
            if skipped:
                self.st.warn(f"{done}; skipped {'; '.join(skipped)}. Open the image, tick it under Data ▸ More "
                             "volumes and pick its labels.")
            else:
                self.st.status(f"{done}. {dp.info_label.text()}")

        steps = []
        for k in range(len(sess.extras)):
            steps += [lambda k=k: find(k), lambda k=k: add_labels(k)]
        self.st.runner.later("open session: more volumes", *steps, tick)

    def autosave_folder(self) -> Path:
        """Where Train autosaves: the chosen session folder, else ``<run folder>/session``."""
        return self.st.session_folder or self.st.runner.out_dir / "session"

    def show_session_folder(self, autosave_only: bool = False) -> None:
        what = "Session folder (autosave)" if autosave_only else "Session folder"
        self.session_label.setText(breakable(f"{what}: {self.autosave_folder()}"))


def extra_snapshot(image: Image, labels: Labels | None) -> ExtraSnapshot:
    """A ticked More volumes row as plain data: the image's name, file and
    shape and a copy of its labels layer with that layer's geometry (the
    image's where the labels layer has no NIfTI affine/header)."""
    if labels is None:
        return ExtraSnapshot(image.name, tuple(image.data.shape), image.metadata.get("source_path"))
    metadata = {k: labels.metadata.get(k, image.metadata.get(k)) for k in ("affine", "header")
                if k in labels.metadata or k in image.metadata}
    geometry = {"scale": tuple(labels.scale), "translate": tuple(labels.translate), "metadata": metadata}
    return ExtraSnapshot(image.name, tuple(image.data.shape), image.metadata.get("source_path"), labels.name,
                         np.array(labels.data, copy=True), geometry)
