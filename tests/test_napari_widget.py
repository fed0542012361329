"""The "Train M³HL" dock widget, end to end on a tiny phantom (runs under Xvfb).

Training uses a 6 x 64 x 64 phantom, 64 x 64 patches and batch 4, so a run
of a few iterations takes about a second on a 2-core CPU.
"""
from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_m3hl.training import events as ev
from napari_m3hl._napari.layers import control as lc
from napari_m3hl._napari.run import fewslice as _fewslice
from napari_m3hl._napari.run import jobs as _jobs
from napari_m3hl._napari.run import workers as _workers

from gui_helpers import ROOT, WAIT_MS, answer_file_dialogs, button, click, train_and_wait as _train_and_wait, \
    wait_idle as _wait_idle


def _click_refused(qtbot, w, errors, text: str = "Train") -> str:
    """Click ``text`` on bad input: one error is shown, no run starts and the
    button stays enabled (the user fixes the input and clicks again). Returns the error."""
    n = len(errors)
    click(qtbot, button(w, text))
    assert len(errors) == n + 1, errors[n:]
    assert w.run is None and not w.runner.training and button(w, text).isEnabled()
    return errors[-1]


def _click_started(qtbot, w, text: str = "Train") -> None:
    """Click ``text`` and check that a run started (:attr:`M3HLWidget.run` set)."""
    w.run = None
    click(qtbot, button(w, text))
    assert w.run is not None, w.last_error


# ------------------------------------------------------------------ layout / layers


def test_defaults_and_info_line(make_widget):
    viewer, w = make_widget()
    assert w.data_panel.image_combo.currentText() == "phantom image"
    assert w.data_panel.labels_combo.currentText() == "phantom labels"  # not the hidden ground truth
    assert w.data_panel.info_label.text() == "2 of 6 slices labeled: 1, 3; 4 unlabeled"
    assert "acdc_unet2d" in [w.model_panel.preset_combo.itemText(i) for i in range(w.model_panel.preset_combo.count())]
    # the default start fine-tunes the shipped model with the few-slice defaults (as m3hl train --labels)
    from napari_m3hl.fewslice.loop import FewSliceOptions

    adv = w.model_panel.advanced_form.values()
    assert w.model_panel.plan().fewslice and adv["iterations"] == FewSliceOptions().iterations == 75 and adv["batch_size"] == 8
    # From scratch: the M³HL run's GUI defaults on a CPU, a few hundred iterations, the preset's 256 x 256 patch
    w.model_panel.start_combo.setCurrentIndex(0)
    adv = w.model_panel.advanced_form.values()
    assert not w.model_panel.plan().fewslice and adv["iterations"] == 300 and adv["batch_size"] == 8
    assert w.model_panel.variant_combo.currentText() == "reference"
    assert adv["patch_size"] == (256, 256) and adv["lr"] == pytest.approx(0.01)
    # the form is made from TrainConfig's fields: every value it gives is a valid config
    cfg = w.model_panel.build_config()
    for key, value in adv.items():
        assert getattr(cfg, key) == (w.st.config_overrides[key] if key in w.st.config_overrides else value), key
    assert w.run_panel.run_dir_label.text().replace("\u200b", "").endswith(str(w.runner.out_dir))
    # the line follows painting
    labels = viewer.layers["phantom labels"]
    data = labels.data.copy()
    data[4, 10:20, 10:20] = 3
    labels.data = data
    assert w.data_panel.info_label.text() == "3 of 6 slices labeled: 1, 3, 4; 3 unlabeled"


def test_new_labels_layer_matches_image(make_widget, qtbot):
    viewer, w = make_widget()
    image = viewer.layers["phantom image"]
    click(qtbot, button(w, "New labels layer"))
    layer = viewer.layers["phantom image labels"]
    assert viewer.layers.selection.active is layer  # ready to paint
    assert layer.data.shape == image.data.shape and layer.data.dtype == np.uint8 and not layer.data.any()
    assert tuple(layer.scale) == tuple(image.scale)
    np.testing.assert_array_equal(layer.metadata["affine"], image.metadata["affine"])
    assert list(layer.features["class"]) == ["background", "RV", "Myo", "LV"]
    colors = layer.colormap.color_dict
    assert np.allclose(colors[1][:3], lc.CLASS_COLORS[1][:3])  # RV red
    assert np.allclose(colors[2][:3], lc.CLASS_COLORS[2][:3])  # Myo green
    assert np.allclose(colors[3][:3], lc.CLASS_COLORS[3][:3])  # LV blue
    assert w.data_panel.labels_combo.currentText() == layer.name
    assert "0 of 6 slices labeled" in w.data_panel.info_label.text()


# ------------------------------------------------------------------ training


def test_helper_jobs_load_their_model_with_their_own_thread_count(monkeypatch):
    """Predict, suggest and the end-of-run analysis load the model inside their
    torch thread count too: a pool thread starts with the process's count
    (every core by default), and loading with it would leave that thread an
    OpenMP team that slows the next Train (jobs.torch_threads)."""
    import threading

    seen: list[int] = []
    real = _jobs.load_networks

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(_jobs, "load_networks", spy)
    model = ROOT / "models" / "acdc70_unet2d.pt"
    volume = np.random.default_rng(0).random((2, 48, 48)).astype(np.float32)
    errors: list[BaseException] = []

    def pool_thread() -> None:  # as a pool thread started with 2 torch threads
        try:
            torch.set_num_threads(2)
            _jobs.analyse_job(model, volume, "entropy", "cpu", cpu_threads=1)
            _jobs.run_analysis_job(model, [volume], 0, None, "student", "cpu", 8, cpu_threads=1)
            gen = _jobs.predict_job(model, [volume], "student", "cpu", 8, cpu_threads=1)
            while True:
                try:
                    next(gen)
                except StopIteration:
                    break
            seen.append(torch.get_num_threads())  # restored afterwards
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    before = torch.get_num_threads()  # torch's count is process-wide for threads started later: put it back
    t = threading.Thread(target=pool_thread)
    t.start()
    t.join()
    torch.set_num_threads(before)
    assert not errors, errors
    assert seen == [1, 1, 1, 2]


def test_progress_is_drawn_at_most_once_per_interval_and_the_last_one_always(make_widget, qtbot):
    """The worker's Progress events reach the bar, its text and the loss plot at
    most once per ``progress_every_s``; the ones between wait for a timer or for
    the next event of another kind, and the loss plot gets every point."""
    viewer, w = make_widget()
    view, panel = w.run_view, w.run_panel
    panel.show_progress(0, 6)

    def progress(i: int) -> ev.Progress:
        return ev.Progress(i, 6, {"total": 1.0 / i}, 1e-3, 8.0, float(i), 6.0 - i)

    view.progress_every_s = 60.0  # no timer fires within the test
    for i in (1, 2, 3):
        view.on_event(progress(i))
    assert panel.progress.value() == 1 and "iteration 1/6" in panel.progress_label.text()
    assert len(panel.loss_plot.series["total"]) == 1
    view.on_event(_jobs.DataReady(2, 4, np.zeros((6, 8, 8), np.float32)))  # another kind: the waiting ones first
    assert panel.progress.value() == 3 and "iteration 3/6" in panel.progress_label.text()
    assert [p[0] for p in panel.loss_plot.series["total"]] == [1.0, 2.0, 3.0]

    view.on_event(progress(4))  # sooner than 60 s after the last drawing: it waits for the timer
    assert panel.progress.value() == 3 and view._timer.isActive()
    view._timer.start(10)  # the timer's turn comes now rather than in a minute
    qtbot.waitUntil(lambda: panel.progress.value() == 4, timeout=WAIT_MS)
    assert "iteration 4/6" in panel.progress_label.text() and len(panel.loss_plot.series["total"]) == 4
    view.on_event(progress(5))
    view.on_train_finished()  # the end of the run draws what waits
    assert panel.progress.value() == 5 and len(panel.loss_plot.series["total"]) == 5


def test_train_makes_overlays_in_place_and_keeps_user_labels(make_widget, qtbot, tmp_path, monkeypatch):
    viewer, w = make_widget()
    w.model_panel.start_combo.setCurrentIndex(0)  # the M³HL run (with the mix overlays)
    user = viewer.layers["phantom labels"]
    viewer.layers.selection.active = user
    before = user.data.copy()
    _train_and_wait(qtbot, w)
    assert w.last_error == ""
    names = [lay.name for lay in viewer.layers]
    for name in (lc.PSEUDO_LABELS, lc.MIX_PREVIEW, lc.MIX_TARGETS, lc.SEGMENTATION):
        assert name in names, names
    seg = viewer.layers[lc.SEGMENTATION]
    pseudo = viewer.layers[lc.PSEUDO_LABELS]
    assert seg.data.shape == before.shape and seg.data.dtype == np.uint8 and seg.editable
    assert pseudo.data.shape == before.shape
    assert tuple(seg.scale) == tuple(viewer.layers["phantom image"].scale)
    assert viewer.layers[lc.MIX_PREVIEW].data.ndim == 2 and viewer.layers[lc.MIX_TARGETS].data.ndim == 2
    # the user's labels are byte-identical
    assert user.data.dtype == before.dtype and user.data.tobytes() == before.tobytes()
    # progress, loss plot, checkpoint
    assert w.run_panel.progress.value() == 4 and "iteration 4/4" in w.run_panel.progress_label.text()
    assert len(w.run_panel.loss_plot.series["total"]) == 4
    ckpt = Path(w.runner.checkpoint)
    assert ckpt.is_file() and ckpt.parent.parent == tmp_path / "runs"
    assert w.run.first_preview_s is not None

    # a second run updates the same overlay layers in place; the user's edits
    # of the segmentation are kept in a layer of their own
    run_overlays = (lc.PSEUDO_LABELS, lc.MIX_PREVIEW, lc.MIX_TARGETS, lc.SEGMENTATION)
    ids_before = {name: viewer.layers[name].unique_id for name in run_overlays}
    edited = seg.data.copy()
    edited[0, :8, :8] = 2
    seg.data = edited
    w.st.config_overrides["iterations"] = 2
    _train_and_wait(qtbot, w)
    assert {name: viewer.layers[name].unique_id for name in run_overlays} == ids_before
    assert [lay.name for lay in viewer.layers].count(lc.SEGMENTATION) == 1
    kept = viewer.layers[f"{lc.SEGMENTATION} (your edits)"]
    np.testing.assert_array_equal(kept.data, edited)
    assert user.data.tobytes() == before.tobytes()
    # overlays never take the selection from the layer being painted
    assert viewer.layers.selection.active.name == "phantom labels"

    # Export… writes the segmentation with the image's geometry to the file picked in the dialog
    out, saved = tmp_path / "seg.nii.gz", tmp_path / "keep.pt"
    asked = answer_file_dialogs(monkeypatch, save_as=lambda caption: out if "segmentation" in caption else saved,
                                open_file=saved)
    click(qtbot, button(w, "Export…"))
    assert asked == ["Export segmentation as NIfTI"]
    qtbot.waitUntil(out.is_file, timeout=WAIT_MS)
    _wait_idle(qtbot, w)
    back = nib.load(str(out))
    np.testing.assert_array_equal(back.affine, viewer.layers["phantom image"].metadata["affine"])
    from napari_m3hl.fewslice.safeguard import merge_painted

    np.testing.assert_array_equal(np.transpose(np.asarray(back.dataobj), (2, 1, 0)),
                                  merge_painted(seg.data, user.data))  # the painted slices as painted

    # Save checkpoint… elsewhere and Load checkpoint… back (both in workers)
    click(qtbot, button(w, "Save checkpoint…"))
    qtbot.waitUntil(saved.is_file, timeout=WAIT_MS)
    _wait_idle(qtbot, w)
    click(qtbot, button(w, "Load checkpoint…"))
    assert asked[1:] == ["Save checkpoint", "Load checkpoint or model file"]
    qtbot.waitUntil(lambda: "Loaded" in w.run_panel.status_label.text(), timeout=WAIT_MS)
    assert w.runner.checkpoint == str(saved) and w.model_panel.start_combo.currentIndex() == 1


def test_stop_mid_run_keeps_checkpoint_and_segmentation(make_widget, qtbot):
    viewer, w = make_widget()
    w.st.config_overrides["iterations"] = 500
    w.st.preview_every_s = None  # previews off: stop is what we test
    _click_started(qtbot, w)
    qtbot.waitUntil(lambda: w.run_panel.progress.value() >= 2, timeout=WAIT_MS)
    # Pause holds the iteration count, Resume continues
    click(qtbot, w.run_panel.pause_btn)
    assert w.run_panel.resume_btn.isEnabled() and not w.run_panel.pause_btn.isEnabled()
    # the step in flight finishes (slowly on a loaded machine); then the count holds
    seen = {"value": w.run_panel.progress.value(), "since": time.perf_counter()}

    def settled() -> bool:
        value = w.run_panel.progress.value()
        if value != seen["value"]:
            seen.update(value=value, since=time.perf_counter())
        return time.perf_counter() - seen["since"] > 2.0

    qtbot.waitUntil(settled, timeout=WAIT_MS)
    held = w.run_panel.progress.value()
    qtbot.wait(800)
    assert w.run_panel.progress.value() == held
    click(qtbot, w.run_panel.resume_btn)
    qtbot.waitUntil(lambda: w.run_panel.progress.value() > held, timeout=WAIT_MS)
    click(qtbot, w.run_panel.stop_btn)
    qtbot.waitUntil(lambda: w.run.finished is not None, timeout=WAIT_MS)
    fin = w.run.finished
    assert fin.stopped and fin.iteration < 500
    ckpt = torch.load(fin.checkpoint, weights_only=True)
    assert ckpt["iteration"] == fin.iteration and "optimizer" in ckpt
    qtbot.waitUntil(lambda: not w.runner.busy and lc.SEGMENTATION in viewer.layers, timeout=WAIT_MS)
    assert w.run_panel.train_btn.isEnabled() and not w.run_panel.stop_btn.isEnabled()


def test_cine_4d_trains_on_all_frames(make_widget, qtbot):
    from napari_m3hl.data.phantom import make_phantom

    viewer, w = make_widget(phantom=False)
    frames = [make_phantom(s, shape=(4, 64, 64)) for s in (1, 2)]
    image = np.stack([f.image for f in frames])
    labels = np.zeros(image.shape, np.uint8)
    labels[1, 2] = frames[1].label[2]
    viewer.add_image(image, name="cine", scale=(1.0, 10.0, 1.5, 1.5))
    click(qtbot, button(w, "New labels layer"))
    lab_layer = viewer.layers["cine labels"]
    lab_layer.data = labels
    assert w.data_panel.info_label.text().startswith("1 of 8 slices labeled: t1:2")
    viewer.dims.set_current_step(0, 1)
    w.st.config_overrides["iterations"] = 2
    _train_and_wait(qtbot, w)
    assert w.run.fewslice and w.run.preview_frame == 1  # the painted frame is previewed
    assert [ref for ref in w.run.volume_refs] == [(0, 1), (0, 0)]  # frame 1 painted, frame 0 unlabeled data
    preview = viewer.layers[lc.PREVIEW].data
    assert preview.shape == image.shape and not preview[0].any()
    assert viewer.layers[lc.SEGMENTATION].data.shape == image.shape


def test_stale_pseudo_labels_are_dropped(make_widget):
    from napari_m3hl._napari.run.request import RunState

    viewer, w = make_widget()
    image, labels = viewer.layers["phantom image"], viewer.layers["phantom labels"]
    token = w.st.versions.token([image, labels])
    w.run = RunState(image=image, labels=labels, token=token, preview_frame=0,
                     class_names=("background", "RV", "Myo", "LV"), run_dir=Path("."), batch_size=4)
    pred = np.ones(image.data.shape, np.uint8)
    data = labels.data.copy()
    data[0, 0, 0] = 2
    labels.data = data  # the user edits while training
    w.run_view.on_event(ev.VolumePreview(5, pred, token))
    assert lc.PSEUDO_LABELS not in viewer.layers and w.run.dropped_previews == 1
    w.run_view.on_event(ev.VolumePreview(6, pred, w.st.versions.token([image, labels])))
    assert lc.PSEUDO_LABELS in viewer.layers


# ------------------------------------------------------------------ bad input


def test_no_image_layer(make_widget, qtbot, errors):
    viewer, w = make_widget(phantom=False)
    assert "No image layer" in _click_refused(qtbot, w, errors)
    assert w.run_panel.status_label.text().replace("\u200b", "") == errors[-1]
    assert "No image layer" in _click_refused(qtbot, w, errors, "New labels layer")
    assert len(viewer.layers) == 0  # no labels layer made


def test_2d_image_needs_a_volume(make_widget, qtbot, errors):
    viewer, w = make_widget(phantom=False)
    viewer.add_image(np.random.default_rng(0).random((64, 64), dtype=np.float32), name="slice")
    _click_refused(qtbot, w, errors)
    assert "2D" in errors[-1] and "volume" in errors[-1]


def test_labels_shape_mismatch_names_both_shapes(make_widget, qtbot, errors):
    viewer, w = make_widget()
    viewer.add_labels(np.ones((6, 32, 32), np.uint8), name="wrong grid", scale=(10.0, 1.5, 1.5))
    w.data_panel.labels_combo.setCurrentText("wrong grid")
    _click_refused(qtbot, w, errors)
    assert "(6, 32, 32)" in errors[-1] and "(6, 64, 64)" in errors[-1]


def test_labels_scale_mismatch(make_widget, qtbot, errors):
    viewer, w = make_widget()
    viewer.add_labels(viewer.layers["phantom labels"].data.copy(), name="other spacing", scale=(5.0, 1.0, 1.0))
    w.data_panel.labels_combo.setCurrentText("other spacing")
    _click_refused(qtbot, w, errors)
    assert "voxel size" in errors[-1] and "(5.0, 1.0, 1.0)" in errors[-1]


def test_no_labeled_slice(make_widget, qtbot, errors):
    viewer, w = make_widget(painted=())
    assert "0 of 6 slices labeled" in w.data_panel.info_label.text()
    _click_refused(qtbot, w, errors)
    assert "No labeled slice" in errors[-1]


def test_label_value_beyond_classes(make_widget, qtbot, errors):
    viewer, w = make_widget()
    lab = viewer.layers["phantom labels"]
    data = lab.data.copy()
    data[1, 0, 0] = 7
    lab.data = data
    _click_refused(qtbot, w, errors)
    assert "value 7" in errors[-1] and "4 classes" in errors[-1]


def test_out_of_memory_suggests_smaller_batch(make_widget, qtbot, errors, monkeypatch):
    def oom_job(req, control):
        yield _jobs.DataReady(2, 4, np.zeros((6, 64, 64), np.float32))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(_jobs, "train_job", oom_job)
    monkeypatch.setattr(_fewslice, "fewslice_job", oom_job)
    viewer, w = make_widget()
    before = viewer.layers["phantom labels"].data.copy()
    _click_started(qtbot, w)
    qtbot.waitUntil(lambda: bool(errors), timeout=WAIT_MS)
    _wait_idle(qtbot, w)
    msg = errors[-1]
    assert "out of device memory" in msg and "batch size" in msg and "(now 4" in msg and "patch size" in msg
    assert w.run_panel.train_btn.isEnabled()
    assert viewer.layers["phantom labels"].data.tobytes() == before.tobytes()


def test_worker_crash_is_reported_and_data_kept(make_widget, qtbot, errors, monkeypatch):
    def crash_job(req, control):
        yield _jobs.DataReady(2, 4, np.zeros((6, 64, 64), np.float32))
        raise RuntimeError("segfault-like failure in a kernel")

    monkeypatch.setattr(_jobs, "train_job", crash_job)
    monkeypatch.setattr(_fewslice, "fewslice_job", crash_job)
    viewer, w = make_widget()
    before = {lay.name: lay.data.tobytes() for lay in viewer.layers}
    _click_started(qtbot, w)
    qtbot.waitUntil(lambda: bool(errors), timeout=WAIT_MS)
    _wait_idle(qtbot, w)
    assert "Training failed: RuntimeError: segfault-like failure" in errors[-1]
    assert {name: viewer.layers[name].data.tobytes() for name in before} == before
    assert w.run_panel.train_btn.isEnabled()


def test_checkpoint_with_other_class_count(make_widget, qtbot, errors, tmp_path, monkeypatch):
    from napari_m3hl.io.checkpoint import make_payload, save_checkpoint
    from napari_m3hl.config import TrainConfig
    from napari_m3hl.method.networks import build_network

    cfg = TrainConfig(num_classes=2, class_names=("background", "LA"), patch_size=(64, 64), block_size=(16, 16))
    path = save_checkpoint(tmp_path / "la.pt", make_payload(cfg, build_network("unet2d", 1, 2)))
    viewer, w = make_widget()
    # Load checkpoint… checks the file picked in a worker
    asked = answer_file_dialogs(monkeypatch, open_file=path)
    click(qtbot, button(w, "Load checkpoint…"))
    assert asked == ["Load checkpoint or model file"]
    qtbot.waitUntil(lambda: bool(errors), timeout=WAIT_MS)
    assert "predicts 2 classes" in errors[-1] and "4" in errors[-1]
    assert w.runner.checkpoint is None
    # fine-tuning from it (the few-slice path) fails in the worker, which names the file and its classes
    w.model_panel.start_combo.setCurrentIndex(1)
    w.model_panel.start_path.setText(str(path))
    errors.clear()
    _click_started(qtbot, w)
    qtbot.waitUntil(lambda: bool(errors), timeout=WAIT_MS)
    _wait_idle(qtbot, w)
    assert "la.pt has 2 classes" in errors[-1] and "0..3" in errors[-1]
    # so does the M³HL run from it (Resume checkpoint), in the trainer
    w.model_panel.start_combo.setCurrentIndex(2)
    errors.clear()
    _click_started(qtbot, w)
    qtbot.waitUntil(lambda: bool(errors), timeout=WAIT_MS)
    _wait_idle(qtbot, w)
    assert "predicts 2 classes" in errors[-1]


def test_missing_start_file(make_widget, qtbot, errors):
    viewer, w = make_widget()
    w.model_panel.start_combo.setCurrentIndex(2)
    w.model_panel.start_path.setText("")
    assert "needs a checkpoint" in _click_refused(qtbot, w, errors)
    w.model_panel.start_path.setText("/nonexistent/last.pt")
    assert "does not exist" in _click_refused(qtbot, w, errors)


def test_predict_and_export_need_a_model(make_widget, qtbot, errors, monkeypatch, tmp_path):
    """Before a model and a segmentation exist, Predict, Export… and Save
    checkpoint… cannot be pressed: a click does nothing (no dialog, no job, no file)."""
    from qtpy.QtCore import Qt

    viewer, w = make_widget()
    out = tmp_path / "never.nii.gz"
    asked = answer_file_dialogs(monkeypatch, save_as=out)
    layers, status = [lay.name for lay in viewer.layers], w.run_panel.status_label.text()
    for text in ("Predict", "Export…", "Save checkpoint…"):
        b = button(w, text)
        assert not b.isEnabled(), text
        qtbot.mouseClick(b, Qt.LeftButton)
    assert asked == [] and errors == [] and w.run_panel.status_label.text() == status and not out.exists()
    assert [lay.name for lay in viewer.layers] == layers


def test_error_messages_for_worker_failures():
    """OOM in its two forms, wrapped or not, suggests a smaller batch; others name the checkpoint."""
    from napari_m3hl.errors import M3HLInputError

    plain = RuntimeError("CUDA error: out of memory")
    for exc in (plain, _workers.JobError(plain), torch.OutOfMemoryError("MPS backend out of memory")):
        assert _workers.is_out_of_memory(exc)
        msg = _workers.describe_error(exc, "Training", batch_size=24)
        assert "out of device memory" in msg and "(now 24; try 12)" in msg
    assert _workers.describe_error(M3HLInputError("bad labels"), "Training") == "bad labels"
    msg = _workers.describe_error(_workers.JobError(RuntimeError("boom")), "Training", checkpoint="/r/last.pt")
    assert msg.startswith("Training failed: RuntimeError: boom") and "/r/last.pt" in msg


@pytest.mark.skipif(not (ROOT / "models" / "acdc7_m3hl_unet2d.pt").is_file(), reason="no shipped model file")
def test_shipped_model_loads_and_predicts(make_widget, qtbot, monkeypatch):
    """Load checkpoint… with the shipped model, then Predict: a segmentation without training."""
    viewer, w = make_widget()
    answer_file_dialogs(monkeypatch, open_file=ROOT / "models" / "acdc7_m3hl_unet2d.pt")
    click(qtbot, button(w, "Load checkpoint…"))
    qtbot.waitUntil(lambda: "Loaded" in w.run_panel.status_label.text(), timeout=WAIT_MS)
    assert w.run_panel.predict_btn.isEnabled()
    click(qtbot, button(w, "Predict"))
    qtbot.waitUntil(lambda: lc.SEGMENTATION in viewer.layers and not w.runner.busy, timeout=WAIT_MS)
    seg = viewer.layers[lc.SEGMENTATION].data
    assert seg.shape == (6, 64, 64) and seg.dtype == np.uint8 and seg.max() <= 3


def test_default_start_is_fine_tuning_the_shipped_cardiac_model(make_widget):
    from napari_m3hl.config import MODELS_DIR

    viewer, w = make_widget()
    assert w.model_panel.start_combo.currentText() == "Fine-tune from file"
    assert w.model_panel.start_path.text() == str(MODELS_DIR / "acdc70_unet2d.pt")


def test_preview_quality_dice_on_painted_and_change_on_unpainted():
    """Dice against the painted slices; change counted over the heart pixels of the unpainted ones."""
    from napari_m3hl._napari.run.jobs import preview_quality

    names = ("background", "RV", "Myo", "LV")
    labels = np.zeros((3, 4, 4), np.uint8)
    labels[0, :2, :2] = 1  # slice 0 painted: 4 px RV
    pred = np.zeros_like(labels)
    pred[0, :2, :1] = 1  # 2 of the 4 RV px found: Dice 2*2/(2+4)
    pred[1, :2, :2] = 3  # unpainted slice: 4 px LV
    q = preview_quality(7, pred, labels, None, names)
    assert q.iteration == 7 and q.per_class == {"RV": pytest.approx(2 / 3)} and q.dice == pytest.approx(2 / 3)
    assert q.relabelled is None  # no previous preview
    later = pred.copy()
    later[1, 0, 0] = 2  # one of the 4 heart px of the unpainted slices changes
    later[0] = labels[0]  # the painted slice now perfect: does not count as change
    q2 = preview_quality(8, later, labels, pred, names)
    assert q2.dice == pytest.approx(1.0) and q2.relabelled == pytest.approx(1 / 4)
    assert preview_quality(9, later, np.zeros_like(labels), later, names).dice is None


def test_overlay_update_writes_only_changed_pixels(make_widget):
    viewer, w = make_widget()
    names = ("background", "RV", "Myo", "LV")
    layer = lc.upsert_labels(viewer, lc.PSEUDO_LABELS, np.zeros((2, 6, 64, 64), np.uint8), names)
    data_before = layer.data
    frame = np.zeros((6, 64, 64), np.uint8)
    frame[2, 10:20, 10:20] = 3
    assert lc.update_changed(layer, frame, (1,)) == 100  # few pixels: written in place
    assert layer.data is data_before and not layer.data[0].any()
    np.testing.assert_array_equal(layer.data[1], frame)
    assert lc.update_changed(layer, frame, (1,)) == 0
    assert lc.update_changed(layer, np.ones((6, 64, 64), np.uint8), (1,)) > 0.25 * frame.size  # most: replaced
    assert layer.data[1].min() == 1 and not layer.data[0].any()
    layer.visible = False  # hidden (napari does not slice it): the array is written, shown on re-slice
    assert lc.update_changed(layer, frame, (1,)) > 0
    layer.visible = True
    np.testing.assert_array_equal(layer.data[1], frame)
    assert not layer.data[0].any()
