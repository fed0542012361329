"""The Annotate panel of the dock widget: suggest, accept, train on.

:class:`AnnotatePanel` (on the shared :class:`napari_m3hl._napari.panels.state.PanelState`) is the
annotation loop:

* **Suggest slices** scores every slice of the image (the frame in view for a
  cine) by how unsure the latest model is (:mod:`napari_m3hl.fewslice.suggest`, in a
  worker) and lists the unlabeled ones, most uncertain first; **Next
  suggested slice** and a click on the list move the viewer there; **Show
  M³HL disagreement** overlays where student and teacher differ.
* **Accept slice** copies 'M³HL segmentation' of the slice in view into the
  user's labels layer as one undoable edit (napari's history).
* **Train on** resumes the last run (weights, teacher, optimiser) with the
  labels as they are now, for more iterations.
* Sessions (save, open, autosave) are the Session panel's
  (:class:`napari_m3hl._napari.panels.session.SessionPanel`).

Everything here runs in the GUI thread and only starts workers; the user's
labels are written by Accept slice only, never by training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from napari.layers import Image
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QCheckBox, QComboBox, QGroupBox, QLabel, QListWidget, QListWidgetItem, QPushButton, \
    QVBoxLayout

from napari_m3hl._napari.layers import control as lc
from napari_m3hl._napari.layers import overlays as ov
from napari_m3hl.fewslice.suggest import DEFAULT_METHOD, DEFAULT_SPREAD
from napari_m3hl._napari.panels.layout import SUGGEST_SCORES, TRAIN_ON_ITERATIONS, row, spin
from napari_m3hl._napari.panels.slots import on_signal
from napari_m3hl._napari.panels.state import PanelState
from napari_m3hl._napari.run.workers import describe_error


@dataclass
class Suggestions:
    """The latest slice analysis and what it was computed for.

    ``image``: the layer analysed; ``frame``: its time frame (None for a 3D
    image); ``analysis``: :class:`napari_m3hl.fewslice.suggest.SliceAnalysis`;
    ``checkpoint``: the model file used.
    """

    image: Image
    frame: int | None
    analysis: Any
    checkpoint: str

    def key(self, z: int) -> tuple[int, ...]:
        """Slice index in the image layer for slice ``z`` of the analysed frame."""
        return (z,) if self.frame is None else (self.frame, z)


class AnnotatePanel(QGroupBox):
    """Annotate: Score, Suggest slices, the suggestion list, Next / Accept, disagreement, Train on."""

    def __init__(self, st: PanelState) -> None:
        super().__init__("Annotate")
        self.st = st
        lay = QVBoxLayout(self)
        self.score_combo = QComboBox()
        self.score_combo.addItems(SUGGEST_SCORES)
        self.score_combo.setCurrentText(DEFAULT_METHOD)
        self.score_combo.setToolTip(
            "How unsure the model is about a slice: entropy of the prediction of the Network that segments "
            "(student or teacher), share of pixels where student and teacher disagree, or 1 − margin between "
            "the two likeliest classes (over that network's heart region)"
        )
        self.suggest_btn = QPushButton("Suggest slices")
        self.suggest_btn.setToolTip("Rank the unlabeled slices of the image by how unsure the model is")
        self.suggest_list = QListWidget()
        self.suggest_list.setToolTip("Unlabeled slices, most uncertain first; click one to go there")
        self.suggest_list.setMaximumHeight(84)
        self.next_btn = QPushButton("Next suggested slice")
        self.next_btn.setToolTip("Go to the most uncertain slice that is still unlabeled")
        self.accept_btn = QPushButton("Accept slice")
        self.accept_btn.setToolTip(
            "Copy the segmentation of the slice in view into your labels layer (one undoable edit, Ctrl+Z); "
            "the slice then counts as labeled. Fix it first in 'M³HL segmentation' or afterwards in your labels."
        )
        self.spread_check = QCheckBox("Away from labeled slices")
        self.spread_check.setChecked(DEFAULT_SPREAD)
        self.spread_check.setToolTip(
            "Rank by uncertainty × distance (in slices) to the nearest labeled slice, so that a slice next to "
            "one you already labeled gives way to an uncertain slice farther off"
        )
        self.disagree_check = QCheckBox("Show M³HL disagreement")
        self.disagree_check.setToolTip("Overlay the pixels where the student's and the teacher's labels differ")
        self.train_on_spin = spin(1, 1_000_000, TRAIN_ON_ITERATIONS, 50, "Iterations added by Train on")
        self.train_on_btn = QPushButton("Train on")
        self.train_on_btn.setToolTip(
            "Continue the last run with your current labels: same weights, teacher and optimiser, more iterations"
        )
        lay.addWidget(row(QLabel("Score"), self.score_combo, self.suggest_btn))
        lay.addWidget(self.spread_check)
        lay.addWidget(self.suggest_list)
        lay.addWidget(row(self.next_btn, self.accept_btn))
        lay.addWidget(self.disagree_check)
        lay.addWidget(row(self.train_on_btn, QLabel("+"), self.train_on_spin, QLabel("iterations")))
        on_signal(self.suggest_btn.clicked, self.suggest)
        on_signal(self.next_btn.clicked, self.next_suggested)
        on_signal(self.accept_btn.clicked, self.accept_slice)
        on_signal(self.train_on_btn.clicked, self.train_on)
        on_signal(self.disagree_check.toggled, self._show_disagreement)
        on_signal(self.spread_check.toggled, self.refresh_suggestions)
        on_signal(self.suggest_list.itemClicked, self._on_suggestion_clicked)

    def update_buttons(self) -> None:
        self._update_assist_buttons()

    def set_running(self, running: bool, paused: bool = False) -> None:
        self.train_on_btn.setEnabled(not running)

    def _update_assist_buttons(self) -> None:
        has_model = bool(self.st.runner.checkpoint)
        training = self.st.runner.training
        self.suggest_btn.setEnabled(has_model)
        self.next_btn.setEnabled(self.st.suggestions is not None)
        self.accept_btn.setEnabled(lc.SEGMENTATION in self.st.viewer.layers)
        self.train_on_btn.setEnabled(has_model and self.st.model_resumable and not training)
        self.disagree_check.setEnabled(self.st.suggestions is None or self.st.suggestions.analysis.disagreement is not None)

    def suggest(self, image: Image | None = None) -> bool:
        """Score the slices of ``image`` (default: the selected one; the frame in
        view for a cine) with the latest model, in a worker."""
        image = image or self.st.data_panel.image_layer()
        if image is None or image.rgb or image.ndim not in (3, 4):
            self.st.error("Suggest slices needs an image volume (Z, Y, X) or cine (T, Z, Y, X).")
            return False
        if not self.st.runner.checkpoint:
            self.st.error("No model yet: train first (or load a checkpoint), then press Suggest slices.")
            return False
        frame = lc.slice_in_view(self.st.viewer, image)[0] if image.ndim == 4 else None
        volume = np.asarray(image.data if frame is None else image.data[frame])  # a view: the job converts it
        method = self.score_combo.currentText()
        which = self.st.run_panel.which_combo.currentText()
        ckpt = self.st.runner.checkpoint
        self.suggest_btn.setEnabled(False)
        self.st.status(f"Scoring the slices of '{image.name}' by {method} ({which})…")

        def done(analysis: Any) -> None:
            if (analysis.method, analysis.network) != (method, which):
                self.st.warn(f"The model has no teacher; slices are ranked by the student's {analysis.method} "
                           f"instead of the {which}'s {method}.")
            self.on_analysis(Suggestions(image, frame, analysis, ckpt))

        self.st.runner.analyse(volume, method, device=self.st.model_panel.device_combo.currentText(), which=which, connect={
            "returned": done,
            "errored": lambda exc: self.st.error(describe_error(exc, "Suggesting slices", 8, ckpt)),
            "finished": self.st.update_buttons,
        })
        return True

    def on_analysis(self, sugg: Suggestions) -> None:
        if not lc.layer_in(self.st.viewer, sugg.image):
            return
        self.st.suggestions = sugg
        self.refresh_suggestions()
        self._show_disagreement()
        ranked = self.ranked_slices()
        if ranked:
            top = ", ".join(f"{z} ({sugg.analysis.scores[z]:.2f})" for z in ranked[:3])
            self.st.status(f"Most uncertain unlabeled slices of '{sugg.image.name}' by {sugg.analysis.method}: {top}. "
                         "Next suggested slice goes there.")
        else:
            self.st.status(f"Every slice of '{sugg.image.name}' is labeled.")
        self.st.update_buttons()

    def _labeled_in_frame(self) -> set[int]:
        sugg, labels = self.st.suggestions, self.st.data_panel.labels_layer()
        if sugg is None or labels is None or tuple(labels.data.shape) != tuple(sugg.image.data.shape):
            return set()
        lab = np.asarray(labels.data if sugg.frame is None else labels.data[sugg.frame])
        return {int(z) for z in lc.labeled_slices(lab)}

    def ranked_slices(self) -> list[int]:
        """Unlabeled slices (of the analysed frame), most uncertain first."""
        if self.st.suggestions is None:
            return []
        return self.st.suggestions.analysis.ranking(self._labeled_in_frame(), self.spread_check.isChecked())

    def refresh_suggestions(self) -> None:
        """Refill the ranking list (labeled slices drop out as they are painted or accepted)."""
        self.suggest_list.clear()
        sugg = self.st.suggestions
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
        if item is not None and self.st.suggestions is not None and lc.layer_in(self.st.viewer, self.st.suggestions.image):
            lc.go_to_slice(self.st.viewer, self.st.suggestions.image, self.st.suggestions.key(int(item.data(Qt.UserRole))))

    def next_suggested(self) -> int | None:
        """Go to the most uncertain unlabeled slice (the next one in the ranking
        when the viewer already shows it). Returns its index, or None."""
        sugg = self.st.suggestions
        if sugg is None or not lc.layer_in(self.st.viewer, sugg.image):
            self.st.error("No suggestions yet: press Suggest slices (after training) first.")
            return None
        ranked = self.ranked_slices()
        if not ranked:
            self.st.status("Every slice is labeled: press Train on, or Predict and Export.")
            return None
        here = lc.slice_in_view(self.st.viewer, sugg.image)
        here_z = here[-1] if sugg.frame is None or here[0] == sugg.frame else None
        if here_z is not None and here_z == self.st.last_next and here_z in ranked:
            z = ranked[(ranked.index(here_z) + 1) % len(ranked)]  # pressed again: the next one down
        else:
            z = ranked[0]
        self.st.last_next = z
        lc.go_to_slice(self.st.viewer, sugg.image, sugg.key(z))
        rank = ranked.index(z) + 1
        self.st.status(f"{lc.slice_key_text(sugg.key(z)).capitalize()}: suggestion {rank} of {len(ranked)} "
                     f"({sugg.analysis.method} {sugg.analysis.scores[z]:.3f}). Check 'M³HL segmentation' here, fix it "
                     "if needed, then Accept slice.")
        return z

    def _show_disagreement(self) -> None:
        sugg = self.st.suggestions
        want = self.disagree_check.isChecked()
        if lc.DISAGREEMENT in self.st.viewer.layers:
            self.st.viewer.layers[lc.DISAGREEMENT].visible = want
        if not want or sugg is None or sugg.analysis.disagreement is None:
            return
        if not lc.layer_in(self.st.viewer, sugg.image):
            return
        data = sugg.analysis.disagreement
        if sugg.frame is not None:
            full = np.zeros(sugg.image.data.shape, np.uint8)
            full[sugg.frame] = data
            data = full
        ov.show_disagreement(self.st.viewer, sugg.image, data).visible = True

    def accept_slice(self, index: tuple[int, ...] | None = None) -> bool:
        """Copy 'M³HL segmentation' of the slice in view (or ``index``) into the
        user's labels layer: one undoable edit; the slice then counts as labeled."""
        labels = self.st.data_panel.labels_layer()
        if labels is None:
            self.st.error("No labels layer to accept into: choose yours under Data ▸ Labels (or New labels layer).")
            return False
        if lc.SEGMENTATION not in self.st.viewer.layers:
            self.st.error("Nothing to accept: train or press Predict first to make 'M³HL segmentation'.")
            return False
        seg = self.st.viewer.layers[lc.SEGMENTATION]
        if tuple(seg.data.shape) != tuple(labels.data.shape):
            self.st.error(f"'{lc.SEGMENTATION}' {tuple(seg.data.shape)} and labels '{labels.name}' "
                        f"{tuple(labels.data.shape)} differ in shape: press Predict for this image first.")
            return False
        index = tuple(index) if index is not None else lc.slice_in_view(self.st.viewer, labels)
        values = np.asarray(seg.data[index])
        name = lc.slice_key_text(index)
        if not values.any():
            self.st.error(f"The segmentation of {name} is empty; nothing to accept (an empty slice does not count "
                        f"as labeled). Paint it in '{labels.name}' if the heart is there.")
            return False
        hi = int(values.max())
        n_classes = len(self.st.model_panel.current_class_names())
        if hi >= n_classes:
            self.st.error(f"'{lc.SEGMENTATION}' holds label {hi} on {name}, beyond the preset's {n_classes} classes; "
                        "fix it before accepting.")
            return False
        changed = lc.accept_slice(labels, index, values)
        self.st.viewer.layers.selection.active = labels  # so that Ctrl+Z undoes the accept right away
        self.st.data_panel.update_info()
        if changed:
            self.st.status(f"Accepted {name} into '{labels.name}' ({changed} pixels changed; Ctrl+Z on the layer "
                         f"undoes it). {self.st.data_panel.info_label.text()}")
        else:
            self.st.status(f"{name.capitalize()} of '{labels.name}' already equals the segmentation.")
        return True

    def train_on(self) -> bool:
        """Continue the last run (weights, teacher, optimiser) with the current labels; after a
        few-slice fine-tune, fine-tune its model again for the Train on iterations."""
        if self.st.runner.training:
            self.st.error("A training run is going: stop it before Train on.")
            return False
        if not self.st.runner.checkpoint or not self.st.model_resumable:
            self.st.error("Train on continues a run of this session (or of an opened session): there is none yet. "
                        "Press Train first; a loaded model file has no optimiser state to continue.")
            return False
        if self.st.model_is_fewslice:
            # a few-slice run: fine-tune its model again on the labels as they are now
            return self.st.fine_tune.start_fewslice(self.st.runner.checkpoint, self.train_on_spin.value(), continued=True)
        total = self.st.model_iteration + self.train_on_spin.value()
        return self.st.run_panel.start_training(resume_from=self.st.runner.checkpoint, iterations=total)
