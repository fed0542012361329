"""Helpers shared by the GUI tests (the fixtures ``errors``, ``make_widget``
and ``user_viewer`` are in conftest.py)."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: A run of a few iterations on a 6 x 64 x 64 phantom takes about a second on a 2-core CPU.
TINY = {"patch_size": (64, 64), "block_size": (16, 16), "batch_size": 4, "iterations": 4}
WAIT_MS = 90_000


def click(qtbot, button) -> None:
    """Click ``button`` with the mouse, as a user does (it must be enabled)."""
    from qtpy.QtCore import Qt

    assert button.isEnabled(), f"button '{button.text()}' is disabled"
    qtbot.mouseClick(button, Qt.LeftButton)


def button(widget, text: str):
    """The push button of ``widget`` labelled ``text``."""
    from qtpy.QtWidgets import QPushButton

    found = [b for b in widget.findChildren(QPushButton) if b.text() == text]
    assert len(found) == 1, f"{len(found)} buttons labelled {text!r}"
    return found[0]


def wait_idle(qtbot, widget, timeout: int = WAIT_MS) -> None:
    """Until no worker of the widget runs."""
    try:
        qtbot.waitUntil(lambda: not widget.runner.busy, timeout=timeout)
    except Exception as exc:
        raise AssertionError(f"jobs still running: {widget.runner.running_jobs()}") from exc


def wait_run(qtbot, widget, timeout: int = WAIT_MS) -> None:
    """Until the run ended and its segmentation (and suggestions) are shown."""
    from napari_m3hl._napari.layers import control as lc

    qtbot.waitUntil(lambda: widget.run is not None and widget.run.finished is not None, timeout=timeout)
    qtbot.waitUntil(lambda: not widget.runner.busy and lc.SEGMENTATION in widget.viewer.layers, timeout=timeout)


def train_and_wait(qtbot, widget, text: str = "Train") -> None:
    """Click Train (or ``text``: "Train on") and wait for the run, its
    segmentation and its suggestions."""
    widget.run = None
    click(qtbot, button(widget, text))
    assert widget.run is not None, widget.last_error
    wait_run(qtbot, widget)


def toggle(qtbot, box) -> None:
    """Click a checkbox on its indicator, as a user does, and check that it flipped."""
    from qtpy.QtCore import QPoint, Qt

    assert box.isEnabled(), f"checkbox '{box.text()}' is disabled"
    before = box.isChecked()
    qtbot.mouseClick(box, Qt.LeftButton, pos=QPoint(6, box.height() // 2))
    assert box.isChecked() != before, f"checkbox '{box.text()}' did not toggle"
