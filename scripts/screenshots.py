"""Screenshots for docs/user-guide.md, taken from a real session.

Opens napari with the phantom sample (File ▸ Open Sample), docks "Train
M³HL" from the plugin manifest, and drives the panel by mouse clicks on its
buttons, as a user does (the same controls the GUI tests click), with the
GUI defaults; saves PNGs into ``docs/images/``:

* ``01-sample-and-widget.png``: the sample (2 painted slices) and the widget;
* ``02-advanced.png``: the widget with the Advanced section open;
* ``03-pseudo-labels.png``: training, the preview of the segmentation at a check;
* ``04-mix-preview.png``: the mutual mask mix preview beside the volume;
* ``05-segmentation.png``: the final segmentation on an unpainted slice;
* ``06-error.png``: the message for a bad input (labels on another grid);

and, for the annotation loop (``--part loop``: the few-slice fine-tune of the
shipped ACDC model, the widget's default start):

* ``07-suggestions.png``: the ranking of uncertain slices, the viewer on the
  top suggestion with the segmentation and the disagreement overlay;
* ``08-accepted.png``: that slice accepted into the user's labels;
* ``09-session.png``: the widget after Train on and Save session;
* ``10-fewslice-verdict.png``: the panel after the few-slice fine-tune, with
  the safeguard's verdict and the control to use the start model's segmentation;

and (``--part measure``: the shipped 70-patient model loaded, Predict on the
sample, no training):

* ``11-measurements.png``: the panel with the Measurements group filled.

01-03 and 05-10 use the default start, the few-slice fine-tune of the
shipped model; 04 (the mix preview) a short M³HL run from scratch, stopped
once its first mix preview is drawn.

Run without a display under a virtual X server:

    xvfb-run -a .venv/bin/python scripts/screenshots.py [--iterations 300] [--part basics|loop|all]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "images"


def wait_until(app, cond, timeout_s: float) -> bool:
    end = time.perf_counter() + timeout_s
    while time.perf_counter() < end:
        app.processEvents()
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def save(viewer, app, name: str, widget=None) -> Path:
    """Screenshot of the whole window (or of ``widget`` alone)."""
    from imageio.v3 import imwrite  # napari depends on imageio

    wait_until(app, lambda: False, 0.5)
    path = OUT / name
    if widget is not None:
        widget.grab().save(str(path))
    else:
        imwrite(path, viewer.screenshot(canvas_only=False, flash=False))
    print("wrote", path.relative_to(ROOT))
    return path


def click(app, button) -> None:
    """A mouse click on ``button`` (it must be enabled), then let the GUI draw."""
    from qtpy.QtCore import QPoint, Qt
    from qtpy.QtTest import QTest
    from qtpy.QtWidgets import QCheckBox

    assert button.isEnabled(), f"'{button.text()}' is disabled"
    if isinstance(button, QCheckBox):  # on its indicator
        QTest.mouseClick(button, Qt.LeftButton, Qt.NoModifier, QPoint(6, button.height() // 2))
    else:
        QTest.mouseClick(button, Qt.LeftButton)
    app.processEvents()


def open_viewer(napari, QApplication, size=(1600, 1000)):
    """napari with the sample opened as File ▸ Open Sample does and the panel
    docked from the manifest (Plugins ▸ Train M³HL)."""
    from npe2 import PluginManager, PluginManifest

    pm = PluginManager.instance()
    if "napari-m3hl" not in pm._manifests:  # not installed with its entry point
        pm.register(PluginManifest.from_file(ROOT / "napari.yaml"))
    viewer = napari.Viewer(title="napari — M³HL")
    viewer.window._qt_window.resize(*size)
    viewer.open_sample("napari-m3hl", "cardiac_phantom")
    _, widget = viewer.window.add_plugin_dock_widget("napari-m3hl", "Train M³HL")
    return viewer, QApplication.instance(), widget


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--patch", type=int, default=256)
    parser.add_argument("--preview-at", type=int, default=200,
                        help="screenshot the pseudo-labels of this iteration or later")
    parser.add_argument("--part", choices=("basics", "panel", "loop", "measure", "all"), default="all",
                        help="basics: 01-06 (trains); panel: only 02 (no training); loop: 07-09; "
                             "measure: only 11 (no training)")
    parser.add_argument("--loop-iterations", type=int, default=100,
                        help="fine-tuning iterations before the loop screenshots (Train on adds half)")
    args = parser.parse_args(argv)

    import napari
    from qtpy.QtWidgets import QApplication

    from napari.settings import get_settings

    from napari_m3hl._napari.layers import control as lc
    from napari_m3hl._napari._sample import phantom_layers
    from napari_m3hl._napari._widget import M3HLWidget

    OUT.mkdir(parents=True, exist_ok=True)
    settings = get_settings().application
    level = settings.gui_notification_level
    settings.gui_notification_level = "error"  # no start-up warning toasts (restored at the end)
    try:
        if args.part in ("basics", "all"):
            _shoot(args, napari, QApplication, lc, phantom_layers, M3HLWidget)
        if args.part == "panel":
            _shoot_panel(napari, QApplication, phantom_layers, M3HLWidget)
        if args.part in ("measure", "all"):
            _shoot_measure(napari, QApplication)
        if args.part in ("loop", "all"):
            _shoot_loop(args, napari, QApplication, lc, phantom_layers, M3HLWidget)
    finally:
        settings.gui_notification_level = level


def _shoot(args, napari, QApplication, lc, phantom_layers, M3HLWidget) -> None:
    viewer, app, widget = open_viewer(napari, QApplication)
    if args.patch != 256:
        widget.st.config_overrides = {"patch_size": (args.patch, args.patch), "block_size": (args.patch // 4,) * 2}
    widget.model_panel.advanced_form.editor("iterations").setValue(args.iterations)  # the default start: few-slice
    viewer.dims.set_current_step(0, 5)  # a painted slice
    viewer.layers.selection.active = viewer.layers["phantom labels"]
    wait_until(app, lambda: False, 1.0)
    viewer.reset_view()
    cam = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari >= 0.9 / older
    camera = (cam.center, cam.zoom)  # framed on the volume

    def frame_volume() -> None:
        cam.center, cam.zoom = camera

    save(viewer, app, "01-sample-and-widget.png")

    widget.model_panel.advanced.expand(animate=False)
    save(viewer, app, "02-advanced.png", widget=widget.content)
    widget.model_panel.advanced.collapse(animate=False)

    click(app, widget.run_panel.train_btn)  # the few-slice fine-tune of the shipped model
    assert widget.run is not None and widget.run.fewslice, widget.last_error
    wait_until(app, lambda: (widget.run.preview_iteration or 0) >= min(args.preview_at, args.iterations), 3600)
    viewer.dims.set_current_step(0, 4)  # an unpainted mid-ventricular slice
    viewer.layers["phantom labels"].visible = False
    frame_volume()
    save(viewer, app, "03-pseudo-labels.png")
    print("preview at iteration", widget.run.preview_iteration, repr(widget.run_panel.quality_label.text()))

    wait_until(app, lambda: widget.run.finished is not None and not widget.runner.busy
               and lc.SEGMENTATION in viewer.layers, 3600)
    for name in (lc.PREVIEW, "phantom labels"):
        viewer.layers[name].visible = False
    viewer.layers.selection.active = viewer.layers[lc.SEGMENTATION]
    viewer.dims.set_current_step(0, 4)  # a mid-ventricular slice that was not painted
    frame_volume()
    save(viewer, app, "05-segmentation.png")
    seg = viewer.layers[lc.SEGMENTATION].data
    gt = viewer.layers["phantom ground truth (reference only)"].data
    dice = {n: 2 * np.sum((seg == c) & (gt == c)) / max(np.sum(seg == c) + np.sum(gt == c), 1)
            for c, n in ((1, "RV"), (2, "Myo"), (3, "LV"))}
    print("Dice vs phantom ground truth:", {k: round(float(v), 3) for k, v in dice.items()})
    print("verdict:", widget.run_panel.verdict_label.text())

    # the M³HL run (From scratch) for its mix preview, stopped once the preview is drawn
    click_start_mode(app, widget, 0)
    widget.st.preview_every_s = widget.st.mix_preview_every_s = 0.0
    viewer.layers["phantom labels"].visible = True
    viewer.layers.selection.active = viewer.layers["phantom labels"]
    click(app, widget.run_panel.train_btn)
    assert widget.run is not None and not widget.run.fewslice, widget.last_error
    wait_until(app, lambda: widget.run.mix_shown, 3600)
    click(app, widget.run_panel.stop_btn)
    wait_until(app, lambda: widget.run.finished is not None and not widget.runner.busy, 3600)
    viewer.layers[lc.PSEUDO_LABELS].visible = False
    viewer.layers[lc.SEGMENTATION].visible = False
    viewer.reset_view()  # fits volume + mix preview; then zoom onto the mix preview
    (y0, x0), (y1, x1) = np.asarray(viewer.layers[lc.MIX_PREVIEW].extent.world)[:, -2:]
    full_w = float(np.diff(np.asarray(viewer.layers.extent.world)[:, -1])[0])
    cam.center = tuple(cam.center)[:-2] + ((y0 + y1) / 2, (x0 + x1) / 2)
    cam.zoom = cam.zoom * full_w / (x1 - x0) * 0.95
    save(viewer, app, "04-mix-preview.png")

    viewer.add_labels(np.zeros((10, 108, 128), np.uint8), name="labels from another scan", scale=(10.0, 3.0, 3.0))
    widget.data_panel.labels_combo.setCurrentText("labels from another scan")
    click(app, widget.run_panel.train_btn)
    save(viewer, app, "06-error.png")

    widget.cleanup()
    viewer.close()


def _shoot_panel(napari, QApplication, phantom_layers, M3HLWidget) -> None:
    """Only the panel with its Advanced section open (02-advanced.png)."""
    viewer, app, widget = open_viewer(napari, QApplication)
    wait_until(app, lambda: False, 1.0)  # let the window settle before the section opens
    widget.model_panel.advanced.expand(animate=False)
    wait_until(app, lambda: False, 1.0)
    save(viewer, app, "02-advanced.png", widget=widget.content)
    widget.cleanup()
    viewer.close()


def _shoot_measure(napari, QApplication) -> None:
    """The shipped 70-patient model loaded, Predict clicked, the Measurements group
    filled (11-measurements.png)."""
    viewer, app, widget = open_viewer(napari, QApplication)
    assert widget.outputs.load_checkpoint(str(ROOT / "models" / "acdc70_unet2d.pt"))
    wait_until(app, lambda: "Loaded" in widget.run_panel.status_label.text(), 120)
    click(app, widget.run_panel.predict_btn)
    wait_until(app, lambda: widget.measure_panel.result is not None and not widget.runner.busy, 300)
    viewer.dims.set_current_step(0, 5)
    save(viewer, app, "11-measurements.png", widget=widget.content)
    widget.cleanup()
    viewer.close()


def click_start_mode(app, widget, index: int) -> None:
    """Choose Start mode ``index`` as a user does (the combo box's own signal)."""
    widget.model_panel.start_combo.setCurrentIndex(index)
    app.processEvents()


def _shoot_loop(args, napari, QApplication, lc, phantom_layers, M3HLWidget) -> None:
    """Suggest → look → accept → train on → save session, with the default start."""
    import tempfile

    viewer, app, widget = open_viewer(napari, QApplication)
    if args.patch != 256:
        widget.st.config_overrides = {"patch_size": (args.patch, args.patch), "block_size": (args.patch // 4,) * 2}
    widget.model_panel.advanced_form.editor("iterations").setValue(args.loop_iterations)
    widget.annotate_panel.train_on_spin.setValue(max(1, args.loop_iterations // 2))
    widget.st.preview_every_s = widget.st.mix_preview_every_s = None
    viewer.layers.selection.active = viewer.layers["phantom labels"]
    wait_until(app, lambda: False, 1.0)
    viewer.reset_view()
    click(app, widget.run_panel.train_btn)
    assert widget.run is not None, widget.last_error
    wait_until(app, lambda: widget.run.finished is not None and widget.st.suggestions is not None
               and not widget.runner.busy and lc.SEGMENTATION in viewer.layers, 3600)
    print("few-slice fine-tune:", widget.run_panel.verdict_label.text())
    widget.scroll.ensureWidgetVisible(widget.run_panel.keep_start_btn)  # the safeguard's verdict in view
    save(viewer, app, "10-fewslice-verdict.png")
    for name in (lc.MIX_PREVIEW, lc.MIX_TARGETS):  # not part of this story: out of the frame
        if name in viewer.layers:
            viewer.layers.remove(name)
    viewer.layers[lc.PREVIEW].visible = False
    viewer.reset_view()
    cam = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    truth = viewer.layers["phantom ground truth (reference only)"]
    yx = np.argwhere(truth.data.any(axis=0)).mean(axis=0) * np.asarray(truth.scale[-2:])
    cam.center = tuple(cam.center)[:-2] + tuple(float(v) for v in yx)  # on the heart
    cam.zoom = cam.zoom * 2.5
    widget.scroll.ensureWidgetVisible(widget.annotate_panel.train_on_btn)  # the Annotate group in view
    click(app, widget.annotate_panel.disagree_check)
    click(app, widget.annotate_panel.next_btn)
    z = lc.slice_in_view(viewer, viewer.layers["phantom image"])[0]
    seg = viewer.layers[lc.SEGMENTATION]
    for _ in range(len(widget.annotate_panel.ranked_slices())):  # a suggestion with a heart to accept (Next again)
        if seg.data[z].any():
            break
        click(app, widget.annotate_panel.next_btn)
        z = lc.slice_in_view(viewer, viewer.layers["phantom image"])[0]
    wait_until(app, lambda: False, 0.5)
    save(viewer, app, "07-suggestions.png")

    click(app, widget.annotate_panel.disagree_check)
    viewer.layers[lc.SEGMENTATION].visible = False
    click(app, widget.annotate_panel.accept_btn)
    print(f"accepted slice {z}:", widget.data_panel.info_label.text())
    save(viewer, app, "08-accepted.png")

    viewer.layers[lc.SEGMENTATION].visible = True
    widget.run = None
    click(app, widget.annotate_panel.train_on_btn)
    assert widget.run is not None, widget.last_error
    wait_until(app, lambda: widget.run.finished is not None and not widget.runner.busy, 3600)
    folder = Path(tempfile.mkdtemp(prefix="m3hl-session-")) / "patient01"
    widget.session_panel._ask_folder = lambda caption, start: str(folder)  # the folder dialog's answer
    click(app, widget.session_panel.save_session_btn)
    wait_until(app, lambda: "Session saved" in widget.run_panel.status_label.text(), 120)
    widget.scroll.ensureWidgetVisible(widget.session_panel.session_label)
    save(viewer, app, "09-session.png")
    widget.cleanup()
    viewer.close()


if __name__ == "__main__":
    main()
