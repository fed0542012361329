"""An M³HL fine-tune in the dock widget over two labeled volumes and one
unlabeled volume, every control clicked or picked as a user does (under
Xvfb): each overlay layer exists with the right shape and content kind, and
each volume gets its segmentation."""
from __future__ import annotations

import numpy as np
from gui_helpers import WAIT_MS, button, click, toggle, train_and_wait

from napari_m3hl._napari.layers import control as lc
from napari_m3hl._napari.layers.overlays import MIX_GAP
from napari_m3hl._napari.panels.data import UNLABELED
from napari_m3hl.fewslice.loop import Check, PseudoLabels
from napari_m3hl.training.events import MixPreview


def _add_phantom(viewer, seed: int, painted: tuple[int, ...] | None, prefix: str):
    from napari_m3hl._napari._sample import phantom_layers

    layers = phantom_layers(seed=seed, shape=(5, 64, 64), painted=painted or ())
    image = viewer.add_image(layers[0][0], **{**layers[0][1], "name": f"{prefix} image"})
    labels = None
    if painted:
        data, meta, _ = layers[-1]
        labels = viewer.add_labels(data, **{**meta, "name": f"{prefix} labels"})
    return image, labels


def test_m3hl_fine_tune_over_two_labeled_volumes_and_one_unlabeled(make_widget, qtbot, errors, monkeypatch,
                                                                    tmp_path):
    viewer, w = make_widget()  # the phantom (6 x 64 x 64) painted on slices 1 and 3, picked under Data
    image, user_labels = viewer.layers["phantom image"], viewer.layers["phantom labels"]
    second, second_labels = _add_phantom(viewer, 5, (2,), "second")
    third, _ = _add_phantom(viewer, 6, None, "third")
    w.data_panel.image_picker.value = image
    w.data_panel.labels_picker.value = user_labels
    before = [user_labels.data.copy(), second_labels.data.copy()]

    # Data ▸ More volumes: the second with its labels, the third unlabeled
    toggle(qtbot, w.data_panel.extra_row("second image").check)
    w.data_panel.extra_row("second image").labels.setCurrentText("second labels")
    toggle(qtbot, w.data_panel.extra_row("third image").check)
    assert w.data_panel.extra_row("third image").labels.currentText() == UNLABELED
    assert [(i.name, lab.name) for i, lab in w.data_panel.extra_pairs()] == [("second image", "second labels")]
    assert [i.name for i in w.data_panel.extra_layers()] == ["third image"]
    assert "+1 painted slices in 1 more volume" in w.data_panel.info_label.text()
    # Model ▸ Method: M³HL
    w.model_panel.method_combo.setCurrentText("M³HL")
    assert w.model_panel.plan().fewslice and w.model_panel.fewslice_options().mode == "m3hl"

    seen = []
    draw = w.run_view.on_event
    w.run_view.on_event = lambda e: (seen.append(e), draw(e))
    train_and_wait(qtbot, w)
    assert w.last_error == "" and errors == []
    assert w.run.fewslice and w.run.method == "m3hl" and len(w.run.sources) == 3

    # the segmentation preview: the picked image's segmentation at the last check, read-only
    checks = [e for e in seen if isinstance(e, Check)]
    preview = viewer.layers[lc.PREVIEW]
    assert preview.data.shape == image.data.shape and not preview.editable
    np.testing.assert_array_equal(preview.data, checks[-1].labels)
    assert [v.shape for v in checks[-1].volumes] == [(6, 64, 64), (5, 64, 64), (5, 64, 64)]
    # the teacher's pseudo-labels: what the last PseudoLabels event taught, none on the painted slices
    pseudo_events = [e for e in seen if isinstance(e, PseudoLabels)]
    pseudo = viewer.layers[lc.PSEUDO_LABELS]
    assert pseudo.data.shape == image.data.shape and not pseudo.editable and pseudo.data.dtype == np.uint8
    np.testing.assert_array_equal(pseudo.data, pseudo_events[-1].labels[0])
    assert not pseudo.data[[1, 3]].any()
    assert len(pseudo_events[-1].labels) == 3 and np.isnan(pseudo_events[-1].painted_dice[2])
    assert "teacher" in w.run_panel.quality_label.text()
    # the mix preview: the two mixed images side by side at the start model's input, their targets on top
    mix = [e for e in seen if isinstance(e, MixPreview)][-1]
    ph, pw = mix.images.shape[-2:]
    shown, targets = viewer.layers[lc.MIX_PREVIEW], viewer.layers[lc.MIX_TARGETS]
    assert shown.data.shape == targets.data.shape == (ph, 2 * pw + MIX_GAP)
    np.testing.assert_allclose(shown.data[:, :pw], mix.images[0])
    np.testing.assert_array_equal(targets.data[:, pw + MIX_GAP:], mix.targets[1])
    assert shown.data.dtype == np.float32 and targets.data.max() < 4
    # each volume's segmentation; the user's labels untouched
    res = w.st.finetune.result
    seg = viewer.layers[lc.SEGMENTATION]
    np.testing.assert_array_equal(seg.data, res.volumes[0].labels)
    for layer, r in ((second, res.volumes[1]), (third, res.volumes[2])):
        other = viewer.layers[f"{lc.SEGMENTATION_OF}{layer.name}"]
        assert other.data.shape == layer.data.shape
        np.testing.assert_array_equal(other.data, r.labels)
    assert res.volumes[2].verdict is None
    assert w.run_panel.verdict_label.text() == f"{res.verdict.message} {res.blend.describe()}"
    for layer, data in zip((user_labels, second_labels), before):
        assert layer.data.tobytes() == data.tobytes()
    assert lc.is_overlay(viewer.layers[f"{lc.SEGMENTATION_OF}third image"])  # not offered as a layer to train on
    click(qtbot, button(w, "Use the start model's segmentation"))
    np.testing.assert_array_equal(seg.data, res.volumes[0].base)
    click(qtbot, button(w, "Use the fine-tuned segmentation"))

    # Export writes every volume's segmentation, each with its painted slices as painted
    path = tmp_path / "seg.nii.gz"
    monkeypatch.setattr(w.run_panel, "ask_save_path", lambda caption, default, filters: str(path))
    click(qtbot, button(w, "Export…"))
    files = [path, tmp_path / "seg_second_image.nii.gz", tmp_path / "seg_third_image.nii.gz"]
    qtbot.waitUntil(lambda: all(f.is_file() for f in files), timeout=WAIT_MS)
    qtbot.waitUntil(lambda: not w.runner.busy, timeout=WAIT_MS)
    written = [viewer.open(str(f), plugin="napari-m3hl")[0].data for f in files]
    np.testing.assert_array_equal(written[1][2], second_labels.data[2])
    np.testing.assert_array_equal(written[1][[0, 1, 3, 4]], res.volumes[1].labels[[0, 1, 3, 4]])
    np.testing.assert_array_equal(written[2], res.volumes[2].labels)
    assert written[0].shape == image.data.shape
