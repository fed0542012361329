"""Data ▸ More volumes in a saved and reopened session, every control clicked
as a user does (under Xvfb): the ticked volumes come back ticked, a labeled
one with its labels as a new layer, an unlabeled one unlabeled; a volume
whose image is gone is named and skipped while the rest opens."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
from gui_helpers import WAIT_MS, answer_file_dialogs, button, click, toggle, wait_idle

from napari_m3hl._napari.layers import control as lc
from napari_m3hl._napari.panels.data import UNLABELED


def _phantom(seed: int, painted: tuple[int, ...]):
    """(image, image meta, painted labels) of a 5 x 64 x 64 phantom."""
    from napari_m3hl._napari._sample import phantom_layers

    (image, meta, _), _, (labels, _, _) = phantom_layers(seed=seed, shape=(5, 64, 64), painted=painted)
    return image, meta, labels


def _open_more_volumes(viewer, second_path, with_second: bool):
    """The other volumes a user opens: 'second' from its NIfTI file, 'third' in memory (the phantom seed 6)."""
    if with_second:
        viewer.open(str(second_path), plugin="napari-m3hl")
    image, meta, _ = _phantom(6, ())
    viewer.add_image(image, **{**meta, "name": "third"})


def _open_session(qtbot, w, errors):
    n = len(errors)
    click(qtbot, button(w, "Open session…"))
    qtbot.waitUntil(lambda: "opened" in w.run_panel.status_label.text() or len(errors) > n, timeout=WAIT_MS)
    wait_idle(qtbot, w)
    assert len(errors) == n, errors[n:]


def test_session_saves_and_reopens_more_volumes(make_widget, qtbot, tmp_path, errors, monkeypatch):
    image2, meta2, painted2 = _phantom(5, (1, 3))
    second_path = tmp_path / "second.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(image2, (2, 1, 0)), meta2["metadata"]["affine"]), str(second_path))

    # the phantom painted on slices 1 and 3 under Data; 'second' opened from its file with its painted labels,
    # 'third' unlabeled, both ticked under More volumes
    viewer, w = make_widget()
    _open_more_volumes(viewer, second_path, with_second=True)
    second = viewer.layers["second"]
    viewer.add_labels(painted2, name="second labels", scale=second.scale, metadata=dict(second.metadata))
    w.data_panel.image_picker.value = viewer.layers["phantom image"]
    w.data_panel.labels_picker.value = viewer.layers["phantom labels"]
    toggle(qtbot, w.data_panel.extra_row("second").check)
    w.data_panel.extra_row("second").labels.setCurrentText("second labels")
    toggle(qtbot, w.data_panel.extra_row("third").check)
    assert [(i.name, lab.name) for i, lab in w.data_panel.extra_pairs()] == [("second", "second labels")]
    assert [i.name for i in w.data_panel.extra_layers()] == ["third"]

    folder = tmp_path / "with more volumes"
    folder.mkdir()
    asked = answer_file_dialogs(monkeypatch, folder=folder)
    click(qtbot, button(w, "Save session…"))
    assert asked == ["Save session to folder"]
    qtbot.waitUntil(lambda: "Session saved" in w.run_panel.status_label.text(), timeout=WAIT_MS)
    wait_idle(qtbot, w)
    assert errors == []
    listed = json.loads((folder / "session.json").read_text())["extra_volumes"]
    assert [(e["image_name"], e["image_source"], e["labels_name"], e["labels_file"]) for e in listed] == [
        ("second", str(second_path), "second labels", "more/01_labels.nii.gz"),
        ("third", "phantom seed 6", None, None)]
    saved = nib.load(str(folder / "more" / "01_labels.nii.gz"))
    np.testing.assert_allclose(saved.affine, meta2["metadata"]["affine"])  # the second volume's own geometry
    np.testing.assert_array_equal(np.transpose(np.asarray(saved.dataobj), (2, 1, 0)), painted2)

    # a new napari with the phantom and 'third' open, 'second' not: the session opens 'second' from its
    # file, adds its labels as a new layer and ticks both rows again
    viewer2, w2 = make_widget()
    _open_more_volumes(viewer2, second_path, with_second=False)
    assert "second" not in viewer2.layers
    _open_session(qtbot, w2, errors)
    assert w2.data_panel.image_layer().name == "phantom image"
    second2 = viewer2.layers["second"]
    assert second2.metadata["source_path"] == str(second_path)
    np.testing.assert_allclose(second2.data, image2, atol=1e-5)
    row2, row3 = w2.data_panel.extra_row("second"), w2.data_panel.extra_row("third")
    assert row2.check.isChecked() and row2.labels.currentText() == "second labels"
    assert row3.check.isChecked() and row3.labels.currentText() == UNLABELED
    (img, lab), = w2.data_panel.extra_pairs()
    assert lc.same_layer(img, second2) and lc.same_layer(lab, viewer2.layers["second labels"])
    np.testing.assert_array_equal(lab.data, painted2)
    np.testing.assert_allclose(lab.scale, second2.scale)
    assert [i.name for i in w2.data_panel.extra_layers()] == ["third"]
    assert lc.same_layer(viewer2.layers.selection.active, w2.data_panel.labels_layer())  # the main labels stay selected
    status = w2.run_panel.status_label.text()
    assert "2 more volume(s) ticked" in status and "+2 painted slices in 1 more volume" in status

    # without 'second''s file (and not open), it is named and skipped; 'third' still opens ticked
    second_path.unlink()
    viewer3, w3 = make_widget()
    _open_more_volumes(viewer3, second_path, with_second=False)
    _open_session(qtbot, w3, errors)
    status = w3.run_panel.status_label.text().replace("\u200b", "")
    assert "1 more volume(s) ticked" in status and "skipped 'second'" in status and "not found" in status
    assert "01_labels.nii.gz" in status  # where its labels are kept
    assert "second" not in viewer3.layers and "second labels" not in viewer3.layers
    assert w3.data_panel.extra_row("third").check.isChecked() and w3.data_panel.extra_pairs() == []
    assert [i.name for i in w3.data_panel.extra_layers()] == ["third"]
