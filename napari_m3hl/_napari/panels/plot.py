"""A light live loss plot: one polyline per loss term, painted with QPainter."""
from __future__ import annotations

import math

from qtpy.QtCore import QPointF, QRectF, QSize, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

from napari_m3hl._napari.run.jobs import PreviewQuality

#: Line colour per loss term (others get grey).
TERM_COLORS: dict[str, str] = {
    "total": "#f0f0f0",
    "mix": "#ffb000",
    "low": "#33c0ff",
    "high": "#e040e0",
    "sup": "#60e060",
}


def plot_frame(painter: QPainter, widget: QWidget) -> QRectF:
    """Paint the small plots' dark background and frame over ``widget`` and
    return the plotting area inside it (room left for the axis labels)."""
    painter.setRenderHint(QPainter.Antialiasing, True)
    rect = QRectF(widget.rect()).adjusted(34, 6, -6, -16)
    painter.fillRect(widget.rect(), QColor(30, 32, 36))
    painter.setPen(QPen(QColor(110, 110, 110), 1))
    painter.drawRect(rect)
    return rect


class LossPlot(QWidget):
    """Loss terms against iteration; keeps at most ``max_points`` per term by
    halving the stored history when full (every other point dropped)."""

    def __init__(self, parent: QWidget | None = None, max_points: int = 1000) -> None:
        super().__init__(parent)
        self.max_points = max_points
        self.series: dict[str, list[tuple[float, float]]] = {}
        self.setMinimumHeight(90)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.setToolTip("Loss terms per iteration: total, mix (L_mix), low / high (feature consistency)")

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt API
        return QSize(260, 110)

    def clear(self) -> None:
        self.series.clear()
        self.update()

    def add(self, iteration: int, losses: dict[str, float]) -> None:
        """Append one point per finite loss term and repaint."""
        for key, value in losses.items():
            if not math.isfinite(value):
                continue
            pts = self.series.setdefault(key, [])
            pts.append((float(iteration), float(value)))
            if len(pts) > self.max_points:
                del pts[1:-1:2]
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt API
        painter = QPainter(self)
        rect = plot_frame(painter, self)
        pts_all = [p for pts in self.series.values() for p in pts]
        if not pts_all or rect.width() < 4 or rect.height() < 4:
            painter.drawText(rect, Qt.AlignCenter, "loss plot")
            painter.end()
            return
        x0 = min(p[0] for p in pts_all)
        x1 = max(max(p[0] for p in pts_all), x0 + 1.0)
        y1 = max(max(p[1] for p in pts_all), 1e-6) * 1.05
        y0 = min(0.0, min(p[1] for p in pts_all))

        def to_px(x: float, y: float) -> QPointF:
            return QPointF(
                rect.left() + (x - x0) / (x1 - x0) * rect.width(),
                rect.bottom() - (y - y0) / (y1 - y0) * rect.height(),
            )

        painter.setPen(QColor(170, 170, 170))
        painter.drawText(QRectF(0, rect.top() - 4, 32, 14), Qt.AlignRight, f"{y1:.2g}")
        painter.drawText(QRectF(0, rect.bottom() - 10, 32, 14), Qt.AlignRight, f"{y0:.2g}")
        painter.drawText(QRectF(rect.left(), rect.bottom() + 1, 80, 14), Qt.AlignLeft, f"{int(x0)}")
        painter.drawText(QRectF(rect.right() - 80, rect.bottom() + 1, 80, 14), Qt.AlignRight, f"it {int(x1)}")
        legend_w = sum(8 + painter.fontMetrics().horizontalAdvance(k) for k in self.series)
        legend_x = rect.right() - legend_w
        for key, pts in self.series.items():
            color = QColor(TERM_COLORS.get(key, "#a0a0a0"))
            painter.setPen(QPen(color, 1.5))
            if len(pts) > 1:
                painter.drawPolyline(QPolygonF([to_px(x, y) for x, y in pts]))
            else:
                painter.drawPoint(to_px(*pts[0]))
            painter.drawText(QPointF(legend_x, rect.top() + 12), key)
            legend_x += 8 + painter.fontMetrics().horizontalAdvance(key)
        painter.end()


def quality_text(q: PreviewQuality | None) -> tuple[str, str]:
    """(text, tooltip) beside the loss plot for the latest :class:`PreviewQuality`."""
    if q is None:
        return ("Dice, painted\n–\nchange, unpainted\n–",
                "Shown with each pseudo-label preview while training")
    dice = "–" if q.dice is None else f"{q.dice:.2f}"
    change = "–" if q.relabelled is None else f"{100 * q.relabelled:.1f} %"
    per = ", ".join(f"{k} {v:.2f}" for k, v in q.per_class.items()) or "no class painted"
    tip = (f"Iteration {q.iteration}. Dice of the pseudo-labels against your painted slices: {per}. "
           "Change: share of the heart pixels of the unpainted slices whose label changed since the previous "
           "preview; near 0 once the segmentation has settled.")
    return f"Dice, painted\n{dice}\nchange, unpainted\n{change}", tip
