"""Train with a start model in the dock widget: the few-slice fine-tune, the
safeguard's verdict and its control, and the merged export (under Xvfb,
every control clicked with the mouse)."""
from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import torch
from gui_helpers import WAIT_MS, button, click, toggle, train_and_wait, wait_idle

from napari_m3hl._napari.layers import control as lc
from napari_m3hl._napari.run import fewslice as fewslice_job
from napari_m3hl.fewslice.loop import FewSliceOptions
from napari_m3hl.fewslice.safeguard import check_finetune, merge_painted
from napari_m3hl.training import trainer


def _export(qtbot, w, monkeypatch, path):
    monkeypatch.setattr(w.run_panel, "ask_save_path", lambda caption, default, filters: str(path))
    click(qtbot, button(w, "Export…"))
    qtbot.waitUntil(path.is_file, timeout=WAIT_MS)
    wait_idle(qtbot, w)


@dataclasses.dataclass
class _NoBlend(FewSliceOptions):
    """The few-slice defaults with the fine-tuned network segmenting alone (no start-model blend)."""

    start_blend: float = 0.0


def _wrecking_step(real):
    """A training step that leaves a network segmenting background everywhere: a
    bad fine-tune made for certain, not by a large learning rate (which may
    as well improve a run). The final layer is set to favour background and
    the step's loss gets no gradient, so no update undoes it."""
    def step(config, student, img_l, lab_l, autocast):
        net = getattr(student, "module", student)
        with torch.no_grad():
            net.out.weight.zero_()
            net.out.bias.copy_(torch.tensor([20.0] + [-20.0] * (net.out.bias.numel() - 1)))
        res = real(config, student, img_l, lab_l, autocast)
        res.losses["total"] = res.losses["total"] * 0.0
        return res

    return step


def test_train_runs_the_fewslice_fine_tune_with_the_clis_defaults(make_widget, qtbot, errors):
    viewer, w = make_widget()
    assert w.model_panel.plan().fewslice  # the default start: the shipped cardiac model
    defaults = FewSliceOptions()
    adv = w.model_panel.advanced_form.values()
    assert (adv["iterations"], adv["batch_size"], adv["lr"]) == (defaults.iterations, defaults.batch_size, defaults.lr)
    user = viewer.layers["phantom labels"]
    before = user.data.copy()
    train_and_wait(qtbot, w)
    assert w.last_error == "" and errors == []
    assert w.run.fewslice and w.run.finished.iteration == 4
    res = w.st.finetune.result
    seg = viewer.layers[lc.SEGMENTATION]
    np.testing.assert_array_equal(seg.data, res.labels)  # the fine-tuned network's segmentation is shown
    assert res.base.shape == seg.data.shape and res.labels.dtype == np.uint8
    # the preview layer showed the whole volume's segmentation at the check, with its Dice beside the plot
    np.testing.assert_array_equal(viewer.layers[lc.PREVIEW].data, res.labels)
    assert lc.PSEUDO_LABELS not in viewer.layers  # a supervised fine-tune teaches no pseudo-labels
    assert "Dice, painted\n" in w.run_panel.quality_label.text() and "–" not in w.run_panel.quality_label.text().split("\n")[1]
    # the verdict shown is the safeguard's on these segmentations (whether 4 steps help is not guaranteed)
    assert res.verdict == check_finetune(res.base, res.labels, before, 4, tuple(w.run.class_names))
    assert w.run_panel.verdict_label.text() == f"{res.verdict.message} {res.blend.describe()}"
    assert lc.MIX_PREVIEW not in viewer.layers  # no mixing in the few-slice fine-tune
    assert w.st.suggestions is not None  # the slices are ranked after the run
    assert user.data.tobytes() == before.tobytes()  # training never writes the user's labels


def test_a_suspect_fine_tune_is_said_and_the_start_segmentation_kept(make_widget, qtbot, errors, monkeypatch,
                                                                     tmp_path):
    viewer, w = make_widget()
    warned = []
    monkeypatch.setattr(w.st, "warn", warned.append)
    monkeypatch.setattr(trainer, "supervised_losses", _wrecking_step(trainer.supervised_losses))
    monkeypatch.setattr(fewslice_job, "FewSliceOptions", _NoBlend)  # the wrecked network alone: certainly worse
    train_and_wait(qtbot, w)
    res = w.st.finetune.result
    assert not res.labels.any()  # the stubbed step made the network segment background everywhere
    assert res.verdict.suspect and res.verdict.painted_tuned == 0.0 < res.verdict.painted_base
    assert w.run_panel.verdict_label.text() == f"{res.verdict.message} {res.blend.describe()}"
    assert "worse than the start model" in res.verdict.message
    assert any("Use the start model's segmentation" in m for m in warned)
    seg = viewer.layers[lc.SEGMENTATION]
    np.testing.assert_array_equal(seg.data, res.labels)

    click(qtbot, button(w, "Use the start model's segmentation"))
    np.testing.assert_array_equal(seg.data, res.base)
    assert viewer.layers[lc.SEGMENTATION].unique_id == seg.unique_id  # in place, same layer

    # Export: the start model's segmentation with the painted slices exactly as painted
    image = viewer.layers["phantom image"]
    painted = viewer.layers["phantom labels"].data
    merged_path, alone_path = tmp_path / "merged.nii.gz", tmp_path / "alone.nii.gz"
    _export(qtbot, w, monkeypatch, merged_path)
    toggle(qtbot, w.run_panel.prediction_only_check)
    _export(qtbot, w, monkeypatch, alone_path)
    merged = viewer.open(str(merged_path), plugin="napari-m3hl")[0]
    alone = viewer.open(str(alone_path), plugin="napari-m3hl")[0]
    np.testing.assert_array_equal(merged.data, merge_painted(res.base, painted))
    np.testing.assert_array_equal(merged.data[[1, 3]], painted[[1, 3]])
    np.testing.assert_array_equal(alone.data, res.base)
    assert not np.array_equal(alone.data[[1, 3]], painted[[1, 3]])  # the network alone differs where painted
    for path in (merged_path, alone_path):
        np.testing.assert_allclose(nib.load(str(path)).affine, image.metadata["affine"], atol=1e-5)

    click(qtbot, button(w, "Use the fine-tuned segmentation"))
    np.testing.assert_array_equal(seg.data, res.labels)


def test_other_start_modes_keep_the_m3hl_run(make_widget, qtbot):
    viewer, w = make_widget()
    w.model_panel.start_combo.setCurrentIndex(0)  # From scratch
    assert not w.model_panel.plan().fewslice and w.model_panel.advanced_form.values()["iterations"] == 300
    train_and_wait(qtbot, w)
    assert not w.run.fewslice and w.st.finetune is None and lc.MIX_PREVIEW in viewer.layers
    assert not w.run_panel.keep_start_btn.isEnabled()


def test_the_train_click_adds_no_layer_itself(make_widget, qtbot):
    """Adding a layer costs the GUI thread 0.1–0.3 s: the click handler queues the
    overlay layers, and later turns of the event loop add them one at a time."""
    from gui_helpers import wait_run

    viewer, w = make_widget()
    w.model_panel.start_combo.setCurrentIndex(0)  # the M³HL run: preview and both mix overlays
    before = [lay.name for lay in viewer.layers]
    click(qtbot, w.run_panel.train_btn)
    assert w.run is not None and [lay.name for lay in viewer.layers] == before
    qtbot.waitUntil(lambda: all(n in viewer.layers for n in (lc.PSEUDO_LABELS, lc.MIX_PREVIEW, lc.MIX_TARGETS)),
                    timeout=WAIT_MS)
    wait_run(qtbot, w)


def test_overlay_layers_leave_the_selection_and_paint_tools_alone(make_widget, qtbot):
    """The overlays are added without selecting them (the user keeps painting
    their labels layer); the read-only preview gets no paint-tool visuals, the
    editable segmentation gets them when the user picks a paint tool."""
    from gui_helpers import wait_run

    viewer, w = make_widget()
    mine = w.data_panel.labels_layer()
    viewer.layers.selection.active = mine
    click(qtbot, w.run_panel.train_btn)
    wait_run(qtbot, w)
    assert viewer.layers.selection.active.name == mine.name
    preview, seg = viewer.layers[lc.PREVIEW], viewer.layers[lc.SEGMENTATION]
    assert not preview.editable and seg.editable
    assert not any(preview._overlays[k].visible for k in lc.PAINT_OVERLAYS)
    assert not any(seg._overlays[k].visible for k in lc.PAINT_OVERLAYS)
    seg.mode = "paint"  # the user picks the brush
    qtbot.waitUntil(lambda: all(seg._overlays[k].visible for k in lc.PAINT_OVERLAYS), timeout=5000)


def test_the_fewslice_train_takes_every_core(make_widget, qtbot, errors, monkeypatch):
    """The widget's few-slice Train trains with every core the process may use
    (``runtime.thread_count("gui_fewslice")``): the measured choice that makes the
    GUI's path as fast as the engine's; the threads are restored afterwards."""
    import os

    from napari_m3hl.fewslice import loop as fs

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    seen: list[int] = []
    real_run = fs.run

    def run(*args, **kwargs):
        seen.append(torch.get_num_threads())
        yield from real_run(*args, **kwargs)

    monkeypatch.setattr(fs, "run", run)
    before = torch.get_num_threads()
    viewer, w = make_widget()
    train_and_wait(qtbot, w)
    assert w.last_error == "" and errors == []
    assert seen == [3]  # all three cores, not one left to the GUI as for a long run
    assert torch.get_num_threads() == before
