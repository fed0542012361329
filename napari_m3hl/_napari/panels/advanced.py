"""The "Advanced" form, generated from :class:`napari_m3hl.config.TrainConfig`.

:data:`ADVANCED_FIELDS` names the config fields the panel shows, with a
label, a tooltip and a range; the editor of each is made from the field's
type (an int, a float, a pair of ints for a 2D size, a choice of strings),
and :meth:`AdvancedForm.values` / :meth:`AdvancedForm.set_values` read and
fill them by field name, so a setting is declared once here and nowhere else.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from qtpy.QtWidgets import (
    QAbstractSpinBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QSpinBox,
    QWidget,
)

from napari_m3hl.config import TrainConfig


@dataclass(frozen=True)
class Field:
    """How the form shows the TrainConfig field ``name``: ``lo``..``hi`` in
    steps of ``step`` (``decimals`` for floats); ``choices`` for strings."""

    name: str
    label: str
    tip: str
    lo: float = 0
    hi: float = 1
    step: float = 1
    decimals: int = 3
    choices: tuple[str, ...] = ()


#: The settings of one interactive run, in the order shown.
ADVANCED_FIELDS: tuple[Field, ...] = (
    Field("iterations", "Iterations", "Optimiser steps; a few hundred suffice for one volume", 1, 1_000_000, 50),
    Field("batch_size", "Batch size", "Images per step (half labeled, half unlabeled); a multiple of 4", 4, 256, 4),
    Field("patch_size", "Patch (H × W)", "Network input size: slices are resized to the patch", 32, 1024, 16),
    Field("block_size", "Block (H × W)", "Mask block size (pixels of the patch)", 2, 512, 4),
    Field("mask_ratio", "Mask ratio", "Share of the mask's blocks set to 0: the share of the mixed image "
          "X_u·M + X_l·(1−M) taken from the labeled image (napari_m3hl.method.mixing)", 0.0, 1.0, 0.05, 2),
    Field("lam", "λ (consistency)", "λ: weight of the high/low-level feature consistency", 0.0, 100.0, 0.1, 3),
    Field("alpha", "α (pseudo-labels)", "α: weight of pseudo-labelled regions in the mix loss", 0.0, 1.0, 0.05, 3),
    Field("lr", "Learning rate", "SGD learning rate", 1e-6, 1.0, 0.001, 6),
    Field("ema_decay", "EMA decay", "EMA decay of the mean teacher (1: the teacher stays as it started)", 0.0, 1.0, 0.001, 5),
)


def _spin(f: Field, as_float: bool) -> QAbstractSpinBox:
    w: QAbstractSpinBox = QDoubleSpinBox() if as_float else QSpinBox()
    if as_float:
        w.setDecimals(f.decimals)
    w.setRange(f.lo if as_float else int(f.lo), f.hi if as_float else int(f.hi))
    w.setSingleStep(f.step if as_float else int(f.step))
    w.setToolTip(f.tip)
    w.setButtonSymbols(QAbstractSpinBox.NoButtons)
    w.setStyleSheet("QAbstractSpinBox { min-width: 48px; }")  # napari's theme asks for more
    return w


class AdvancedForm(QWidget):
    """One editor per :data:`ADVANCED_FIELDS` entry, typed by the TrainConfig field."""

    def __init__(self, fields: tuple[Field, ...] = ADVANCED_FIELDS, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.form = QFormLayout(self)
        self.form.setContentsMargins(0, 0, 0, 0)
        defaults = TrainConfig()
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        self.editors: dict[str, list[QWidget]] = {}
        for f in fields:
            if f.name not in known:
                raise ValueError(f"TrainConfig has no field {f.name!r}")
            default = getattr(defaults, f.name)
            if f.choices:
                combo = QComboBox()
                combo.addItems(f.choices)
                combo.setToolTip(f.tip)
                editors: list[QWidget] = [combo]
            elif isinstance(default, tuple):  # a 2D size: one spin box per axis
                editors = [_spin(f, isinstance(default[0], float)) for _ in default]
            else:
                editors = [_spin(f, isinstance(default, float))]
            self.editors[f.name] = editors
            self.set_values({f.name: default})
            self.form.addRow(f.label, self._row(editors))

    @staticmethod
    def _row(editors: list[QWidget]) -> QWidget:
        if len(editors) == 1:
            return editors[0]
        box = QWidget()
        lay = QHBoxLayout(box)
        lay.setContentsMargins(0, 0, 0, 0)
        for k, e in enumerate(editors):
            if k:
                lay.addWidget(QLabel("×"))
            lay.addWidget(e)
        return box

    def editor(self, name: str, axis: int = 0) -> QWidget:
        """The editor of field ``name`` (``axis`` of a size)."""
        return self.editors[name][axis]

    def values(self) -> dict[str, Any]:
        """TrainConfig overrides: field name → value (a tuple for a size)."""
        out: dict[str, Any] = {}
        for name, editors in self.editors.items():
            vals = [e.currentText() if isinstance(e, QComboBox) else e.value() for e in editors]
            out[name] = tuple(vals) if len(editors) > 1 else vals[0]
        return out

    def set_values(self, values: dict[str, Any]) -> None:
        """Fill the editors of the fields in ``values`` (others are skipped; a
        size of another dimensionality is skipped too)."""
        for name, editors in self.editors.items():
            if name not in values:
                continue
            vals = values[name]
            vals = list(vals) if isinstance(vals, (tuple, list)) else [vals]
            if len(vals) != len(editors):
                continue
            for e, v in zip(editors, vals):
                if isinstance(e, QComboBox):
                    e.setCurrentText(str(v))
                else:
                    e.setValue(v)
