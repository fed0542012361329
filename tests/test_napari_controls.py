"""The dock widget driven the way a user drives it: every button clicked and
every checkbox toggled with the mouse (``qtbot.mouseClick``), in a viewer
built as napari builds it (sample from File ▸ Open Sample, NIfTI files through
the plugin's reader, the widget from the manifest). Runs under Xvfb.
"""
from __future__ import annotations

import ast
import re

import nibabel as nib
import numpy as np
from gui_helpers import ROOT, WAIT_MS, answer_file_dialogs, button, click, toggle, train_and_wait, wait_idle, wait_run
from qtpy.QtWidgets import QCheckBox, QPushButton

from napari_m3hl._napari.layers import control as lc

#: Qt signals that send a value with them (it must not reach an action's parameters).
VALUE_SIGNALS = {"clicked", "toggled", "currentIndexChanged", "currentTextChanged", "textChanged", "valueChanged",
                 "itemClicked", "itemChanged", "stateChanged", "triggered", "activated", "released", "pressed"}


def test_qt_signals_connect_only_through_on_signal():
    """No module of the plugin connects a value-sending Qt signal to a slot directly."""
    paths = sorted((ROOT / "napari_m3hl" / "_napari").rglob("*.py"))
    assert {"panels", "run", "layers"} <= {p.parent.name for p in paths}  # the subpackages are scanned too
    offenders = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect"
                    and isinstance(node.func.value, ast.Attribute) and node.func.value.attr in VALUE_SIGNALS):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"connect these through panels.slots.on_signal: {offenders}"


#: Qt signals of a user's click on a control.
CLICK_SIGNALS = {"clicked", "toggled", "itemClicked", "triggered"}
#: The widget's parts (and their shared state) that hold its actions; any ``*_panel`` too.
WIDGET_PARTS = {"outputs", "fine_tune", "run_view", "st"}


def _clicked_actions() -> set[str]:
    """The methods the widget connects to a click (``on_signal(btn.clicked, self.train_on)``),
    and the Train button's few-slice path."""
    actions = {"start_fewslice"}
    for path in (ROOT / "napari_m3hl" / "_napari").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "on_signal" and len(node.args) == 2
                    and getattr(node.args[0], "attr", "") in CLICK_SIGNALS and isinstance(node.args[1], ast.Attribute)):
                actions.add(node.args[1].attr)
    return actions


def _direct_user_actions(source: str, actions: set[str]) -> list[str]:
    """Calls in ``source`` that do what a click does without clicking: one of
    ``actions`` (or a private ``_on_*`` slot) called on a part of the widget
    (``w.run_panel.start_training()``), a button's programmatic ``click()``
    and a checkbox's ``setChecked``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        name, owner = node.func.attr, node.func.value
        owner_name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
        part = owner_name in WIDGET_PARTS or owner_name.endswith("_panel")
        if ((part and (name in actions or name.startswith("_on_")))
                or (name == "click" and owner_name.endswith("_btn"))
                or (name == "setChecked" and owner_name.endswith("_check"))):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_gui_tests_click_rather_than_call():
    """Every GUI test drives the widget as a user does: buttons and list rows
    clicked with the mouse, checkboxes toggled, file dialogs answered
    (gui_helpers.answer_file_dialogs) — never the panels' action methods called."""
    actions = _clicked_actions()
    assert {"start_training", "start_fewslice", "pause", "stop", "predict", "export", "save_checkpoint",
            "load_checkpoint", "new_labels_layer", "suggest", "next_suggested", "accept_slice", "train_on",
            "save_session", "open_session", "toggle_start_segmentation"} <= actions, actions
    assert _direct_user_actions("w.run_panel.start_training()\nw.st.annotate_panel.accept_slice(index=(5,))\n"
                                "w.annotate_panel._on_suggestion_clicked()\nw.annotate_panel.train_on_btn.click()\n"
                                "w.outputs.export('x.nii.gz')\nw.annotate_panel.spread_check.setChecked(True)\n"
                                "w.runner.checkpoint.split()\nw.model_panel.plan()\n", actions) == [
        "1: w.run_panel.start_training()", "2: w.st.annotate_panel.accept_slice(index=(5,))",
        "3: w.annotate_panel._on_suggestion_clicked()", "4: w.annotate_panel.train_on_btn.click()",
        "5: w.outputs.export('x.nii.gz')", "6: w.annotate_panel.spread_check.setChecked(True)"]
    files = sorted((ROOT / "tests").glob("test_napari_*.py"))
    assert len(files) >= 5
    offenders = {f.name: calls for f in files if (calls := _direct_user_actions(f.read_text(), actions))}
    assert not offenders, f"click the control instead (gui_helpers.click / toggle / click_list_item): {offenders}"


def test_every_button_and_checkbox_by_mouse(user_viewer, qtbot, tmp_path, errors, monkeypatch):
    viewer, w = user_viewer()
    assert w.data_panel.image_combo.currentText() == "phantom image" and w.data_panel.labels_combo.currentText() == "phantom labels"
    clicked: set[int] = set()
    toggled: set[int] = set()

    def press(text: str) -> None:
        b = button(w, text)
        click(qtbot, b)
        clicked.add(id(b))

    def flip(box: QCheckBox) -> None:
        toggle(qtbot, box)
        toggle(qtbot, box)
        toggled.add(id(box))

    # the file dialogs answer as a user would
    saved_ckpt, seg_file, folder = tmp_path / "mine.pt", tmp_path / "seg.nii.gz", tmp_path / "session"
    folder.mkdir()
    measured = tmp_path / "measured.csv"
    shipped = str(ROOT / "models" / "acdc70_unet2d.pt")
    asked = answer_file_dialogs(monkeypatch, open_file=lambda caption: saved_ckpt if "Load" in caption else shipped,
                                save_as=lambda caption: seg_file if "segmentation" in caption else
                                measured if "measurements" in caption else saved_ckpt,
                                folder=folder)

    collapsible = [b for b in w.model_panel.advanced.findChildren(QPushButton)]
    for b in collapsible:  # Advanced opens and closes
        click(qtbot, b)
        click(qtbot, b)
        clicked.add(id(b))
    flip(w.annotate_panel.spread_check)
    flip(w.annotate_panel.disagree_check)

    press("New labels layer")
    assert w.data_panel.labels_combo.currentText() == "phantom image labels"
    w.data_panel.labels_combo.setCurrentText("phantom labels")  # train on the painted sample labels
    press("Browse…")
    assert w.model_panel.start_path.text() == shipped

    # Train (the click that once passed `checked` into resume_from), Pause, Resume, Stop
    w.st.config_overrides["iterations"] = 500
    press("Train")
    assert w.run is not None and w.runner.training, w.last_error
    qtbot.waitUntil(lambda: w.run_panel.progress.value() >= 1, timeout=WAIT_MS)
    press("Pause")
    qtbot.waitUntil(lambda: w.run_panel.resume_btn.isEnabled(), timeout=WAIT_MS)
    press("Resume")
    qtbot.waitUntil(lambda: w.run_panel.stop_btn.isEnabled() and w.run_panel.pause_btn.isEnabled(), timeout=WAIT_MS)
    press("Stop")
    wait_run(qtbot, w)
    assert w.run.finished.stopped and w.run.finished.iteration < 500
    assert w.run.fewslice and w.run_panel.verdict_label.text()  # the default start: the few-slice fine-tune
    tuned = viewer.layers[lc.SEGMENTATION].data.copy()
    press("Use the start model's segmentation")
    np.testing.assert_array_equal(viewer.layers[lc.SEGMENTATION].data, w.st.finetune.result.base)
    press("Use the fine-tuned segmentation")
    np.testing.assert_array_equal(viewer.layers[lc.SEGMENTATION].data, tuned)
    flip(w.run_panel.prediction_only_check)
    flip(w.run_panel.clean_check)
    w.st.config_overrides["iterations"] = 4

    press("Predict")
    wait_idle(qtbot, w)
    press("Export…")
    qtbot.waitUntil(seg_file.is_file, timeout=WAIT_MS)
    qtbot.waitUntil((tmp_path / "seg_measurements.json").is_file, timeout=WAIT_MS)  # beside the export
    press("Save measurements…")
    qtbot.waitUntil(measured.with_suffix(".json").is_file, timeout=WAIT_MS)
    assert measured.is_file()
    press("Save checkpoint…")
    qtbot.waitUntil(saved_ckpt.is_file, timeout=WAIT_MS)
    wait_idle(qtbot, w)
    press("Load checkpoint…")
    qtbot.waitUntil(lambda: "Loaded" in w.run_panel.status_label.text(), timeout=WAIT_MS)
    press("Suggest slices")
    qtbot.waitUntil(lambda: w.st.suggestions is not None and not w.runner.busy, timeout=WAIT_MS)
    flip(w.annotate_panel.disagree_check)
    flip(w.annotate_panel.spread_check)
    press("Next suggested slice")
    seg = viewer.layers[lc.SEGMENTATION]
    for _ in range(len(w.annotate_panel.ranked_slices())):  # a suggestion with a heart to accept, as a user would pick
        if seg.data[lc.slice_in_view(viewer, viewer.layers["phantom image"])[0]].any():
            break
        press("Next suggested slice")
    press("Accept slice")
    w.annotate_panel.train_on_spin.setValue(2)
    press("Train on")
    wait_run(qtbot, w)
    press("Save session…")
    qtbot.waitUntil(lambda: "Session saved" in w.run_panel.status_label.text(), timeout=WAIT_MS)
    wait_idle(qtbot, w)
    press("Open session…")
    qtbot.waitUntil(lambda: "opened" in w.run_panel.status_label.text(), timeout=WAIT_MS)
    wait_idle(qtbot, w)

    assert errors == [] and w.last_error == ""
    assert asked == ["Checkpoint or model file", "Export segmentation as NIfTI", "Save measurements", "Save checkpoint",
                     "Load checkpoint or model file", "Save session to folder", "Open session folder"]
    missed = [b.text() for b in w.findChildren(QPushButton) if id(b) not in clicked]
    assert not missed, f"buttons never clicked: {missed}"
    assert {id(b) for b in w.findChildren(QCheckBox)} == toggled


def test_the_whole_loop_through_the_controls(user_viewer, qtbot, tmp_path, errors, monkeypatch):
    """Open → New labels layer → paint 2 slices → Train → pseudo-labels and
    segmentation → Next suggested slice → Accept slice → Undo → Train on →
    Export → the exported file read back: same voxels, same affine."""
    from napari_m3hl._napari._sample import phantom_layers

    (img, meta, _), (truth, _, _), _ = phantom_layers(shape=(6, 64, 64), painted=())
    affine = np.array([[0.0, -1.25, 0.5, -120.5], [1.5, 0.0, 0.25, 33.0], [0.0, 0.25, 8.0, -7.75], [0, 0, 0, 1]])
    path = tmp_path / "heart.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(img, (2, 1, 0)).astype(np.float32), affine), str(path))

    viewer, w = user_viewer(sample=False)
    viewer.open(str(path), plugin="napari-m3hl")
    assert w.data_panel.image_combo.currentText() == "heart"
    click(qtbot, button(w, "New labels layer"))
    labels = viewer.layers["heart labels"]
    assert w.data_panel.labels_combo.currentText() == "heart labels"
    for z in (1, 4):  # paint two slices, as the brush does (data_setitem: history, paint events)
        yx = np.nonzero(truth[z])
        labels.data_setitem((np.full(yx[0].size, z),) + yx, truth[z][yx])
    assert w.data_panel.info_label.text() == "2 of 6 slices labeled: 1, 4; 4 unlabeled"

    train_and_wait(qtbot, w)
    assert w.last_error == "" and w.run.preview_iteration is not None
    assert viewer.layers[lc.PREVIEW].data.shape == img.shape
    assert re.search(r"Dice, painted\n[01]\.\d\d\nchange, unpainted\n", w.run_panel.quality_label.text()), w.run_panel.quality_label.text()
    seg = viewer.layers[lc.SEGMENTATION]
    assert seg.data.shape == img.shape and w.st.suggestions is not None  # one job segmented and ranked

    click(qtbot, button(w, "Next suggested slice"))
    z = lc.slice_in_view(viewer, labels)[0]
    assert z in w.annotate_panel.ranked_slices() and z not in (1, 4)
    yx = np.nonzero(truth[z] != seg.data[z])  # the clinician fixes the segmentation of that slice
    seg.data_setitem((np.full(yx[0].size, z),) + yx, truth[z][yx])
    before = labels.data.copy()
    click(qtbot, button(w, "Accept slice"))
    np.testing.assert_array_equal(labels.data[z], truth[z])
    assert w.data_panel.info_label.text().startswith("3 of 6 slices labeled")
    assert viewer.layers.selection.active.name == labels.name
    labels.undo()  # what Ctrl+Z on the selected labels layer does
    np.testing.assert_array_equal(labels.data, before)
    assert w.data_panel.info_label.text().startswith("2 of 6 slices labeled")
    click(qtbot, button(w, "Accept slice"))  # accepted again, for good

    w.annotate_panel.train_on_spin.setValue(3)
    train_and_wait(qtbot, w, "Train on")
    # after a few-slice fine-tune, Train on fine-tunes its model again: 3 more iterations, 7 in all
    assert w.run.fewslice and w.run.finished.iteration == 3 and w.st.model_iteration == 7
    assert [r["how"] for r in w.st.run_history] == ["few-slice fine-tune", "train on"]

    out = tmp_path / "heart_m3hl_seg.nii.gz"
    answer_file_dialogs(monkeypatch, save_as=out)
    click(qtbot, button(w, "Export…"))
    qtbot.waitUntil(out.is_file, timeout=WAIT_MS)
    wait_idle(qtbot, w)
    back = viewer.open(str(out), plugin="napari-m3hl")[0]
    seg = viewer.layers[lc.SEGMENTATION].data
    merged = seg.copy()
    merged[[1, 4, z]] = labels.data[[1, 4, z]]  # the painted (and accepted) slices exactly as painted
    np.testing.assert_array_equal(back.data, merged)
    np.testing.assert_allclose(nib.load(str(out)).affine, affine, atol=1e-5)
    np.testing.assert_allclose(back.metadata["affine"], viewer.layers["heart"].metadata["affine"], atol=1e-5)
    assert errors == []


def test_layer_pickers_follow_the_layer_list(make_widget, qtbot):
    """The Image / Labels pickers are magicgui combos that napari refreshes
    (the dock widget's ``reset_choices``) when layers are added, removed and
    renamed; a picked layer stays picked under its new name."""
    import numpy as np

    viewer, w = make_widget()

    def names(combo):
        return sorted(combo.itemText(i) for i in range(combo.count()))

    assert names(w.data_panel.image_combo) == ["phantom image"]
    viewer.add_image(np.zeros((4, 32, 32), np.float32), name="second scan")
    assert "second scan" in names(w.data_panel.image_combo)
    w.data_panel.image_combo.setCurrentText("second scan")
    assert w.data_panel.image_layer().name == "second scan"
    viewer.layers["second scan"].name = "renamed scan"
    assert "renamed scan" in names(w.data_panel.image_combo) and "second scan" not in names(w.data_panel.image_combo)
    assert w.data_panel.image_combo.currentText() == "renamed scan" and w.data_panel.image_layer().name == "renamed scan"
    viewer.add_labels(np.zeros((4, 32, 32), np.uint8), name="scan labels")
    assert "scan labels" in names(w.data_panel.labels_combo)
    assert w.data_panel.labels_combo.currentText() == "scan labels"  # the labels on the picked image's grid
    del viewer.layers["renamed scan"]
    assert names(w.data_panel.image_combo) == ["phantom image"] and w.data_panel.image_layer().name == "phantom image"
    del viewer.layers["scan labels"]
    assert "scan labels" not in names(w.data_panel.labels_combo)
    assert not any(lc.is_overlay(viewer.layers[n]) for n in names(w.data_panel.labels_combo) + names(w.data_panel.image_combo))
