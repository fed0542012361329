"""Session folders in the dock widget: save, autosave, reopen.

:class:`SessionMixin` (mixed into :class:`._widget.M3HLWidget`) writes and
reads a session folder (:mod:`napari_m3hl.session`: the labels with the
image's geometry, the checkpoint, the panel's settings, the run history) in
workers; every Train autosaves the labels to it. Everything here runs in the
GUI thread and only starts workers; an opened session's labels come back as
a new layer, never over an open one.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image
from qtpy.QtWidgets import QFileDialog

from .. import __version__
from ..errors import M3HLInputError
from . import _layers as lc
from ._jobs import SessionOpened, SessionSnapshot
from ._layout import START_MODES
from ._workers import describe_error


class SessionMixin:
    """Save session / Open session / the autosave snapshot (mixed into the dock widget)."""

    # ================================================================ sessions
    def session_settings(self) -> dict[str, Any]:
        """The widget's settings, as saved in a session's ``settings.json``."""
        return {
            "preset": self.preset_combo.currentText(), "variant": self.variant_combo.currentText(),
            "device": self.device_combo.currentText(), "start": self.start_combo.currentText(),
            "start_path": self.start_path.text(), "network": self.which_combo.currentText(),
            "score": self.score_combo.currentText(), "spread": self.spread_check.isChecked(),
            "train_on_iterations": self.train_on_spin.value(),
            "advanced": self.settings(),
        }

    def apply_session_settings(self, values: dict[str, Any]) -> None:
        """Restore :meth:`session_settings` (unknown or missing keys are skipped)."""
        for key, combo in (("preset", self.preset_combo), ("variant", self.variant_combo),
                           ("device", self.device_combo), ("start", self.start_combo),
                           ("network", self.which_combo), ("score", self.score_combo)):
            if values.get(key) and combo.findText(str(values[key])) >= 0:
                combo.setCurrentText(str(values[key]))
        if "start_path" in values:
            self.start_path.setText(str(values["start_path"]))
        if "spread" in values:
            self.spread_check.setChecked(bool(values["spread"]))
        if "train_on_iterations" in values:
            self.train_on_spin.setValue(int(values["train_on_iterations"]))
        adv = dict(values.get("advanced", {}))
        if adv:
            self.show_settings(adv)

    def session_snapshot(self, folder: Path, with_checkpoint: bool) -> SessionSnapshot:
        """Copies of what a session folder holds (GUI thread; the worker writes them)."""
        image, labels = self.image_layer(), self.labels_layer()
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
            "class_names": list(self.current_class_names()),
            "iteration": self.model_iteration,
            "resumable": self.model_resumable,
            "checkpoint_source": self.runner.checkpoint,
            "runs": list(self.run_history),
        }
        geometry = {"scale": tuple(labels.scale), "translate": tuple(labels.translate),
                    "metadata": {k: labels.metadata[k] for k in ("affine", "header") if k in labels.metadata}}
        return SessionSnapshot(folder=Path(folder), labels=np.array(labels.data, dtype=np.uint8, copy=True),
                               geometry=geometry, settings=self.session_settings(), meta=meta,
                               checkpoint=self.runner.checkpoint if with_checkpoint else None)

    def _ask_folder(self, caption: str, start: str) -> str:
        return QFileDialog.getExistingDirectory(self, caption, start)

    def save_session(self, folder: str | Path | None = None) -> bool:
        """Write the session folder (labels, checkpoint, settings, run manifest) in a worker."""
        if folder is None:
            folder = self._ask_folder("Save session to folder", str(self.autosave_folder().parent))
        if not folder:
            return False
        try:
            snap = self.session_snapshot(Path(folder), with_checkpoint=bool(self.runner.checkpoint))
        except M3HLInputError as exc:
            self._error(str(exc))
            return False
        self.session_folder = Path(folder)
        self._show_session_folder()

        def saved(path: str) -> None:
            self._status(f"Session saved to {path}; each Train autosaves the labels there.")

        self.runner.save_session(snap, connect={
            "returned": saved,
            "errored": lambda exc: self._error(describe_error(exc, "Saving the session")),
        })
        return True

    def open_session(self, folder: str | Path | None = None) -> bool:
        """Read a session folder in a worker; its image (opened from its source
        file when not open), labels (a new layer), model and settings come back."""
        if self.runner.training:
            self._error("A training run is going: stop it before opening a session.")
            return False
        if folder is None:
            folder = self._ask_folder("Open session folder", str(self.autosave_folder().parent))
        if not folder:
            return False
        sources = [str(lay.metadata.get("source_path")) for lay in self.viewer.layers
                   if isinstance(lay, Image) and lay.metadata.get("source_path")]
        self._status(f"Opening session {folder}…")
        self.runner.open_session(folder, sources, connect={
            "returned": self._on_session_opened,
            "errored": lambda exc: self._error(describe_error(exc, "Opening the session")),
        })
        return True

    def _find_session_image(self, opened: SessionOpened) -> Image | None:
        meta, shape = opened.session.meta, tuple(opened.session.labels.shape)
        images = [lay for lay in self.viewer.layers if isinstance(lay, Image) and not lc.is_overlay(lay)]
        src = meta.get("image_source")
        for lay in images:
            if src and str(lay.metadata.get("source_path")) == str(src) and tuple(lay.data.shape) == shape:
                return lay
        if opened.image is not None:
            data, kwargs, _ = opened.image
            if tuple(np.shape(data)) == shape:
                return self.viewer.add_image(data, **kwargs)
        for lay in [self.image_layer()] + [lay for lay in images if lay.name == meta.get("image_name")]:
            if lay is not None and tuple(lay.data.shape) == shape:
                return lay
        return None

    def _on_session_opened(self, opened: SessionOpened) -> None:
        sess, meta = opened.session, opened.session.meta
        image = self._find_session_image(opened)
        if image is None:
            self._error(
                f"Session {sess.folder}: its image '{meta.get('image_name')}' ({meta.get('image_source') or 'no file'}) "
                f"is not open and its file was not found. Open an image of shape {tuple(sess.labels.shape)}, select it "
                "under Data ▸ Image and press Open session… again."
            )
            return
        names = tuple(meta.get("class_names") or self.current_class_names())
        name = meta.get("labels_name") or f"{image.name} labels"
        if name in self.viewer.layers:
            name = f"{name} (session {time.strftime('%H:%M:%S')})"
        labels = lc.add_class_labels(self.viewer, sess.labels, name, names, like=image)
        labels.n_edit_dimensions = 2
        self.image_combo.setCurrentText(image.name)
        self.labels_combo.setCurrentText(labels.name)
        self.apply_session_settings(sess.settings)
        self.session_folder = sess.folder
        self.run_history = list(meta.get("runs", []))
        self.suggestions = None
        self.refresh_suggestions()
        self._show_session_folder()
        if sess.checkpoint is not None:
            self.runner.checkpoint = str(sess.checkpoint)
            self.model_iteration = int(meta.get("iteration", 0))
            self.model_resumable = bool(meta.get("resumable", False))
            self.model_is_fewslice = bool(self.run_history) and self.run_history[-1].get("kind") == "few-slice"
            self.start_path.setText(str(sess.checkpoint))
            self.start_combo.setCurrentIndex(START_MODES.index("Fine-tune from file"))
        self.viewer.layers.selection.active = labels
        self.update_info()
        self._update_buttons()
        what = (f"model at iteration {self.model_iteration} (Train on continues it)" if sess.checkpoint and
                self.model_resumable else "model" if sess.checkpoint else "no model")
        if sess.checkpoint is not None and self.auto_predict:
            self.predict(image=image)
        self._status(f"Session {sess.folder} opened: '{labels.name}' on '{image.name}', {what}. "
                     f"{self.info_label.text()}")
