"""Outputs never touch inputs (issue 25): every output path is resolved
(symbolic and hard links) and refused when it is an input of the same
command; ``--overwrite`` builds the new run beside the old one and swaps it in
when complete; one output per input, also against a second command writing
into the same folder meanwhile. Each case runs ``m3hl ...`` as a user types it."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from test_reliability import TINY, _digest, _nifti, _run, _tiny_ckpt

from napari_m3hl.data.phantom import make_phantom_cohort
from napari_m3hl.io.checkpoint import load_checkpoint


@pytest.fixture
def inputs(tmp_path_factory):
    """Fresh input files for each test (a command that destroyed one must not break the next test)."""
    d = tmp_path_factory.mktemp("inputs")
    ph = make_phantom_cohort(1, seed=7, shape=(6, 64, 64))[0]
    part = np.zeros_like(ph.label)
    part[[1, 4]] = ph.label[[1, 4]]
    return {"dir": d, "ck": _tiny_ckpt(d / "net.pt"), "scan": _nifti(d / "scan.nii.gz", ph.image.astype(np.float32)),
            "labels": _nifti(d / "scan_labels.nii.gz", part, dtype=np.uint8), "image": ph.image, "truth": ph.label}


def _links(target: Path, folder: Path) -> list[Path]:
    """A symbolic link and a hard link to ``target`` in ``folder``."""
    folder.mkdir(exist_ok=True)
    sym, hard = folder / f"sym_{target.name}", folder / f"hard_{target.name}"
    for p in (sym, hard):
        if p.exists() or p.is_symlink():
            p.unlink()
    sym.symlink_to(target)
    os.link(target, hard)
    return [target, sym, hard]


@pytest.mark.parametrize("which", [0, 1, 2], ids=["the file", "a symbolic link", "a hard link"])
def test_evaluate_json_onto_the_checkpoint_is_refused(inputs, tmp_path, capsys, which):
    target = _links(inputs["ck"], tmp_path)[which]
    before = _digest(inputs["dir"])
    code, text = _run(["evaluate", "--checkpoint", inputs["ck"], "--data", "phantom", "--limit", "1", "--json", target],
                      capsys)
    assert code == 2 and "--json" in text and "--checkpoint file" in text and "would destroy it" in text, text
    assert _digest(inputs["dir"]) == before


@pytest.mark.parametrize("flag", ["--labels", "--image", "--checkpoint"])
def test_suggest_json_onto_an_input_is_refused(inputs, tmp_path, capsys, flag):
    target = {"--labels": inputs["labels"], "--image": inputs["scan"], "--checkpoint": inputs["ck"]}[flag]
    hard = _links(target, tmp_path)[2]
    before = _digest(inputs["dir"])
    code, text = _run(["suggest", "--checkpoint", inputs["ck"], "--image", inputs["scan"], "--labels", inputs["labels"],
                       "--json", hard], capsys)
    assert code == 2 and f"{flag} file" in text, text
    assert _digest(inputs["dir"]) == before


def test_predict_overwrite_never_replaces_a_scan_beside_the_input(inputs, tmp_path, capsys):
    """``--input f/scan.nii --output f --overwrite``: f/scan.nii.gz is another scan, not a label map."""
    folder = tmp_path / "f"
    folder.mkdir()
    _nifti(folder / "scan.nii", inputs["image"].astype(np.float32))
    _nifti(folder / "scan.nii.gz", inputs["image"].astype(np.float32))
    before = _digest(folder)
    code, text = _run(["predict", "--checkpoint", inputs["ck"], "--input", folder / "scan.nii", "--output", folder,
                       "--overwrite"], capsys)
    assert code == 2 and "not a label map" in text and "scan.nii.gz" in text, text
    assert _digest(folder) == before
    # an earlier label map there is replaced with --overwrite, as before
    out = tmp_path / "seg"
    assert _run(["predict", "--checkpoint", inputs["ck"], "--input", folder / "scan.nii", "--output", out], capsys)[0] == 0
    assert _run(["predict", "--checkpoint", inputs["ck"], "--input", folder / "scan.nii", "--output", out,
                 "--overwrite"], capsys)[0] == 0


def test_predict_never_replaces_an_output_written_meanwhile(inputs, tmp_path, capsys, monkeypatch):
    """Two ``m3hl predict`` into one folder at once (a/scan and b/scan): the
    second does not silently replace what the first wrote after its checks."""
    from napari_m3hl.inference.predictor import Predictor

    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    for d in (a, b):
        d.mkdir()
        _nifti(d / "scan.nii.gz", inputs["image"].astype(np.float32))
    assert _run(["predict", "--checkpoint", inputs["ck"], "--input", a / "scan.nii.gz", "--output", out], capsys)[0] == 0
    first = (out / "scan.nii.gz").read_bytes()
    os.replace(out / "scan.nii.gz", tmp_path / "held")
    real = Predictor.predict

    def other_command_finishes_meanwhile(self, *args, **kwargs):
        os.replace(tmp_path / "held", out / "scan.nii.gz")  # the other command's output lands now
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Predictor, "predict", other_command_finishes_meanwhile)
    code, text = _run(["predict", "--checkpoint", inputs["ck"], "--input", b / "scan.nii.gz", "--output", out], capsys)
    assert code == 1 and "scan.nii.gz" in text and "meanwhile" in text, text
    assert (out / "scan.nii.gz").read_bytes() == first
    assert sorted(p.name for p in out.iterdir()) == ["scan.nii.gz"]  # no temporary file left


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "a"
    assert _run_quiet(["train", "--data", "phantom", *TINY, "--out", out]) == 0
    return out


def _run_quiet(argv) -> int:
    from napari_m3hl.cli.main import main

    return main([str(a) for a in argv])


def _copy_run(src: Path, dest: Path) -> Path:
    dest.mkdir()
    for p in src.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


def test_train_on_in_place_reads_the_start_checkpoint_first(run_a, tmp_path, capsys):
    """``m3hl train --init RUN/last.pt --out RUN --overwrite``: what a user does to train on."""
    run = _copy_run(run_a, tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    old = (run / "last.pt").read_bytes()
    code, text = _run(["train", "--data", "phantom", *TINY, "--init", run / "last.pt", "--out", run, "--overwrite"],
                      capsys)
    assert code == 0, text
    assert (run / "last.pt").is_file() and (run / "last.pt").read_bytes() != old
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["checkpoint"] == str(run / "last.pt") and manifest["iterations_done"] == 2
    assert load_checkpoint(run / "last.pt")["completed"] is True
    assert (run / "notes.txt").read_text() == "mine"  # files that are not the run's stay
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no staging folder left beside it


@pytest.mark.parametrize("abort", ["second Ctrl-C", "first Ctrl-C"])
def test_interrupted_overwrite_keeps_the_earlier_run(run_a, tmp_path, capsys, monkeypatch, abort):
    from napari_m3hl.training import trainer

    run = _copy_run(run_a, tmp_path / "run")
    before = _digest(run)
    real = trainer.train

    def interrupted(*args, **kwargs):
        for e in real(*args, **kwargs):
            yield e
            if type(e).__name__ == "Progress":
                if abort == "second Ctrl-C":
                    raise KeyboardInterrupt
                kwargs["control"].stop()  # what the first Ctrl-C does: finish the step, save last.pt

    monkeypatch.setattr(trainer, "train", interrupted)
    code, text = _run(["train", "--data", "phantom", *TINY[:1], "3", *TINY[2:], "--out", run, "--overwrite"], capsys)
    assert _digest(run) == before, "the earlier run changed"
    assert "kept" in text and str(run) in text, text
    if abort == "second Ctrl-C":
        assert code == 130
        assert [p.name for p in tmp_path.iterdir()] == ["run"]
    else:
        assert code == 0
        kept = [p for p in tmp_path.iterdir() if p.name != "run"]
        assert len(kept) == 1 and (kept[0] / "last.pt").is_file() and str(kept[0]) in text
        assert load_checkpoint(kept[0] / "last.pt")["completed"] is False  # stopped before its last iteration


def test_fewslice_overwrite_keeps_labels_painted_in_the_run_folder(inputs, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    painted = run / "painted.nii.gz"
    painted.write_bytes(inputs["labels"].read_bytes())
    (run / "last.pt").write_bytes(inputs["ck"].read_bytes())  # an earlier run's checkpoint
    argv = ["train", "--data", inputs["scan"], "--labels", painted, "--init", inputs["ck"], "--iterations", "2",
            "--batch-size", "4", "--device", "cpu", "--quiet", "--out", run, "--overwrite"]
    code, text = _run(argv, capsys)
    assert code == 0, text
    assert painted.read_bytes() == inputs["labels"].read_bytes()
    assert {"last.pt", "run.json", "segmentation.nii.gz", "prediction.nii.gz"} <= {p.name for p in run.iterdir()}
    # labels that are this run's own output file are refused: they would be replaced
    seg = run / "segmentation.nii.gz"
    seg.write_bytes(inputs["labels"].read_bytes())
    before = _digest(run)
    code, text = _run([*argv[:3], "--labels", seg, *argv[5:]], capsys)
    assert code == 2 and "--labels" in text and "segmentation.nii.gz this run writes" in text, text
    assert _digest(run) == before


def test_a_session_folder_never_replaces_its_image(inputs, tmp_path):
    """A session folder whose labels.nii.gz is (a link to) the image the session was made on is refused."""
    from napari_m3hl.errors import M3HLInputError
    from napari_m3hl.io.session import save_session

    folder = tmp_path / "session"
    folder.mkdir()
    os.link(inputs["scan"], folder / "labels.nii.gz")  # the scan, under the session's labels name
    before = _digest(inputs["dir"])
    with pytest.raises(M3HLInputError, match="would replace the image"):
        save_session(folder, inputs["truth"], np.eye(4), meta={"image_source": str(inputs["scan"])})
    assert _digest(inputs["dir"]) == before


def test_a_full_disk_while_training_is_one_line_and_keeps_the_earlier_run(run_a, tmp_path, capsys, monkeypatch):
    import errno

    from napari_m3hl.io import checkpoint

    run = _copy_run(run_a, tmp_path / "run")
    before = _digest(run)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[1]) if len(args) > 1 else None)

    monkeypatch.setattr(checkpoint.torch, "save", full)
    code, text = _run(["train", "--data", "phantom", *TINY, "--out", run, "--overwrite"], capsys)
    assert code == 1 and "disk is full" in text and "Traceback" not in text, text
    assert _digest(run) == before and [p.name for p in tmp_path.iterdir()] == ["run"]
