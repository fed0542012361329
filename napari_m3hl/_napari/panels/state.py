"""The state the dock widget's panels share.

The "Train M³HL" widget is composed of one panel per group (Data, Model,
Run, Measurements, Annotate, Session) and three helpers of the Run group (the run's events
drawn, the outputs, the few-slice fine-tune). They share one
:class:`PanelState`: the viewer, the :class:`napari_m3hl._napari.run.controller.RunController`, the layer
data versions, the model and run bookkeeping, and a reference to each part,
so a panel reads another's controls as ``self.st.model_panel.device_combo``.
Messages (status line and napari notifications), button states and the
running state go through the state too, so every part updates all panels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari.utils import notifications

from napari_m3hl._napari.layers import control as lc

if TYPE_CHECKING:  # pragma: no cover
    import napari

    from napari_m3hl._napari.panels.annotate import AnnotatePanel, Suggestions
    from napari_m3hl._napari.panels.data import DataPanel
    from napari_m3hl._napari.run.finetune import FineTune, FineTuneOutcome
    from napari_m3hl._napari.panels.measure import MeasurePanel
    from napari_m3hl._napari.panels.model import ModelPanel
    from napari_m3hl._napari.run.outputs import Outputs
    from napari_m3hl._napari.run.request import RunState
    from napari_m3hl._napari.run.controller import RunController
    from napari_m3hl._napari.panels.run import RunPanel
    from napari_m3hl._napari.run.view import RunView
    from napari_m3hl._napari.panels.session import SessionPanel


def breakable(text: str) -> str:
    """``text`` with zero-width spaces after path separators, so that a word-wrapped
    label can break a long path instead of widening the dock."""
    return text.replace("/", "/\u200b").replace("\\", "\\\u200b")


@dataclass(eq=False)
class PanelState:
    """What the panels share (GUI thread only).

    * ``config_overrides``: extra :class:`~napari_m3hl.config.TrainConfig`
      settings applied last (e.g. ``{"patch_size": (64, 64)}``);
    * ``preview_every_s`` / ``mix_preview_every_s``: overlay periods;
    * ``auto_predict`` / ``auto_suggest``: segment / rank the slices when a run ends;
    * ``run``: the current or last run; ``finetune``: the last few-slice outcome;
    * ``model_iteration`` / ``model_resumable`` / ``model_is_fewslice``: the
      latest model (``runner.checkpoint``);
    * ``last_error``: the message of the latest error shown.
    """

    viewer: "napari.viewer.Viewer"
    runner: "RunController"
    versions: lc.LayerVersions = field(default_factory=lc.LayerVersions)
    config_overrides: dict[str, Any] = field(default_factory=dict)
    preview_every_s: float | None = 5.0
    mix_preview_every_s: float | None = 5.0
    auto_predict: bool = True
    auto_suggest: bool = True
    run: "RunState | None" = None
    finetune: "FineTuneOutcome | None" = None
    n_runs: int = 0
    seg_token: tuple | None = None  # version of 'M³HL segmentation' when last written
    suggestions: "Suggestions | None" = None
    last_next: int | None = None
    session_folder: Path | None = None  # chosen by Save / Open session
    model_iteration: int = 0  # iteration of runner.checkpoint
    model_resumable: bool = False  # runner.checkpoint holds optimiser state
    model_is_fewslice: bool = False  # the model comes from a few-slice fine-tune (Train on fine-tunes it again)
    run_history: list[dict[str, Any]] = field(default_factory=list)  # the session's run manifest
    last_error: str = ""
    # the parts, set by the widget as it builds them
    data_panel: "DataPanel | None" = None
    model_panel: "ModelPanel | None" = None
    run_panel: "RunPanel | None" = None
    annotate_panel: "AnnotatePanel | None" = None
    session_panel: "SessionPanel | None" = None
    run_view: "RunView | None" = None
    outputs: "Outputs | None" = None
    fine_tune: "FineTune | None" = None
    measure_panel: "MeasurePanel | None" = None

    def panels(self) -> list[Any]:
        """The six group panels, in the order shown (those built so far)."""
        return [p for p in (self.data_panel, self.model_panel, self.run_panel, self.measure_panel,
                            self.annotate_panel, self.session_panel) if p is not None]

    # ---------------------------------------------------------------- messages
    def error(self, message: str) -> None:
        """Show an error: napari notification + status line (red)."""
        self.last_error = message
        self._show(message, "color: #ff6b6b;")
        notifications.show_error(message)

    def warn(self, message: str) -> None:
        self._show(message, "color: #ffc04d;")
        notifications.show_warning(message)

    def status(self, message: str) -> None:
        self._show(message, "")

    def _show(self, message: str, style: str) -> None:
        if self.run_panel is not None:
            self.run_panel.status_label.setStyleSheet(style)
            self.run_panel.status_label.setText(breakable(message))

    # ---------------------------------------------------------------- panel states
    def update_buttons(self) -> None:
        """Enable each panel's buttons for the current layers, model and run."""
        for part in (*self.panels(), self.fine_tune):
            if part is not None:
                part.update_buttons()

    def set_running(self, running: bool, paused: bool = False) -> None:
        """Enable the controls that make sense while (not) training."""
        for panel in self.panels():
            panel.set_running(running, paused)
