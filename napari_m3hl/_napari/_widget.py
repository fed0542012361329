"""The "Train M³HL" dock widget: six panels over one shared state.

The widget is composed, not inherited: one small panel per group, each a
``QGroupBox`` that builds its own controls and holds their behaviour,

* :class:`napari_m3hl._napari.panels.data.DataPanel`: layer pickers (magicgui), New labels layer, extra volumes, info line;
* :class:`napari_m3hl._napari.panels.model.ModelPanel`: preset, Start, device, Advanced (generated from ``TrainConfig``);
* :class:`napari_m3hl._napari.panels.run.RunPanel`: Train / Pause / Resume / Stop, progress, results, status line,
  with the Run group's helpers :class:`napari_m3hl._napari.run.view.RunView` (the run's events drawn),
  :class:`napari_m3hl._napari.run.outputs.Outputs` (Predict, segmentation layer, Export, checkpoints) and
  :class:`napari_m3hl._napari.run.finetune.FineTune` (the few-slice fine-tune and its safeguard);
* :class:`napari_m3hl._napari.panels.measure.MeasurePanel`: volumes, EF and LV mass of each segmentation;
* :class:`napari_m3hl._napari.panels.annotate.AnnotatePanel`: suggest, next, accept, disagreement, Train on;
* :class:`napari_m3hl._napari.panels.session.SessionPanel`: save, open, autosave session folders;

over one :class:`napari_m3hl._napari.panels.state.PanelState` (viewer, run controller, run and model
bookkeeping, messages, a reference to each part). Every Qt signal is
connected through :func:`napari_m3hl._napari.panels.slots.on_signal`, so no signal's value (``clicked``'s
``checked`` flag) reaches an action's parameters.

Everything here runs in the GUI thread: the panels validate the input, take
copies of the layer data, start workers (:class:`napari_m3hl._napari.run.controller.RunController`) and
draw the events the workers yield. The user's own layers are only read,
never written (Accept slice aside: one undoable edit).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import QEvent, QObject, QTimer
from qtpy.QtWidgets import QComboBox, QFrame, QScrollArea, QVBoxLayout, QWidget

from napari_m3hl._napari.panels.annotate import AnnotatePanel
from napari_m3hl._napari.panels.data import DataPanel
from napari_m3hl._napari.panels.measure import MeasurePanel
from napari_m3hl._napari.run.finetune import FineTune
from napari_m3hl._napari.panels.model import ModelPanel
from napari_m3hl._napari.run.outputs import Outputs
from napari_m3hl._napari.run.request import RunState
from napari_m3hl._napari.run.controller import RunController
from napari_m3hl._napari.panels.run import RunPanel
from napari_m3hl._napari.run.view import RunView
from napari_m3hl._napari.panels.session import SessionPanel
from napari_m3hl._napari.panels.state import PanelState

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = [
    "M3HLWidget",
]


class M3HLWidget(QWidget):
    """Dock widget: paint a few slices, train M³HL, watch, predict, export.

    Its parts: ``data_panel``, ``model_panel``, ``run_panel``, ``measure_panel``,
    ``annotate_panel``, ``session_panel`` (the groups, top to bottom) and
    ``run_view``, ``outputs``, ``fine_tune`` (the Run group's helpers), all
    on the shared state ``st`` (:class:`napari_m3hl._napari.panels.state.PanelState`: e.g.
    ``st.config_overrides``, ``st.preview_every_s``, ``st.auto_predict``).
    """

    #: Start the engine's warm-up job when the widget opens.
    warm_up_on_open = True
    #: How long closing the viewer or the dock waits for a training run to save its checkpoint (ms);
    #: the GUI is blocked that long at most, a job still running then ends on its own.
    close_wait_ms = 5000

    def __init__(self, napari_viewer: "napari.viewer.Viewer", out_dir: str | Path | None = None) -> None:
        super().__init__()
        st = self.st = PanelState(viewer=napari_viewer, runner=RunController(out_dir))
        # the Run panel first: its status line shows every panel's messages
        self.run_panel = st.run_panel = RunPanel(st)
        self.data_panel = st.data_panel = DataPanel(st)
        self.model_panel = st.model_panel = ModelPanel(st)
        self.measure_panel = st.measure_panel = MeasurePanel(st)
        self.annotate_panel = st.annotate_panel = AnnotatePanel(st)
        self.session_panel = st.session_panel = SessionPanel(st)
        self.run_view = st.run_view = RunView(st)
        self.outputs = st.outputs = Outputs(st)
        self.fine_tune = st.fine_tune = FineTune(st)
        self.run_panel.connect()
        runner, wait_ms = st.runner, self.close_wait_ms
        # deleted with its window (napari deletes the main window on close): stop the run, draw nothing more
        self.destroyed.connect(lambda *_: runner.close(wait_ms))
        self._docked = False  # placed in a parent (a dock) once
        self._window: QWidget | None = None  # the top-level window watched for its close (:meth:`eventFilter`)
        self._window_closing = False  # the user asked the window to close; it may still say no
        self._lay_out(st.panels())
        self.session_panel.show_session_folder(autosave_only=True)
        self.data_panel.refresh_layers()
        st.set_running(False)
        st.update_buttons()
        if self.warm_up_on_open:  # first-use imports and torch set-up now, in a worker, not after Train
            st.runner.warm_up()
        QTimer.singleShot(0, self._watch_window)  # napari docks the widget after building it

    def _lay_out(self, panels: list[QWidget]) -> None:
        """The panels top to bottom in a scroll area, so the dock fits small
        screens and the Advanced section can open."""
        content = QWidget()
        root = QVBoxLayout(content)
        root.setContentsMargins(6, 6, 6, 6)
        for panel in panels:
            root.addWidget(panel)
        root.addStretch(1)
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

    # ---------------------------------------------------------------- napari
    def reset_choices(self, event: Any = None) -> None:
        """napari calls this when layers are added, removed, reordered or
        renamed (as for magicgui widgets): the layer pickers follow."""
        self.data_panel.reset_choices()

    # ---------------------------------------------------------------- shortcuts
    @property
    def viewer(self) -> "napari.viewer.Viewer":
        return self.st.viewer

    @property
    def runner(self) -> RunController:
        """Starts and tracks the jobs: ``runner.busy``, ``runner.checkpoint``."""
        return self.st.runner

    @property
    def run(self) -> RunState | None:
        """The current or last run (None before the first Train)."""
        return self.st.run

    @run.setter
    def run(self, value: RunState | None) -> None:
        self.st.run = value

    @property
    def last_error(self) -> str:
        """The latest error shown (status line and notification)."""
        return self.st.last_error

    # ---------------------------------------------------------------- teardown
    def cleanup(self, wait_ms: int = 10000) -> None:
        """Stop training (its checkpoint is still written) and wait for workers."""
        self.st.runner.shutdown(wait_ms=wait_ms)

    def close_down(self) -> None:
        """The viewer or the dock closed: the run is told to stop (it saves its
        checkpoint, as Stop does), helper jobs quit, nothing is drawn any more,
        and the GUI waits at most :attr:`close_wait_ms` for them."""
        window, self._window = self._window, None  # the window's Python object is not kept alive by the widget
        if window is not None:
            window.removeEventFilter(self)
        self.st.runner.close(self.close_wait_ms)

    def _watch_window(self) -> None:
        """Watch the top-level window holding the dock for its close (:meth:`eventFilter`)."""
        try:
            top = self.window()
        except RuntimeError:  # deleted before the event loop came round
            return
        if top is not self and top is not self._window:
            if self._window is not None:
                self._window.removeEventFilter(self)
            top.installEventFilter(self)
            self._window = top

    def event(self, e: QEvent) -> bool:
        """The dock's close button takes the widget out of its dock (napari's
        ``remove_dock_widget`` sets its parent to None): close down then."""
        if e.type() in (QEvent.ParentChange, QEvent.Show):
            if self.parent() is not None:
                self._docked = True
                self._watch_window()
            elif self._docked and e.type() == QEvent.ParentChange:
                self.close_down()
        return super().event(e)

    def eventFilter(self, obj: QObject, e: QEvent) -> bool:
        """The window holding the dock closes: ``viewer.close()`` closes it at
        once (close down now, before any more of a job's results are drawn);
        a click on its close button may be answered No in napari's dialog, so
        there the run stops only when the window really hides."""
        if obj is self._window:
            if e.type() == QEvent.Close:
                if e.spontaneous():
                    self._window_closing = True
                else:
                    self.close_down()
            elif e.type() == QEvent.Hide and self._window_closing and not e.spontaneous():
                self.close_down()
            elif e.type() == QEvent.Show:
                self._window_closing = False
        return False
