"""Helpers shared by the GUI tests (the fixtures ``errors`` and ``make_widget`` are in conftest.py)."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: A run of a few iterations on a 6 x 64 x 64 phantom takes about a second on a 2-core CPU.
TINY = {"patch_size": (64, 64), "block_size": (16, 16), "batch_size": 4, "iterations": 4}
WAIT_MS = 90_000


def wait_idle(qtbot, widget, timeout: int = WAIT_MS) -> None:
    """Until no worker of the widget runs."""
    qtbot.waitUntil(lambda: not widget.session.busy, timeout=timeout)


def train_and_wait(qtbot, widget, **kwargs) -> None:
    """Press Train (``start_training(**kwargs)``) and wait for the run, its
    segmentation and its suggestions."""
    from napari_m3hl._napari import _layers as lc

    assert widget.start_training(**kwargs), widget.last_error
    qtbot.waitUntil(lambda: widget.run.finished is not None, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: not widget.session.busy and lc.SEGMENTATION in widget.viewer.layers, timeout=WAIT_MS)
