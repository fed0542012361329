"""The Measurements group of the dock widget (runs under Xvfb): it fills after
a click on Train or Predict, shows units, plots a cine's volumes and writes
CSV/JSON next to the exported NIfTI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from napari_m3hl._napari.layers import control as lc
from napari_m3hl.metrics.clinical import measure

from gui_helpers import WAIT_MS, answer_file_dialogs, click, toggle, train_and_wait, wait_idle


def test_measurements_fill_after_train_and_export_beside_the_nifti(make_widget, qtbot, tmp_path, monkeypatch):
    viewer, w = make_widget()
    panel = w.measure_panel
    assert panel.title() == "Measurements" and not panel.save_btn.isEnabled()
    w.model_panel.start_combo.setCurrentIndex(0)  # a short M³HL run from scratch
    train_and_wait(qtbot, w)
    qtbot.waitUntil(lambda: panel.result is not None, timeout=WAIT_MS)
    seg = viewer.layers[lc.SEGMENTATION].data
    want = measure(seg, viewer.layers["phantom image"].scale)  # the phantom's (D, H, W) voxel size, mm
    got = panel.result.frames[0]
    assert got.lv_ml == pytest.approx(want.frames[0].lv_ml) and got.myo_g == pytest.approx(want.frames[0].myo_g)
    text = panel.text.text()
    assert "LV blood pool" in text and " mL" in text and " g" in text
    assert panel.save_btn.isEnabled() and not panel.plot.isVisible()

    out = tmp_path / "seg.nii.gz"
    answer_file_dialogs(monkeypatch, save_as=out)
    click(qtbot, w.run_panel.export_btn)
    csv_path, json_path = tmp_path / "seg_measurements.csv", tmp_path / "seg_measurements.json"
    qtbot.waitUntil(lambda: json_path.is_file(), timeout=WAIT_MS)
    wait_idle(qtbot, w)
    from napari_m3hl.fewslice.safeguard import merge_painted

    exported = measure(merge_painted(seg, viewer.layers["phantom labels"].data),
                       viewer.layers["phantom image"].scale)  # what was written: painted slices as painted
    d = json.loads(json_path.read_text())
    assert d["frames"][0]["lv_ml"] == pytest.approx(exported.frames[0].lv_ml, abs=1e-3)
    assert csv_path.read_text().startswith("frame,lv_ml,rv_ml,myo_ml,myo_g,phase")


def test_cine_plot_after_predict_and_no_voxel_size(make_widget, qtbot, monkeypatch):
    """Predict on a cine: every frame measured, the volume curve drawn; on an
    image without a voxel size the group says so and shows no numbers."""
    from gui_helpers import ROOT
    from napari_m3hl.data.phantom import make_phantom

    model = ROOT / "models" / "acdc70_unet2d.pt"
    if not model.is_file():
        pytest.skip("no shipped model file")
    viewer, w = make_widget(phantom=False)
    frames = [make_phantom(s, shape=(4, 64, 64)) for s in (1, 2, 3)]
    image = np.stack([f.image for f in frames])
    viewer.add_image(image, name="cine", scale=(1.0, 10.0, 1.5, 1.5))
    answer_file_dialogs(monkeypatch, open_file=model)
    click(qtbot, w.run_panel.load_ckpt_btn)
    qtbot.waitUntil(lambda: "Loaded" in w.run_panel.status_label.text(), timeout=WAIT_MS)
    click(qtbot, w.run_panel.predict_btn)
    qtbot.waitUntil(lambda: w.measure_panel.result is not None and not w.runner.busy, timeout=WAIT_MS)
    seg = viewer.layers[lc.SEGMENTATION].data
    r = w.measure_panel.result
    want = measure(seg, (10.0, 1.5, 1.5))  # the layer's scale: no NIfTI geometry
    assert len(r.frames) == 3 and (r.ed, r.es) == (want.ed, want.es)
    assert r.lv.ef_pct == pytest.approx(want.lv.ef_pct) and "EF" in w.measure_panel.text.text()
    assert w.measure_panel.plot.isVisibleTo(w.measure_panel)
    assert w.measure_panel.plot.curves["LV"] == pytest.approx([f.lv_ml for f in want.frames])
    # an image without a voxel size (scale 1, no geometry): nothing is guessed
    viewer.add_image(image[0], name="bare")
    w.data_panel.image_combo.setCurrentText("bare")
    click(qtbot, w.run_panel.predict_btn)
    qtbot.waitUntil(lambda: "No measurements" in w.measure_panel.text.text(), timeout=WAIT_MS)
    assert w.measure_panel.result is None and "voxel size" in w.measure_panel.text.text()
    assert not w.measure_panel.save_btn.isEnabled()


def test_clean_checkbox_reaches_predict_and_measurements_follow(make_widget, qtbot, monkeypatch):
    """Untick Clean, click Predict: the job segments without cleaning; the
    Measurements group fills again after the click."""
    from gui_helpers import ROOT
    from napari_m3hl._napari.run import jobs

    model = ROOT / "models" / "acdc70_unet2d.pt"
    if not model.is_file():
        pytest.skip("no shipped model file")
    seen: list[bool] = []
    real = jobs.load_networks

    def spy(*args, **kwargs):
        seen.append(kwargs.get("clean", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(jobs, "load_networks", spy)
    viewer, w = make_widget()
    assert w.run_panel.clean_check.isChecked()  # clean by default
    answer_file_dialogs(monkeypatch, open_file=model)
    click(qtbot, w.run_panel.load_ckpt_btn)
    qtbot.waitUntil(lambda: "Loaded" in w.run_panel.status_label.text(), timeout=WAIT_MS)
    for expect in (True, False):
        w.measure_panel.result = None
        click(qtbot, w.run_panel.predict_btn)
        qtbot.waitUntil(lambda: w.measure_panel.result is not None, timeout=WAIT_MS)
        wait_idle(qtbot, w)
        assert seen[-1] is expect
        if expect:
            toggle(qtbot, w.run_panel.clean_check)
    assert "mL" in w.measure_panel.text.text()
