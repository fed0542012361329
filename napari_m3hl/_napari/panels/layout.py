"""What the panels of the "Train M³HL" dock widget share to lay out their controls.

The choices the panels offer (Start modes, devices, variants, suggestion
scores), the shipped cardiac start model, and small builders: a compact spin
box, a row of widgets, a magicgui layer picker. Each group's panel
(:mod:`napari_m3hl._napari.panels.data`, :mod:`napari_m3hl._napari.panels.model`, :mod:`napari_m3hl._napari.panels.run`, :mod:`napari_m3hl._napari.panels.annotate`,
:mod:`napari_m3hl._napari.panels.session`) builds its own controls with them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from qtpy.QtWidgets import QAbstractSpinBox, QHBoxLayout, QSpinBox, QWidget

from napari_m3hl.app.plan import StartMode
from napari_m3hl.fewslice.suggest import METHODS

#: The Start combo's items, in :class:`~napari_m3hl.app.plan.StartMode` order.
START_MODES = tuple(m.value for m in StartMode)
DEVICES = ("auto", "cuda", "mps", "cpu")
VARIANTS = ("paper", "reference", "fast")
#: Slice suggestion scores (napari_m3hl.fewslice.suggest.METHODS); the default is ``suggest.DEFAULT_METHOD``.
SUGGEST_SCORES = METHODS
TRAIN_ON_ITERATIONS = 200
DEFAULT_CARDIAC_MODEL = "acdc70_unet2d.pt"
KEEP_START = "Use the start model's segmentation"
USE_TUNED = "Use the fine-tuned segmentation"


def default_cardiac_model() -> Path | None:
    """The shipped 2D U-Net trained on all 70 ACDC training patients, if installed."""
    from napari_m3hl.config import MODELS_DIR

    path = MODELS_DIR / DEFAULT_CARDIAC_MODEL
    return path if path.is_file() else None


def spin(lo: int, hi: int, value: int, step: int = 1, tip: str = "") -> QSpinBox:
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
    panel (:class:`napari_m3hl._napari.panels.data.DataPanel`), which filters them, and
    refreshed by ``reset_choices``: napari calls the dock widget's
    ``reset_choices`` whenever layers are added, removed, moved or renamed."""
    from magicgui.widgets import create_widget

    picker = create_widget(annotation=kind, options={"choices": ()})
    picker.native.setToolTip(tip)
    return picker


def row(*widgets: QWidget) -> QWidget:
    box = QWidget()
    lay = QHBoxLayout(box)
    lay.setContentsMargins(0, 0, 0, 0)
    for w in widgets:
        lay.addWidget(w)
    return box
