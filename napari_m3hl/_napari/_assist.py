"""The annotation loop of the dock widget: suggest, accept, train on, sessions.

:class:`AssistMixin` adds the "Annotate" and "Session" groups' behaviour to
:class:`._widget.M3HLWidget`:

* **Suggest slices** scores every slice of the image (the frame in view for a
  cine) by how unsure the latest model is (:mod:`napari_m3hl.suggest`, in a
  worker) and lists the unlabeled ones, most uncertain first; **Next
  suggested slice** and a click on the list move the viewer there; **Show
  M³HL disagreement** overlays where student and teacher differ.
* **Accept slice** copies 'M³HL segmentation' of the slice in view into the
  user's labels layer as one undoable edit (napari's history).
* **Train on** resumes the last run (weights, teacher, optimiser) with the
  labels as they are now, for more iterations.
* **Save / Open session** (:class:`._sessions.SessionMixin`) write and read
  a session folder (:mod:`napari_m3hl.session`) in workers; every Train
  autosaves the labels to the session folder (``<run folder>/session`` until
  one is chosen, :meth:`AssistMixin.autosave_folder`) and copies the run's
  checkpoint there when the run ends.

Everything here runs in the GUI thread and only starts workers; the user's
labels are written by Accept slice only, never by training.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QListWidgetItem

from . import _layers as lc
from . import _overlays as ov
from ._layout import SUGGEST_SCORES
from ._picker import breakable
from ._slots import on_signal
from ._workers import describe_error


@dataclass
class Suggestions:
    """The latest slice analysis and what it was computed for.

    ``image``: the layer analysed; ``frame``: its time frame (None for a 3D
    image); ``analysis``: :class:`napari_m3hl.suggest.SliceAnalysis`;
    ``checkpoint``: the model file used.
    """

    image: Image
    frame: int | None
    analysis: Any
    checkpoint: str

    def key(self, z: int) -> tuple[int, ...]:
        """Slice index in the image layer for slice ``z`` of the analysed frame."""
        return (z,) if self.frame is None else (self.frame, z)


class AssistMixin:
    """Suggest / accept / train on / sessions (mixed into the dock widget)."""

    # ---------------------------------------------------------------- set-up
    def _init_assist(self) -> None:
        self.suggestions: Suggestions | None = None
        self._last_next: int | None = None
        self.auto_suggest = True
        self.session_folder: Path | None = None  # chosen by Save / Open session
        self.model_iteration = 0  # iteration of session.checkpoint
        self.model_resumable = False  # session.checkpoint holds optimiser state
        self.model_is_fewslice = False  # the model comes from a few-slice fine-tune (Train on fine-tunes it again)
        self.run_history: list[dict[str, Any]] = []  # the session's run manifest
        on_signal(self.suggest_btn.clicked, self.suggest)
        on_signal(self.next_btn.clicked, self.next_suggested)
        on_signal(self.accept_btn.clicked, self.accept_slice)
        on_signal(self.train_on_btn.clicked, self.train_on)
        on_signal(self.disagree_check.toggled, self._show_disagreement)
        on_signal(self.spread_check.toggled, self.refresh_suggestions)
        on_signal(self.suggest_list.itemClicked, self._on_suggestion_clicked)
        on_signal(self.save_session_btn.clicked, self.save_session)
        on_signal(self.open_session_btn.clicked, self.open_session)

    def _update_assist_buttons(self) -> None:
        has_model = bool(self.runner.checkpoint)
        training = self.runner.training
        self.suggest_btn.setEnabled(has_model)
        self.next_btn.setEnabled(self.suggestions is not None)
        self.accept_btn.setEnabled(lc.SEGMENTATION in self.viewer.layers)
        self.train_on_btn.setEnabled(has_model and self.model_resumable and not training)
        self.save_session_btn.setEnabled(self.labels_layer() is not None)
        self.disagree_check.setEnabled(self.suggestions is None or self.suggestions.analysis.disagreement is not None)

    def autosave_folder(self) -> Path:
        """Where Train autosaves: the chosen session folder, else ``<run folder>/session``."""
        return self.session_folder or self.runner.out_dir / "session"

    def _show_session_folder(self, autosave_only: bool = False) -> None:
        what = "Session folder (autosave)" if autosave_only else "Session folder"
        self.session_label.setText(breakable(f"{what}: {self.autosave_folder()}"))

    # ================================================================ suggest
    def suggest(self, image: Image | None = None) -> bool:
        """Score the slices of ``image`` (default: the selected one; the frame in
        view for a cine) with the latest model, in a worker."""
        image = image or self.image_layer()
        if image is None or image.rgb or image.ndim not in (3, 4):
            self._error("Suggest slices needs an image volume (Z, Y, X) or cine (T, Z, Y, X).")
            return False
        if not self.runner.checkpoint:
            self._error("No model yet: train first (or load a checkpoint), then press Suggest slices.")
            return False
        frame = lc.slice_in_view(self.viewer, image)[0] if image.ndim == 4 else None
        volume = np.asarray(image.data if frame is None else image.data[frame])  # a view: the job converts it
        method = self.score_combo.currentText()
        which = self.which_combo.currentText()
        ckpt = self.runner.checkpoint
        self.suggest_btn.setEnabled(False)
        self._status(f"Scoring the slices of '{image.name}' by {method} ({which})…")

        def done(analysis: Any) -> None:
            if (analysis.method, analysis.network) != (method, which):
                self._warn(f"The model has no teacher; slices are ranked by the student's {analysis.method} "
                           f"instead of the {which}'s {method}.")
            self._on_analysis(Suggestions(image, frame, analysis, ckpt))

        self.runner.analyse(volume, method, device=self.device_combo.currentText(), which=which, connect={
            "returned": done,
            "errored": lambda exc: self._error(describe_error(exc, "Suggesting slices", 8, ckpt)),
            "finished": self._update_buttons,
        })
        return True

    def _on_analysis(self, sugg: Suggestions) -> None:
        if not lc.layer_in(self.viewer, sugg.image):
            return
        self.suggestions = sugg
        self.refresh_suggestions()
        self._show_disagreement()
        ranked = self.ranked_slices()
        if ranked:
            top = ", ".join(f"{z} ({sugg.analysis.scores[z]:.2f})" for z in ranked[:3])
            self._status(f"Most uncertain unlabeled slices of '{sugg.image.name}' by {sugg.analysis.method}: {top}. "
                         "Next suggested slice goes there.")
        else:
            self._status(f"Every slice of '{sugg.image.name}' is labeled.")
        self._update_buttons()

    def _labeled_in_frame(self) -> set[int]:
        sugg, labels = self.suggestions, self.labels_layer()
        if sugg is None or labels is None or tuple(labels.data.shape) != tuple(sugg.image.data.shape):
            return set()
        lab = np.asarray(labels.data if sugg.frame is None else labels.data[sugg.frame])
        return {int(z) for z in lc.labeled_slices(lab)}

    def ranked_slices(self) -> list[int]:
        """Unlabeled slices (of the analysed frame), most uncertain first."""
        if self.suggestions is None:
            return []
        return self.suggestions.analysis.ranking(self._labeled_in_frame(), self.spread_check.isChecked())

    def refresh_suggestions(self) -> None:
        """Refill the ranking list (labeled slices drop out as they are painted or accepted)."""
        self.suggest_list.clear()
        sugg = self.suggestions
        if sugg is None:
            return
        for z in self.ranked_slices():
            item = QListWidgetItem(f"{lc.slice_key_text(sugg.key(z))}  ·  {sugg.analysis.method} "
                                   f"{sugg.analysis.scores[z]:.3f}")
            item.setData(Qt.UserRole, z)
            self.suggest_list.addItem(item)

    def _on_suggestion_clicked(self) -> None:
        """Go to the slice of the list entry clicked (the list's current item)."""
        item = self.suggest_list.currentItem()
        if item is not None and self.suggestions is not None and lc.layer_in(self.viewer, self.suggestions.image):
            lc.go_to_slice(self.viewer, self.suggestions.image, self.suggestions.key(int(item.data(Qt.UserRole))))

    def next_suggested(self) -> int | None:
        """Go to the most uncertain unlabeled slice (the next one in the ranking
        when the viewer already shows it). Returns its index, or None."""
        sugg = self.suggestions
        if sugg is None or not lc.layer_in(self.viewer, sugg.image):
            self._error("No suggestions yet: press Suggest slices (after training) first.")
            return None
        ranked = self.ranked_slices()
        if not ranked:
            self._status("Every slice is labeled: press Train on, or Predict and Export.")
            return None
        here = lc.slice_in_view(self.viewer, sugg.image)
        here_z = here[-1] if sugg.frame is None or here[0] == sugg.frame else None
        if here_z is not None and here_z == self._last_next and here_z in ranked:
            z = ranked[(ranked.index(here_z) + 1) % len(ranked)]  # pressed again: the next one down
        else:
            z = ranked[0]
        self._last_next = z
        lc.go_to_slice(self.viewer, sugg.image, sugg.key(z))
        rank = ranked.index(z) + 1
        self._status(f"{lc.slice_key_text(sugg.key(z)).capitalize()}: suggestion {rank} of {len(ranked)} "
                     f"({sugg.analysis.method} {sugg.analysis.scores[z]:.3f}). Check 'M³HL segmentation' here, fix it "
                     "if needed, then Accept slice.")
        return z

    def _show_disagreement(self) -> None:
        sugg = self.suggestions
        want = self.disagree_check.isChecked()
        if lc.DISAGREEMENT in self.viewer.layers:
            self.viewer.layers[lc.DISAGREEMENT].visible = want
        if not want or sugg is None or sugg.analysis.disagreement is None:
            return
        if not lc.layer_in(self.viewer, sugg.image):
            return
        data = sugg.analysis.disagreement
        if sugg.frame is not None:
            full = np.zeros(sugg.image.data.shape, np.uint8)
            full[sugg.frame] = data
            data = full
        ov.show_disagreement(self.viewer, sugg.image, data).visible = True

    # ================================================================ accept
    def accept_slice(self, index: tuple[int, ...] | None = None) -> bool:
        """Copy 'M³HL segmentation' of the slice in view (or ``index``) into the
        user's labels layer: one undoable edit; the slice then counts as labeled."""
        labels = self.labels_layer()
        if labels is None:
            self._error("No labels layer to accept into: choose yours under Data ▸ Labels (or New labels layer).")
            return False
        if lc.SEGMENTATION not in self.viewer.layers:
            self._error("Nothing to accept: train or press Predict first to make 'M³HL segmentation'.")
            return False
        seg = self.viewer.layers[lc.SEGMENTATION]
        if tuple(seg.data.shape) != tuple(labels.data.shape):
            self._error(f"'{lc.SEGMENTATION}' {tuple(seg.data.shape)} and labels '{labels.name}' "
                        f"{tuple(labels.data.shape)} differ in shape: press Predict for this image first.")
            return False
        index = tuple(index) if index is not None else lc.slice_in_view(self.viewer, labels)
        values = np.asarray(seg.data[index])
        name = lc.slice_key_text(index)
        if not values.any():
            self._error(f"The segmentation of {name} is empty; nothing to accept (an empty slice does not count "
                        f"as labeled). Paint it in '{labels.name}' if the heart is there.")
            return False
        hi = int(values.max())
        n_classes = len(self.current_class_names())
        if hi >= n_classes:
            self._error(f"'{lc.SEGMENTATION}' holds label {hi} on {name}, beyond the preset's {n_classes} classes; "
                        "fix it before accepting.")
            return False
        changed = lc.accept_slice(labels, index, values)
        self.viewer.layers.selection.active = labels  # so that Ctrl+Z undoes the accept right away
        self.update_info()
        if changed:
            self._status(f"Accepted {name} into '{labels.name}' ({changed} pixels changed; Ctrl+Z on the layer "
                         f"undoes it). {self.info_label.text()}")
        else:
            self._status(f"{name.capitalize()} of '{labels.name}' already equals the segmentation.")
        return True

    # ================================================================ train on
    def train_on(self) -> bool:
        """Continue the last run (weights, teacher, optimiser) with the current labels; after a
        few-slice fine-tune, fine-tune its model again for the Train on iterations."""
        if self.runner.training:
            self._error("A training run is going: stop it before Train on.")
            return False
        if not self.runner.checkpoint or not self.model_resumable:
            self._error("Train on continues a run of this session (or of an opened session): there is none yet. "
                        "Press Train first; a loaded model file has no optimiser state to continue.")
            return False
        if self.model_is_fewslice:
            # a few-slice run: fine-tune its model again on the labels as they are now
            return self.start_fewslice(self.runner.checkpoint, self.train_on_spin.value(), continued=True)
        total = self.model_iteration + self.train_on_spin.value()
        return self.start_training(resume_from=self.runner.checkpoint, iterations=total)


__all__ = ["AssistMixin", "Suggestions", "SUGGEST_SCORES"]
