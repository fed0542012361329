"""Connecting Qt signals to the widget's actions without passing them arguments.

Qt signals send values with them (``clicked`` its ``checked`` flag,
``currentIndexChanged`` an index, ``itemClicked`` the item). Connected
straight to a method with optional parameters, such a value lands in the
first one (``train_btn.clicked`` would call ``start_training(resume_from=False)``).
So every Qt signal of the dock widget is connected through :func:`on_signal`,
which calls its action with no argument at all; an action that needs the
widget's state reads it from the widget. (``tests/test_napari_controls.py``
checks that no module of this package connects a Qt signal otherwise.)
"""
from __future__ import annotations

from typing import Any, Callable


def on_signal(signal: Any, action: Callable[[], Any]) -> None:
    """Connect ``signal`` so that it calls ``action()``; what the signal sends is dropped."""

    def slot(*_: Any) -> None:
        action()

    signal.connect(slot)
