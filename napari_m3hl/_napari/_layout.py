"""Layout of the "Train M³HL" dock widget: controls only, no behaviour.

:class:`TrainWidgetLayout` builds and names every control; the behaviour
(layer control, workers) lives in :mod:`._widget`, :mod:`._layers` and
:mod:`._run`. Settings are read back with :meth:`TrainWidgetLayout.settings`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractSpinBox,
    QCheckBox,
    QComboBox,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)
from napari.layers import Image, Labels
from superqt import QCollapsible

from ..suggest import DEFAULT_METHOD, DEFAULT_SPREAD, METHODS
from ._advanced import AdvancedForm
from ._plot import LossPlot

START_MODES = ("From scratch", "Fine-tune from file", "Resume checkpoint")
DEVICES = ("auto", "cuda", "mps", "cpu")
VARIANTS = ("paper", "reference", "fast")
#: Slice suggestion scores (napari_m3hl.suggest.METHODS); the default is ``suggest.DEFAULT_METHOD``.
SUGGEST_SCORES = METHODS
TRAIN_ON_ITERATIONS = 200
DEFAULT_CARDIAC_MODEL = "acdc70_unet2d.pt"
KEEP_START = "Use the start model's segmentation"
USE_TUNED = "Use the fine-tuned segmentation"


def default_cardiac_model() -> Path | None:
    """The shipped 2D U-Net trained on all 70 ACDC training patients, if installed."""
    from ..config import MODELS_DIR

    path = MODELS_DIR / DEFAULT_CARDIAC_MODEL
    return path if path.is_file() else None


def _spin(lo: int, hi: int, value: int, step: int = 1, tip: str = "") -> QSpinBox:
    w = QSpinBox()
    w.setRange(lo, hi)
    w.setSingleStep(step)
    w.setValue(value)
    w.setToolTip(tip)
    w.setButtonSymbols(QAbstractSpinBox.NoButtons)
    w.setStyleSheet("QAbstractSpinBox { min-width: 48px; }")  # napari's theme asks for more
    return w


def layer_picker(kind: type, tip: str) -> Any:
    """A magicgui combo box of ``kind`` layers (``create_widget(annotation=kind)``,
    the picker napari's own plugin widgets use). Its choices are set by the
    panel (:class:`._picker.LayerPickerWidget`), which filters them, and
    refreshed by ``reset_choices``: napari calls the dock widget's
    ``reset_choices`` whenever layers are added, removed, moved or renamed."""
    from magicgui.widgets import create_widget

    picker = create_widget(annotation=kind, options={"choices": ()})
    picker.native.setToolTip(tip)
    return picker


def _row(*widgets: QWidget) -> QWidget:
    box = QWidget()
    lay = QHBoxLayout(box)
    lay.setContentsMargins(0, 0, 0, 0)
    for w in widgets:
        lay.addWidget(w)
    return box


class TrainWidgetLayout(QWidget):
    """All controls of the dock widget, grouped Data / Model / Run."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        content = QWidget()
        root = QVBoxLayout(content)
        root.setContentsMargins(6, 6, 6, 6)
        root.addWidget(self._data_group())
        root.addWidget(self._model_group())
        root.addWidget(self._run_group())
        root.addWidget(self._annotate_group())
        root.addWidget(self._session_group())
        root.addStretch(1)
        # scrollable, so the dock fits small screens and the Advanced section can open
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.NoFrame)
        scroll.setWidget(content)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)
        for combo in content.findChildren(QComboBox):  # long layer names must not widen the dock
            combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(8)
        self.setMinimumWidth(content.minimumSizeHint().width() + scroll.verticalScrollBar().sizeHint().width())
        self.content = content
        self.scroll = scroll

    # ----------------------------------------------------------------- data
    def _data_group(self) -> QGroupBox:
        box = QGroupBox("Data")
        form = QFormLayout(box)
        # magicgui layer pickers (their choices: :mod:`._picker`); the native combos are laid out
        self.image_picker = layer_picker(Image, "The cardiac MR volume (Z, Y, X) or cine (T, Z, Y, X) to segment")
        self.labels_picker = layer_picker(
            Labels, "Your painted labels on the image's grid; only slices with paint are used as labeled")
        self.image_combo: QComboBox = self.image_picker.native
        self.labels_combo: QComboBox = self.labels_picker.native
        self.new_labels_btn = QPushButton("New labels layer")
        self.new_labels_btn.setToolTip(
            "An empty labels layer matched to the image (shape, voxel size, geometry, RV/Myo/LV colours)"
        )
        self.extra_list = QListWidget()
        self.extra_list.setToolTip("Tick other image volumes to add their slices as unlabeled training data")
        self.extra_list.setMaximumHeight(48)
        self.info_label = QLabel("no image volume selected")
        self.info_label.setWordWrap(True)
        self.info_label.setObjectName("m3hl_info")
        form.addRow("Image", self.image_combo)
        form.addRow("Labels", self.labels_combo)
        form.addRow("", self.new_labels_btn)
        form.addRow("Extra unlabeled", self.extra_list)
        form.addRow(self.info_label)
        return box

    # ----------------------------------------------------------------- model
    def _model_group(self) -> QGroupBox:
        box = QGroupBox("Model")
        lay = QVBoxLayout(box)
        form = QFormLayout()
        self.preset_combo = QComboBox()
        self.preset_combo.setToolTip("Training preset (models/*.yaml); the 2D ACDC U-Net fits cardiac short-axis MR")
        self.start_combo = QComboBox()
        self.start_combo.addItems(START_MODES)
        self.start_combo.setToolTip(
            "From scratch: random weights. Fine-tune: start from a checkpoint's or model file's weights. "
            "Resume: continue a stopped run (weights, optimiser, iteration)."
        )
        self.start_path = QLineEdit()
        self.start_path.setPlaceholderText("checkpoint or model file (.pt)")
        default_model = default_cardiac_model()
        if default_model is not None:  # cardiac MR: fine-tune the shipped 70-patient ACDC model by default
            self.start_combo.setCurrentIndex(1)
            self.start_path.setText(str(default_model))
        self.browse_btn = QPushButton("Browse…")
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        self.device_combo.setToolTip("auto: CUDA GPU, then Apple MPS, then CPU")
        form.addRow("Preset", self.preset_combo)
        form.addRow("Start", self.start_combo)
        form.addRow("", _row(self.start_path, self.browse_btn))
        form.addRow("Device", self.device_combo)
        lay.addLayout(form)

        self.advanced = QCollapsible("Advanced")
        adv = QWidget()
        aform = QFormLayout(adv)
        aform.setContentsMargins(0, 0, 0, 0)
        self.variant_combo = QComboBox()
        self.variant_combo.addItems(VARIANTS)
        self.variant_combo.setToolTip("paper: settings of the M³HL paper; reference: the authors' released code; "
                                      "fast: the paper's method with a supervised warm start and poly decay "
                                      "(the ACDC preset's default, measured on ACDC: docs/benchmarks.md)")
        self.advanced_form = AdvancedForm()
        aform.addRow("Variant", self.variant_combo)
        aform.addRow(self.advanced_form)
        self.advanced.addWidget(adv)
        lay.addWidget(self.advanced)
        return box

    # ----------------------------------------------------------------- run
    def _run_group(self) -> QGroupBox:
        box = QGroupBox("Run")
        lay = QVBoxLayout(box)
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
                                   "slices you painted are written exactly as painted")
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
        lay.addWidget(_row(self.train_btn, self.pause_btn, self.resume_btn, self.stop_btn))
        lay.addWidget(self.progress)
        lay.addWidget(self.progress_label)
        lay.addWidget(_row(self.loss_plot, self.quality_label))
        lay.addWidget(self.verdict_label)
        lay.addWidget(self.keep_start_btn)
        lay.addWidget(_row(QLabel("Network"), self.which_combo, self.predict_btn, self.export_btn))
        lay.addWidget(self.prediction_only_check)
        lay.addWidget(_row(self.save_ckpt_btn, self.load_ckpt_btn))
        lay.addWidget(self.status_label)
        return box

    # ----------------------------------------------------------------- annotate
    def _annotate_group(self) -> QGroupBox:
        box = QGroupBox("Annotate")
        lay = QVBoxLayout(box)
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
        self.train_on_spin = _spin(1, 1_000_000, TRAIN_ON_ITERATIONS, 50, "Iterations added by Train on")
        self.train_on_btn = QPushButton("Train on")
        self.train_on_btn.setToolTip(
            "Continue the last run with your current labels: same weights, teacher and optimiser, more iterations"
        )
        lay.addWidget(_row(QLabel("Score"), self.score_combo, self.suggest_btn))
        lay.addWidget(self.spread_check)
        lay.addWidget(self.suggest_list)
        lay.addWidget(_row(self.next_btn, self.accept_btn))
        lay.addWidget(self.disagree_check)
        lay.addWidget(_row(self.train_on_btn, QLabel("+"), self.train_on_spin, QLabel("iterations")))
        return box

    # ----------------------------------------------------------------- session
    def _session_group(self) -> QGroupBox:
        box = QGroupBox("Session")
        lay = QVBoxLayout(box)
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
        lay.addWidget(_row(self.save_session_btn, self.open_session_btn))
        lay.addWidget(self.session_label)
        return box

    # ----------------------------------------------------------------- settings
    def settings(self) -> dict[str, Any]:
        """TrainConfig overrides from the advanced section."""
        return self.advanced_form.values()

    def show_settings(self, values: dict[str, Any]) -> None:
        """Fill the advanced section (TrainConfig field names; others are skipped)."""
        self.advanced_form.set_values(values)

    def set_running(self, running: bool, paused: bool = False) -> None:
        """Enable the controls that make sense while (not) training."""
        for w in (self.image_combo, self.labels_combo, self.new_labels_btn, self.extra_list, self.preset_combo,
                  self.start_combo, self.start_path, self.browse_btn, self.device_combo, self.advanced,
                  self.load_ckpt_btn, self.train_btn, self.train_on_btn, self.open_session_btn):
            w.setEnabled(not running)
        self.pause_btn.setEnabled(running and not paused)
        self.resume_btn.setEnabled(running and paused)
        self.stop_btn.setEnabled(running)
