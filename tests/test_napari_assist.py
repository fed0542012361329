"""The annotation loop in the dock widget (under Xvfb): suggest the next slice,
accept a slice as one undoable edit, train on, save and reopen a session."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from gui_helpers import WAIT_MS, answer_file_dialogs, button, click, click_list_item, toggle, train_and_wait, wait_idle

from napari_m3hl._napari.layers import control as lc
from napari_m3hl.fewslice.suggest import DEFAULT_METHOD


def _wait_suggestions(qtbot, w):
    qtbot.waitUntil(lambda: w.st.suggestions is not None and not w.runner.busy, timeout=WAIT_MS)


def _slice_in_view(viewer, layer) -> int:
    return lc.slice_in_view(viewer, layer)[-1]


def _go_to(viewer, z: int) -> None:
    """Scroll the viewer to slice ``z`` (axis 0 of a 3D image), as a user does with the slider."""
    viewer.dims.set_current_step(0, z)


def test_suggest_next_and_disagreement_overlay(make_widget, qtbot):
    viewer, w = make_widget()
    image = viewer.layers["phantom image"]
    assert not w.annotate_panel.suggest_btn.isEnabled() and not w.annotate_panel.next_btn.isEnabled()
    train_and_wait(qtbot, w)
    _wait_suggestions(qtbot, w)  # suggestions follow every run
    a = w.st.suggestions.analysis
    assert a.method == DEFAULT_METHOD and a.scores.shape == (6,)
    assert not w.annotate_panel.spread_check.isChecked()  # plain ranking: most uncertain first
    ranked = w.annotate_panel.ranked_slices()
    assert sorted(ranked) == [0, 2, 4, 5]  # slices 1 and 3 are painted
    assert list(np.argsort(-a.scores[ranked], kind="stable")) == [0, 1, 2, 3]  # most uncertain first
    assert w.annotate_panel.suggest_list.count() == 4 and w.annotate_panel.suggest_list.item(0).text().startswith(f"slice {ranked[0]} ")

    # Next goes to the top suggestion, pressed again to the second
    click(qtbot, button(w, "Next suggested slice"))
    assert _slice_in_view(viewer, image) == ranked[0]
    click(qtbot, button(w, "Next suggested slice"))
    assert _slice_in_view(viewer, image) == ranked[1]
    # a click in the list goes to that slice
    click_list_item(qtbot, w.annotate_panel.suggest_list, 2)
    assert _slice_in_view(viewer, image) == ranked[2]
    # "Away from labeled slices" re-ranks by score × distance to slices 1 and 3, list included
    toggle(qtbot, w.annotate_panel.spread_check)
    assert w.annotate_panel.ranked_slices() == a.ranking([1, 3], spread=True)
    assert w.annotate_panel.suggest_list.item(0).text().startswith(f"slice {w.annotate_panel.ranked_slices()[0]} ")
    toggle(qtbot, w.annotate_panel.spread_check)
    assert w.annotate_panel.ranked_slices() == ranked

    # disagreement overlay: its own read-only layer, 1 where student and teacher differ
    w.annotate_panel.score_combo.setCurrentText("disagreement")
    click(qtbot, button(w, "Suggest slices"))
    qtbot.waitUntil(lambda: w.st.suggestions.analysis.method == "disagreement" and not w.runner.busy, timeout=WAIT_MS)
    assert not w.annotate_panel.disagree_check.isChecked()
    toggle(qtbot, w.annotate_panel.disagree_check)
    layer = viewer.layers[lc.DISAGREEMENT]
    a = w.st.suggestions.analysis
    np.testing.assert_array_equal(layer.data, (a.student != a.teacher).astype(np.uint8))
    assert layer.data.shape == image.data.shape and not layer.editable and layer.visible
    assert tuple(layer.scale) == tuple(image.scale)
    toggle(qtbot, w.annotate_panel.disagree_check)
    assert not layer.visible
    # entropy is measured on the network that segments
    w.annotate_panel.score_combo.setCurrentText("entropy")
    w.run_panel.which_combo.setCurrentText("teacher")
    click(qtbot, button(w, "Suggest slices"))
    qtbot.waitUntil(lambda: w.st.suggestions.analysis.network == "teacher" and not w.runner.busy, timeout=WAIT_MS)
    assert w.st.suggestions.analysis.method == "entropy"
    # the user's labels were never written
    assert np.array_equal(np.flatnonzero(viewer.layers["phantom labels"].data.any(axis=(1, 2))), [1, 3])


def test_accept_slice_is_one_undoable_edit(make_widget, qtbot, errors):
    viewer, w = make_widget()
    labels = viewer.layers["phantom labels"]
    truth = viewer.layers["phantom ground truth (reference only)"].data
    train_and_wait(qtbot, w)
    _wait_suggestions(qtbot, w)
    before = labels.data.copy()
    top = w.annotate_panel.ranked_slices()[0]
    click(qtbot, button(w, "Next suggested slice"))
    z = _slice_in_view(viewer, labels)
    assert z == top
    seg = viewer.layers[lc.SEGMENTATION]
    fixed = seg.data.copy()
    fixed[z] = truth[z]  # the clinician fixes the segmentation of this slice
    seg.data = fixed
    click(qtbot, button(w, "Accept slice"))
    np.testing.assert_array_equal(labels.data[z], truth[z])
    others = [k for k in range(6) if k != z]
    np.testing.assert_array_equal(labels.data[others], before[others])
    assert z not in w.annotate_panel.ranked_slices() and w.annotate_panel.suggest_list.count() == 3  # now counts as labeled
    assert w.data_panel.info_label.text().startswith("3 of 6 slices labeled")
    assert viewer.layers.selection.active.name == labels.name  # Ctrl+Z goes to the labels
    labels.undo()  # napari's own undo: the whole accept in one step
    np.testing.assert_array_equal(labels.data, before)
    assert z in w.annotate_panel.ranked_slices() and w.data_panel.info_label.text().startswith("2 of 6 slices labeled")
    labels.redo()
    np.testing.assert_array_equal(labels.data[z], truth[z])

    # an empty slice of the segmentation is not accepted (it could not count as labeled)
    empty = seg.data.copy()
    empty[0] = 0
    seg.data = empty
    n_errors, kept = len(errors), labels.data.copy()
    _go_to(viewer, 0)
    assert _slice_in_view(viewer, labels) == 0
    click(qtbot, button(w, "Accept slice"))
    assert len(errors) == n_errors + 1 and "slice 0 is empty" in errors[-1]
    np.testing.assert_array_equal(labels.data, kept)  # refused: nothing written


def test_train_on_continues_weights_teacher_and_optimiser(make_widget, qtbot):
    viewer, w = make_widget()
    w.model_panel.start_combo.setCurrentIndex(0)  # the M³HL run (the few-slice Train on is in test_napari_controls.py)
    labels = viewer.layers["phantom labels"]
    truth = viewer.layers["phantom ground truth (reference only)"].data
    assert not w.annotate_panel.train_on_btn.isEnabled()
    train_and_wait(qtbot, w)
    _wait_suggestions(qtbot, w)
    first = torch.load(w.runner.checkpoint, weights_only=True)
    assert first["iteration"] == 4 and w.st.model_iteration == 4 and w.annotate_panel.train_on_btn.isEnabled()
    # accept a slice, then train on for 3 more iterations
    seg = viewer.layers[lc.SEGMENTATION]
    fixed = seg.data.copy()
    fixed[5] = truth[5]
    seg.data = fixed
    _go_to(viewer, 5)
    assert _slice_in_view(viewer, labels) == 5
    click(qtbot, button(w, "Accept slice"))
    np.testing.assert_array_equal(labels.data[5], truth[5])
    w.annotate_panel.train_on_spin.setValue(3)
    started = []
    orig = w.run_view.on_event
    w.run_view.on_event = lambda e: (started.append(e), orig(e))  # type: ignore[method-assign]
    train_and_wait(qtbot, w, "Train on")
    from napari_m3hl.training import events as ev
    from napari_m3hl._napari.run.jobs import DataReady

    ready = next(e for e in started if isinstance(e, DataReady))
    begin = next(e for e in started if isinstance(e, ev.TrainStarted))
    assert ready.n_labeled == 3 and begin.start_iteration == 4 and begin.total_iterations == 7
    second = torch.load(w.runner.checkpoint, weights_only=True)
    assert second["iteration"] == 7 and w.st.model_iteration == 7
    assert not torch.equal(second["optimizer"]["state"][0]["momentum_buffer"],
                           first["optimizer"]["state"][0]["momentum_buffer"])
    # Train on again: 3 more
    w.run_view.on_event = orig  # type: ignore[method-assign]
    w.st.suggestions = None
    click(qtbot, button(w, "Train on"))
    qtbot.waitUntil(lambda: w.run.finished is not None and w.run.finished.iteration == 10, timeout=WAIT_MS)
    _wait_suggestions(qtbot, w)
    assert [r["how"] for r in w.st.run_history] == ["from scratch", "train on", "train on"]
    # each Train autosaved the labels (with the accepted slice) and the run's checkpoint
    folder = w.session_panel.autosave_folder()
    qtbot.waitUntil(lambda: (folder / "checkpoint.pt").is_file(), timeout=WAIT_MS)
    from napari_m3hl.io.session import load_session

    sess = load_session(folder)
    np.testing.assert_array_equal(sess.labels, labels.data)
    assert sess.meta["labeled_slices"] == [1, 3, 5] and torch.load(sess.checkpoint, weights_only=True)["iteration"] == 10


def test_session_save_and_reopen_from_nifti(make_widget, qtbot, tmp_path, errors, monkeypatch):
    from napari_m3hl._napari._sample import phantom_layers

    # a NIfTI image, opened through the plugin's reader as a clinician would
    (img, meta, _), (truth, _, _), _ = phantom_layers(shape=(6, 64, 64), painted=())
    affine = meta["metadata"]["affine"]
    path = tmp_path / "heart.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(img, (2, 1, 0)).astype(np.float32), affine), str(path))
    viewer, w = make_widget(phantom=False)
    viewer.open(str(path), plugin="napari-m3hl")
    click(qtbot, button(w, "New labels layer"))
    labels = viewer.layers["heart labels"]
    labels.data = np.where(np.isin(np.arange(6), [1, 4])[:, None, None], truth, 0).astype(np.uint8)
    train_and_wait(qtbot, w)
    _wait_suggestions(qtbot, w)
    w.annotate_panel.score_combo.setCurrentText("margin")
    w.annotate_panel.train_on_spin.setValue(7)
    folder = tmp_path / "my session"
    folder.mkdir()  # made with the folder dialog's New Folder
    asked = answer_file_dialogs(monkeypatch, folder=folder)
    click(qtbot, button(w, "Save session…"))
    assert asked == ["Save session to folder"]
    qtbot.waitUntil(lambda: "Session saved" in w.run_panel.status_label.text(), timeout=WAIT_MS)
    wait_idle(qtbot, w)
    assert {p.name for p in folder.iterdir()} >= {"labels.nii.gz", "checkpoint.pt", "settings.json", "session.json"}
    saved = nib.load(str(folder / "labels.nii.gz"))
    np.testing.assert_allclose(saved.affine, affine)  # the image's geometry
    np.testing.assert_array_equal(np.transpose(np.asarray(saved.dataobj), (2, 1, 0)), labels.data)

    # a new napari: nothing open; the session brings back image, labels, model, settings
    viewer2, w2 = make_widget(phantom=False)
    click(qtbot, button(w2, "Open session…"))
    assert asked[-1] == "Open session folder"
    qtbot.waitUntil(lambda: "opened" in w2.run_panel.status_label.text() or bool(w2.last_error), timeout=WAIT_MS)
    assert w2.last_error == ""
    wait_idle(qtbot, w2)
    assert w2.data_panel.image_layer().name == "heart" and w2.data_panel.image_layer().metadata["source_path"] == str(path)
    np.testing.assert_array_equal(w2.data_panel.labels_layer().data, labels.data)
    np.testing.assert_allclose(w2.data_panel.labels_layer().scale, viewer.layers["heart"].scale)
    assert w2.annotate_panel.score_combo.currentText() == "margin" and w2.annotate_panel.train_on_spin.value() == 7
    assert w2.runner.checkpoint == str(folder / "checkpoint.pt") and w2.st.model_iteration == 4
    assert w2.annotate_panel.train_on_btn.isEnabled() and lc.SEGMENTATION in viewer2.layers  # predicted on open
    # and the loop goes on: Train on from the reopened session
    w2.annotate_panel.train_on_spin.setValue(2)
    w2.run = None
    click(qtbot, button(w2, "Train on"))
    assert w2.run is not None, w2.last_error
    qtbot.waitUntil(lambda: w2.run.finished is not None, timeout=WAIT_MS)
    assert w2.run.fewslice and w2.run.finished.iteration == 2 and w2.st.model_iteration == 6
    wait_idle(qtbot, w2)
    assert [r["how"] for r in w2.st.run_history] == ["few-slice fine-tune", "train on"]

    # without its image the session says what to do
    viewer3, w3 = make_widget(phantom=False)
    path.unlink()
    n = len(errors)
    click(qtbot, button(w3, "Open session…"))
    qtbot.waitUntil(lambda: len(errors) > n, timeout=WAIT_MS)
    assert "heart" in errors[-1] and "(6, 64, 64)" in errors[-1] and "Open session" in errors[-1]
    assert not [lay for lay in viewer3.layers]


def test_assist_controls_explain_what_is_missing(make_widget, qtbot, errors, tmp_path, monkeypatch):
    from qtpy.QtCore import Qt

    viewer, w = make_widget()
    labels = viewer.layers["phantom labels"]
    before = labels.data.copy()
    # before a model, the controls that need one cannot be pressed: a click does nothing
    for text in ("Suggest slices", "Next suggested slice", "Accept slice", "Train on"):
        b = button(w, text)
        assert not b.isEnabled(), text
        qtbot.mouseClick(b, Qt.LeftButton)
    assert errors == [] and w.run is None and w.st.suggestions is None and w.annotate_panel.suggest_list.count() == 0
    assert lc.SEGMENTATION not in viewer.layers and labels.data.tobytes() == before.tobytes()
    # Open session… on a folder that holds no session: read in a worker, which says so
    from gui_helpers import ROOT

    asked = answer_file_dialogs(monkeypatch, folder=tmp_path, open_file=ROOT / "models" / "acdc70_unet2d.pt")
    click(qtbot, button(w, "Open session…"))
    assert asked == ["Open session folder"]
    qtbot.waitUntil(lambda: bool(errors), timeout=WAIT_MS)
    assert "not an M³HL session folder" in errors[-1]
    # with a model but a single 2D image picked, Suggest slices says what it needs
    click(qtbot, button(w, "Load checkpoint…"))
    qtbot.waitUntil(lambda: "Loaded" in w.run_panel.status_label.text(), timeout=WAIT_MS)
    wait_idle(qtbot, w)
    viewer.add_image(np.zeros((64, 64), np.float32), name="one slice")
    w.data_panel.image_combo.setCurrentText("one slice")
    n = len(errors)
    click(qtbot, button(w, "Suggest slices"))
    assert len(errors) == n + 1 and "needs an image volume" in errors[-1] and w.st.suggestions is None


def test_failed_autosave_warns_and_training_goes_on(make_widget, qtbot, monkeypatch):
    from napari_m3hl._napari.run import file_jobs

    def disk_full(snap):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(file_jobs, "save_session_job", disk_full)
    viewer, w = make_widget()
    warned: list[str] = []
    monkeypatch.setattr(w.st, "warn", warned.append)
    train_and_wait(qtbot, w)
    assert w.run.finished.iteration == 4 and Path(w.runner.checkpoint).is_file()
    assert any("Could not autosave" in m and "No space left" in m for m in warned)


def test_cine_suggests_and_accepts_in_the_frame_in_view(make_widget, qtbot):
    from napari_m3hl.data.phantom import make_phantom

    viewer, w = make_widget(phantom=False)
    frames = [make_phantom(s, shape=(4, 64, 64)) for s in (1, 2)]
    image = viewer.add_image(np.stack([f.image for f in frames]), name="cine", scale=(1.0, 10.0, 1.5, 1.5))
    click(qtbot, button(w, "New labels layer"))
    labels = viewer.layers["cine labels"]
    labels.data = np.zeros(image.data.shape, np.uint8)
    labels.data[1, 2] = frames[1].label[2]
    labels.refresh()
    w.st.config_overrides["iterations"] = 2
    viewer.dims.set_current_step(0, 1)  # time frame 1 in view
    train_and_wait(qtbot, w)
    _wait_suggestions(qtbot, w)
    assert w.st.suggestions.frame == 1 and sorted(w.annotate_panel.ranked_slices()) == [0, 1, 3]
    assert w.annotate_panel.suggest_list.item(0).text().startswith("t1 slice ")
    top = w.annotate_panel.ranked_slices()[0]
    click(qtbot, button(w, "Next suggested slice"))
    t, z = lc.slice_in_view(viewer, image)
    assert (t, z) == (1, top)
    seg = viewer.layers[lc.SEGMENTATION]
    fixed = seg.data.copy()
    fixed[1, z] = frames[1].label[z]
    seg.data = fixed
    before = labels.data.copy()
    click(qtbot, button(w, "Accept slice"))
    np.testing.assert_array_equal(labels.data[1, z], frames[1].label[z])
    changed = np.argwhere((labels.data != before).any(axis=(2, 3)))
    assert changed.tolist() == [[1, z]]  # only that slice of that frame
    assert z not in w.annotate_panel.ranked_slices()


def test_model_file_without_teacher_ranks_by_entropy(make_widget, qtbot, monkeypatch):
    from gui_helpers import ROOT

    viewer, w = make_widget()
    warned: list[str] = []
    monkeypatch.setattr(w.st, "warn", warned.append)
    answer_file_dialogs(monkeypatch, open_file=ROOT / "models" / "acdc70_unet2d.pt")
    click(qtbot, button(w, "Load checkpoint…"))
    qtbot.waitUntil(lambda: "Loaded" in w.run_panel.status_label.text(), timeout=WAIT_MS)
    assert w.annotate_panel.suggest_btn.isEnabled() and not w.annotate_panel.train_on_btn.isEnabled()  # a model file has no optimiser state
    w.annotate_panel.score_combo.setCurrentText("disagreement")
    click(qtbot, button(w, "Suggest slices"))
    _wait_suggestions(qtbot, w)
    assert w.st.suggestions.analysis.method == "entropy" and w.st.suggestions.analysis.disagreement is None
    assert any("no teacher" in m for m in warned)
    assert not w.annotate_panel.disagree_check.isEnabled()
