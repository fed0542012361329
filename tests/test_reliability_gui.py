"""The widget's side of issue 25, clicked as a user does: Export never writes
onto the image file or into a folder it cannot write, labels on another grid
are refused naming the offset, a partly painted slice is named before the
few-slice fine-tune starts."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from gui_helpers import WAIT_MS, answer_file_dialogs, button, click, wait_idle
from test_reliability import _digest, _nifti

from napari_m3hl._napari.layers import control as lc
from napari_m3hl.data.phantom import make_phantom_cohort

AFFINE = np.array([[1.4, 0, 0, -40.0], [0, 1.4, 0, 12.0], [0, 0, 8.0, 3.5], [0, 0, 0, 1]])


def _scan(tmp_path: Path) -> tuple[Path, np.ndarray]:
    ph = make_phantom_cohort(1, seed=5, shape=(6, 64, 64))[0]
    folder = tmp_path / "scans"
    folder.mkdir()
    return _nifti(folder / "scan.nii.gz", ph.image.astype(np.float32)), ph.label


def _with_segmentation(viewer, scan: Path, labels: np.ndarray):
    """The scan opened from its file and a segmentation layer made from it, as Predict makes it."""
    image = viewer.open(str(scan), plugin="napari-m3hl")[0]
    seg = viewer.add_labels(labels.astype(np.uint8), name=lc.SEGMENTATION, **lc.geometry_kwargs(image))
    return image, seg


def test_export_onto_the_image_file_is_refused(make_widget, qtbot, monkeypatch, tmp_path, errors):
    viewer, w = make_widget(phantom=False)
    scan, truth = _scan(tmp_path)
    _with_segmentation(viewer, scan, truth)
    before = _digest(scan.parent)
    answer_file_dialogs(monkeypatch, save_as=str(scan))
    click(qtbot, button(w, "Export…"))
    wait_idle(qtbot, w)
    qtbot.waitUntil(lambda: bool(w.last_error), timeout=WAIT_MS)
    assert "scan.nii.gz" in w.last_error and "is the image" in w.last_error, w.last_error
    assert _digest(scan.parent) == before


def test_export_into_a_read_only_folder_is_refused(make_widget, qtbot, monkeypatch, tmp_path, errors):
    viewer, w = make_widget(phantom=False)
    scan, truth = _scan(tmp_path)
    _with_segmentation(viewer, scan, truth)
    ro = tmp_path / "read_only"
    ro.mkdir()
    real = tempfile.mkstemp

    def no_write(*args, dir=None, **kwargs):  # root ignores chmod: refuse as a read-only folder does
        if dir is not None and Path(dir) == ro:
            raise PermissionError(13, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", no_write)
    answer_file_dialogs(monkeypatch, save_as=str(ro / "seg.nii.gz"))
    click(qtbot, button(w, "Export…"))
    wait_idle(qtbot, w)
    qtbot.waitUntil(lambda: bool(w.last_error), timeout=WAIT_MS)
    assert "read_only" in w.last_error and "not writable" in w.last_error and "Permission denied" in w.last_error
    assert list(ro.iterdir()) == []


def test_labels_on_another_grid_are_refused_naming_the_offset(make_widget, qtbot, tmp_path, errors):
    viewer, w = make_widget(phantom=False)
    scan, truth = _scan(tmp_path)
    image = viewer.open(str(scan), plugin="napari-m3hl")[0]
    moved = AFFINE.copy()
    moved[:3, 3] += [30.0, 0, 0]
    lab_file = _nifti(tmp_path / "moved_labels.nii.gz", np.where(np.isin(np.arange(6), [1, 4])[:, None, None], truth, 0),
                      affine=moved, dtype=np.uint8)
    labels = viewer.open(str(lab_file), plugin="napari-m3hl")[0]
    w.data_panel.image_combo.setCurrentIndex([lay.name for lay in w.data_panel.image_picker.choices].index(image.name))
    idx = [lay.name for lay in w.data_panel.labels_picker.choices].index(labels.name)
    w.data_panel.labels_combo.setCurrentIndex(idx)
    click(qtbot, w.run_panel.train_btn)
    assert w.run is None
    assert "moved_labels" in w.last_error and "30.0" in w.last_error and "grid" in w.last_error, w.last_error


def test_a_partly_painted_slice_is_named_when_training_starts(make_widget, qtbot, monkeypatch):
    from gui_helpers import wait_run

    viewer, w = make_widget()
    warned = []
    monkeypatch.setattr(w.st, "warn", warned.append)
    lab = viewer.layers["phantom labels"]
    data = lab.data.copy()
    data[3][data[3] != 3] = 0  # slice 3 keeps its LV only
    lab.data = data
    click(qtbot, w.run_panel.train_btn)
    assert any("slice 3 is painted without RV, Myo" in m for m in warned), warned
    wait_run(qtbot, w)


@pytest.mark.parametrize("how", ["viewer", "dock"])
def test_closing_while_a_run_trains_stops_it_and_keeps_its_checkpoint(make_widget, qtbot, monkeypatch, errors, how):
    """viewer.close() (File ▸ Close Window) or the dock's close button while
    a run trains: the run stops and saves its checkpoint (marked unfinished),
    the close waits a bounded time, and no error or traceback follows."""
    import sys
    import time

    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QDockWidget

    from napari_m3hl.io.checkpoint import load_checkpoint

    raised: list = []
    monkeypatch.setattr(sys, "excepthook", lambda *exc: raised.append(exc))
    viewer, w = make_widget()
    w.st.config_overrides["iterations"] = 100_000
    w.st.preview_every_s = None
    click(qtbot, w.run_panel.train_btn)
    assert w.run is not None, w.last_error
    qtbot.waitUntil(lambda: w.run_panel.progress.value() >= 1, timeout=WAIT_MS)
    run_dir, worker = Path(w.run.run_dir), w.runner.train_worker
    ended: list[float] = []
    worker.finished.connect(lambda: ended.append(time.perf_counter()), Qt.DirectConnection)  # in the worker's thread
    t0 = time.perf_counter()
    if how == "viewer":
        viewer.close()
    else:
        dock = next(d for d in viewer.window._qt_window.findChildren(QDockWidget) if d.widget() is w)
        click(qtbot, dock.title.close_button)
    closed_after = time.perf_counter() - t0
    bound = 5.0  # seconds: M3HLWidget.close_wait_ms
    assert closed_after < bound + 2.0, f"closing took {closed_after:.1f} s"
    qtbot.waitUntil(lambda: bool(ended), timeout=3000)  # the worker thread runs its last slots after the close wakes
    assert ended[0] - t0 < bound + 2.0, f"the training worker ended {ended[0] - t0:.1f} s after the close"
    qtbot.wait(300)  # the run's last queued events arrive: none may be drawn or raise
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert ckpt["completed"] is False and 1 <= ckpt["iteration"] < 100_000
    assert not raised and not errors, (raised, errors)


def test_saving_a_session_on_a_full_disk_says_so_and_keeps_the_earlier_session(make_widget, qtbot, monkeypatch,
                                                                                  tmp_path, errors):
    """Save session… into a folder whose disk fills while the checkpoint is
    copied: the widget names the folder, says the disk is full and what to
    do; the session saved there before is whole and opens, and no partly
    written file is left."""
    import errno
    import shutil

    from gui_helpers import train_and_wait

    from napari_m3hl.io.checkpoint import load_checkpoint
    from napari_m3hl.io.session import load_session

    viewer, w = make_widget()
    train_and_wait(qtbot, w)  # a model, so the session holds a checkpoint too
    folder = tmp_path / "small disk" / "session"
    folder.mkdir(parents=True)
    answer_file_dialogs(monkeypatch, folder=folder)
    click(qtbot, button(w, "Save session…"))
    qtbot.waitUntil(lambda: "Session saved" in w.run_panel.status_label.text(), timeout=WAIT_MS)
    wait_idle(qtbot, w)
    before, earlier = _digest(folder), load_session(folder).labels.copy()
    assert {p.name for p in folder.iterdir()} == {"labels.nii.gz", "checkpoint.pt", "settings.json", "session.json"}

    lab = viewer.layers["phantom labels"]
    data = lab.data.copy()
    data[5] = data[3]  # one more slice painted since the earlier save
    lab.data = data

    def disk_fills(src, dst, *args, **kwargs):  # half the bytes reach the disk, then it is full
        payload = Path(src).read_bytes()
        Path(dst).write_bytes(payload[: len(payload) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(shutil, "copyfile", disk_fills)
    click(qtbot, button(w, "Save session…"))
    qtbot.waitUntil(lambda: bool(w.last_error), timeout=WAIT_MS)
    wait_idle(qtbot, w)
    msg = w.last_error
    assert str(folder) in msg and "disk is full" in msg and "Free some space" in msg, msg
    assert errors[-1] == msg
    assert _digest(folder) == before  # no file replaced, none half-written (hidden temporaries included)
    sess = load_session(folder)
    np.testing.assert_array_equal(sess.labels, earlier)
    assert load_checkpoint(sess.checkpoint)["iteration"] >= 1


def test_load_checkpoint_of_a_stopped_run_says_so_and_a_diverged_one_is_refused(make_widget, qtbot, monkeypatch,
                                                                                  tmp_path, errors):
    """Load checkpoint… of a run stopped by a click on Stop: loaded, with one
    line saying the run did not finish; a diverged run's file: refused with the reason."""
    from napari.utils import notifications
    from test_reliability import _tiny_ckpt

    from napari_m3hl.io.checkpoint import load_checkpoint, save_checkpoint

    warned: list[str] = []
    monkeypatch.setattr(notifications, "show_warning", warned.append)
    _, w = make_widget()
    w.st.config_overrides["iterations"] = 100_000
    w.st.preview_every_s = None
    click(qtbot, w.run_panel.train_btn)
    assert w.run is not None, w.last_error
    qtbot.waitUntil(lambda: w.run_panel.progress.value() >= 1, timeout=WAIT_MS)
    click(qtbot, w.run_panel.stop_btn)
    qtbot.waitUntil(lambda: w.run.finished is not None, timeout=WAIT_MS)
    wait_idle(qtbot, w)
    stopped = Path(w.run.finished.checkpoint)
    assert load_checkpoint(stopped)["completed"] is False
    diverged = tmp_path / "diverged.pt"
    ckpt = load_checkpoint(_tiny_ckpt(tmp_path / "net.pt"))
    ckpt["diverged"] = True
    save_checkpoint(diverged, ckpt)

    answer_file_dialogs(monkeypatch, open_file=stopped)
    click(qtbot, button(w, "Load checkpoint…"))
    qtbot.waitUntil(lambda: "Loaded" in w.run_panel.status_label.text(), timeout=WAIT_MS)
    wait_idle(qtbot, w)
    assert len(warned) == 1 and "did not finish" in warned[0] and str(stopped) in warned[0], warned
    assert "stopped or interrupted" in w.run_panel.status_label.text().replace("\u200b", "")
    assert w.runner.checkpoint == str(stopped) and not errors

    answer_file_dialogs(monkeypatch, open_file=diverged)
    click(qtbot, button(w, "Load checkpoint…"))
    qtbot.waitUntil(lambda: bool(errors), timeout=WAIT_MS)
    wait_idle(qtbot, w)
    assert "diverged" in errors[-1] and "diverged.pt" in errors[-1] and "did not finish" not in errors[-1], errors
    assert w.runner.checkpoint == str(stopped) and len(warned) == 1
