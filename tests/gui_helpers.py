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


def answer_file_dialogs(monkeypatch, save_as=None, open_file=None, folder=None) -> list[str]:
    """Make Qt's file dialogs answer as a user would, without showing them.

    ``save_as`` answers ``QFileDialog.getSaveFileName``, ``open_file``
    ``getOpenFileName`` and ``folder`` ``getExistingDirectory``: a path, or a
    function of the dialog's caption giving one; None (or "") is Cancel.
    Returns the captions of the dialogs shown, in order (to check that a
    click opened one, or none).
    """
    from qtpy.QtWidgets import QFileDialog

    asked: list[str] = []

    def answer(reply, caption: str) -> str:
        asked.append(caption)
        path = reply(caption) if callable(reply) else reply
        return str(path) if path else ""

    def save_dialog(parent=None, caption="", *args, **kwargs):
        return answer(save_as, caption), ""

    def open_dialog(parent=None, caption="", *args, **kwargs):
        return answer(open_file, caption), ""

    def folder_dialog(parent=None, caption="", *args, **kwargs):
        return answer(folder, caption)

    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(save_dialog))
    monkeypatch.setattr(QFileDialog, "getOpenFileName", staticmethod(open_dialog))
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", staticmethod(folder_dialog))
    return asked


def click_list_item(qtbot, list_widget, row: int) -> None:
    """Click row ``row`` of a QListWidget with the mouse, as a user does."""
    from qtpy.QtCore import Qt

    item = list_widget.item(row)
    assert item is not None, f"no row {row} in a list of {list_widget.count()}"
    list_widget.scrollToItem(item)
    qtbot.mouseClick(list_widget.viewport(), Qt.LeftButton, pos=list_widget.visualItemRect(item).center())
