"""The Measurements group of the dock widget: volumes, EF and mass of the segmentation.

:class:`MeasurePanel` (on the shared :class:`napari_m3hl._napari.panels.state.PanelState`)
fills after every segmentation written into 'M³HL segmentation' (Predict,
the end of a run, the few-slice result, the start model's segmentation):
a worker computes :func:`napari_m3hl.metrics.clinical.measure` from the
labels and the image's voxel size (its NIfTI header, else its affine, else
the layer's scale; a missing or implausible one is refused, never guessed),
and the panel shows the numbers with units and, for a cine, the LV and RV
volume over the frames. Export writes them as CSV and JSON next to the
exported NIfTI; **Save measurements…** writes them anywhere.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image
from qtpy.QtCore import QPointF, QRectF, QSize, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QGroupBox, QLabel, QPushButton, QSizePolicy, QVBoxLayout, QWidget

from napari_m3hl._napari.panels.layout import row
from napari_m3hl._napari.panels.plot import plot_frame
from napari_m3hl._napari.panels.slots import on_signal
from napari_m3hl._napari.panels.state import PanelState
from napari_m3hl._napari.run.workers import describe_error

#: Curve colours (the class colours' hues: RV blue, LV red).
CURVE_COLORS = {"LV": "#ff6060", "RV": "#4aa8ff"}


class VolumePlot(QWidget):
    """LV and RV blood-pool volume (mL) against the frame of a cine, ED and ES
    marked; painted with QPainter as the loss plot."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.curves: dict[str, list[float]] = {}
        self.ed: int | None = None
        self.es: int | None = None
        self.setMinimumHeight(90)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.setToolTip("LV and RV blood-pool volume (mL) per frame; ED and ES marked")

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt API
        return QSize(260, 110)

    def set_curves(self, curves: dict[str, list[float]], ed: int | None, es: int | None) -> None:
        self.curves, self.ed, self.es = {k: list(v) for k, v in curves.items()}, ed, es
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt API
        painter = QPainter(self)
        rect = plot_frame(painter, self)
        values = [v for vs in self.curves.values() for v in vs if math.isfinite(v)]
        n = max((len(v) for v in self.curves.values()), default=0)
        if n < 2 or not values or rect.width() < 4 or rect.height() < 4:
            painter.drawText(rect, Qt.AlignCenter, "volume over the frames of a cine")
            painter.end()
            return
        y1 = max(values) * 1.05 or 1.0

        def to_px(i: int, v: float) -> QPointF:
            return QPointF(rect.left() + i / (n - 1) * rect.width(), rect.bottom() - v / y1 * rect.height())

        painter.setPen(QColor(170, 170, 170))
        painter.drawText(QRectF(0, rect.top() - 4, 32, 14), Qt.AlignRight, f"{y1:.0f}")
        painter.drawText(QRectF(0, rect.bottom() - 10, 32, 14), Qt.AlignRight, "0 mL")
        painter.drawText(QRectF(rect.left(), rect.bottom() + 1, 80, 14), Qt.AlignLeft, "frame 0")
        painter.drawText(QRectF(rect.right() - 80, rect.bottom() + 1, 80, 14), Qt.AlignRight, f"{n - 1}")
        for idx, name in ((self.ed, "ED"), (self.es, "ES")):
            if idx is not None:
                x = to_px(idx, 0.0).x()
                painter.setPen(QPen(QColor(120, 120, 120), 1, Qt.DashLine))
                painter.drawLine(QPointF(x, rect.top()), QPointF(x, rect.bottom()))
                painter.drawText(QPointF(x + 2, rect.top() + 24), name)
        legend_x = rect.right() - 50
        for key, vs in self.curves.items():
            painter.setPen(QPen(QColor(CURVE_COLORS.get(key, "#a0a0a0")), 1.5))
            painter.drawPolyline(QPolygonF([to_px(i, v) for i, v in enumerate(vs)]))
            painter.drawText(QPointF(legend_x, rect.top() + 12), key)
            legend_x += 24
        painter.end()


def voxel_size(image: Image) -> tuple[float, float, float] | None:
    """The image layer's ``(D, H, W)`` voxel size, mm: from its NIfTI header
    (pixdim, in the header's unit), else its affine, else the layer's scale
    (None when the layer has fewer than 3 axes). Checked by the measuring job."""
    from napari_m3hl.metrics.clinical import voxel_size_from_geometry

    meta = image.metadata or {}
    got = voxel_size_from_geometry(meta.get("header"), meta.get("affine"))
    if got is not None:
        return got
    scale = tuple(float(s) for s in image.scale)
    return scale[-3:] if len(scale) >= 3 else None


class MeasurePanel(QGroupBox):
    """Measurements: the clinical numbers of 'M³HL segmentation'."""

    def __init__(self, st: PanelState) -> None:
        super().__init__("Measurements")
        self.st = st
        self.result: Any = None  # the latest napari_m3hl.metrics.clinical.Measurements
        self.source: str = ""
        self._spacing: tuple[float, float, float] | None = None
        lay = QVBoxLayout(self)
        self.text = QLabel("Segment an image to measure its ventricles.")
        self.text.setWordWrap(True)
        self.text.setObjectName("m3hl_measurements")
        self.text.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.text.setToolTip("Blood-pool volumes (LV label 3, RV label 1), LV myocardial volume and mass "
                             "(1.05 g/mL); with two or more frames EDV, ESV, SV and EF. Volumes use the image's "
                             "voxel size (slice spacing through the plane).")
        self.plot = VolumePlot()
        self.save_btn = QPushButton("Save measurements…")
        self.save_btn.setToolTip("Write the measurements as CSV and JSON (Export also writes them next to the NIfTI)")
        lay.addWidget(self.text)
        lay.addWidget(self.plot)
        lay.addWidget(row(self.save_btn))
        on_signal(self.save_btn.clicked, self.save)
        self.plot.setVisible(False)

    # ---------------------------------------------------------------- measuring
    def measure(self, labels: np.ndarray, image: Image) -> bool:
        """Measure ``labels`` (the segmentation of ``image``, 3D or a 4D cine) in a worker."""
        spacing = voxel_size(image)
        self._spacing = spacing
        self.source = image.name
        self.text.setText(f"Measuring '{image.name}'…")
        # a copy: the user may paint into the segmentation layer while the job reads
        self.st.runner.measure(np.array(labels, copy=True), spacing, f"the image '{image.name}'", connect={
            "returned": self.show_result, "errored": self._on_error})
        return True

    def show_result(self, result: Any) -> None:
        """Draw ``result`` (:class:`napari_m3hl.metrics.clinical.Measurements`): numbers with units, a cine's plot."""
        self.result = result
        self.text.setText("\n".join(result.summary_lines()))
        cine = len(result.frames) > 2
        self.plot.setVisible(cine)
        if cine:
            self.plot.set_curves({"LV": [f.lv_ml for f in result.frames], "RV": [f.rv_ml for f in result.frames]},
                                 result.ed, result.es)
        self.update_buttons()

    def _on_error(self, exc: BaseException) -> None:
        self.result = None
        self.plot.setVisible(False)
        self.text.setText(f"No measurements: {describe_error(exc, 'Measuring')}")
        self.update_buttons()

    # ---------------------------------------------------------------- files
    def save(self, path: str | None = None) -> bool:
        """Write the latest measurements as ``<stem>.csv`` and ``<stem>.json`` (in a worker)."""
        if self.result is None:
            self.st.error("No measurements yet: segment an image with a voxel size first.")
            return False
        default = str(self.st.runner.out_dir / "measurements.csv")
        path = path or self.st.run_panel.ask_save_path("Save measurements", default, "CSV (*.csv)")
        if not path:
            return False
        return self._write(Path(path), None, "Measurements saved: ")

    def export_next_to(self, nifti: str | Path, labels: np.ndarray, painted: np.ndarray | None) -> bool:
        """After Export: measure what was exported (``labels`` with the ``painted``
        slices over them, as written) and write ``<name>_measurements.csv/.json``
        beside ``nifti``. Nothing is written while the group shows no numbers
        (no usable voxel size)."""
        if self.result is None:
            return False
        stem = Path(nifti).name.split(".nii")[0]
        return self._write(Path(nifti).with_name(f"{stem}_measurements.csv"), (labels, painted),
                           f"Saved {nifti} and its measurements: ")

    def _write(self, csv_path: Path, exported: tuple[np.ndarray, np.ndarray | None] | None, said: str) -> bool:
        labels, painted = exported if exported is not None else (None, None)
        self.st.runner.save_measurements(
            csv_path, self.result, labels, painted, self._spacing, self.source, connect={
                "returned": lambda paths: self.st.status(said + ", ".join(map(str, paths))),
                "errored": lambda exc: self.st.warn(describe_error(exc, "Saving the measurements"))})
        return True

    # ---------------------------------------------------------------- panel protocol
    def update_buttons(self) -> None:
        self.save_btn.setEnabled(self.result is not None)

    def set_running(self, running: bool, paused: bool = False) -> None:
        self.update_buttons()
