"""The command line end to end: phantom → train → predict (geometry kept) → evaluate, and its errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from napari_m3hl.io.checkpoint import make_payload, save_checkpoint
from napari_m3hl.cli.main import main
from napari_m3hl.config import load_preset
from napari_m3hl.method.networks import build_network
from napari_m3hl.fewslice.suggest import rank_slices

TINY = ["--iterations", "2", "--batch-size", "4", "--patch-size", "64,64", "--set", "block_size=[16,16]", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--data", "phantom", *TINY, "--out", str(out)]) == 0
    return out


def test_train_writes_checkpoint_and_manifest(trained):
    assert (trained / "last.pt").is_file()
    run = json.loads((trained / "run.json").read_text())
    assert run["config"]["iterations"] == 2 and run["config"]["patch_size"] == [64, 64]
    assert run["iterations_done"] == 2 and "torch" in run["versions"] and run["seed"] == run["config"]["seed"]


def test_predict_keeps_nifti_geometry(trained, tmp_path):
    assert main(["phantom", "--output", str(tmp_path / "in"), "--seed", "3"]) == 0
    src = tmp_path / "in" / "phantom_3.nii.gz"
    img = nib.load(src)
    # an oblique affine with an origin: it must come back bit for bit
    affine = img.affine.copy()
    affine[:3, :3] = affine[:3, :3] @ np.array([[0.8, -0.6, 0], [0.6, 0.8, 0], [0, 0, 1]])
    affine[:3, 3] = [-12.5, 30.25, 7.0]
    oblique = nib.Nifti1Image(np.asanyarray(img.dataobj), affine, img.header)
    oblique.header.set_qform(affine, code=1)
    oblique.header.set_sform(affine, code=1)
    nib.save(oblique, tmp_path / "scan.nii")
    assert main(["predict", "--checkpoint", str(trained / "last.pt"), "--input", str(tmp_path / "scan.nii"),
                 "--output", str(tmp_path / "out")]) == 0
    seg = nib.load(tmp_path / "out" / "scan.nii.gz")
    src_img = nib.load(tmp_path / "scan.nii")
    assert seg.shape == src_img.shape
    np.testing.assert_array_equal(seg.affine, src_img.affine)
    assert seg.header.get_zooms() == src_img.header.get_zooms()
    labels = np.asanyarray(seg.dataobj)
    assert labels.dtype == np.uint8 and labels.max() < 4


def test_predict_4d_and_h5(trained, tmp_path):
    vol = np.random.default_rng(0).random((40, 30, 3, 2)).astype(np.float32)  # x, y, z, t
    nib.save(nib.Nifti1Image(vol, np.diag([1.2, 1.2, 8.0, 1.0])), tmp_path / "cine.nii.gz")
    with h5py.File(tmp_path / "vol.h5", "w") as f:
        f["image"] = np.random.default_rng(1).random((3, 40, 30)).astype(np.float32)
        f["label"] = np.zeros((3, 40, 30), np.uint8)
    assert main(["predict", "--checkpoint", str(trained / "last.pt"), "--input", str(tmp_path),
                 "--output", str(tmp_path / "out")]) == 0
    assert nib.load(tmp_path / "out" / "cine.nii.gz").shape == (40, 30, 3, 2)
    assert nib.load(tmp_path / "out" / "vol.nii.gz").shape == (30, 40, 3)


def test_evaluate_phantom_json(trained, tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(trained / "last.pt"), "--data", "phantom", "--limit", "1",
                 "--json", str(tmp_path / "m.json")]) == 0
    assert "| Class |" in capsys.readouterr().out
    res = json.loads((tmp_path / "m.json").read_text())
    assert res["unit"] == "px" and len(res["cases"]) == 1


def test_errors_name_the_culprit(trained, tmp_path, capsys):
    def err(argv):
        assert main(argv) == 2
        return capsys.readouterr().err

    assert "does not exist" in err(["predict", "--checkpoint", str(tmp_path / "nope.pt"), "--input", ".", "--output", str(tmp_path)])
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    assert "bad.pt" in err(["evaluate", "--checkpoint", str(tmp_path / "bad.pt"), "--data", "phantom"])
    assert "missing.nii.gz" in err(["predict", "--checkpoint", str(trained / "last.pt"),
                                    "--input", str(tmp_path / "missing.nii.gz"), "--output", str(tmp_path)])
    assert "multiple of 4" in err(["train", "--data", "phantom", "--batch-size", "6", "--out", str(tmp_path / "r")])
    assert "no variant" in err(["train", "--variant", "fancy", "--out", str(tmp_path / "r")])
    # a NIfTI image with a label map painted nowhere
    img = np.random.default_rng(0).random((32, 32, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(img, np.eye(4)), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 4), np.uint8), np.eye(4)), tmp_path / "lab.nii.gz")
    assert "label" in err(["train", "--data", str(tmp_path / "img.nii.gz"), "--labels", str(tmp_path / "lab.nii.gz"),
                           *TINY, "--out", str(tmp_path / "r")]).lower()
    # label values beyond the class count
    bad = np.zeros((32, 32, 4), np.uint8)
    bad[..., 1] = 7
    nib.save(nib.Nifti1Image(bad, np.eye(4)), tmp_path / "lab7.nii.gz")
    assert "7" in err(["train", "--data", str(tmp_path / "img.nii.gz"), "--labels", str(tmp_path / "lab7.nii.gz"),
                       *TINY, "--out", str(tmp_path / "r")])
    # a constant image
    nib.save(nib.Nifti1Image(np.ones((32, 32, 4), np.float32), np.eye(4)), tmp_path / "flat.nii.gz")
    lab = np.zeros((32, 32, 4), np.uint8)
    lab[8:20, 8:20, 1] = 1
    nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp_path / "lab1.nii.gz")
    assert "constant" in err(["train", "--data", str(tmp_path / "flat.nii.gz"), "--labels", str(tmp_path / "lab1.nii.gz"),
                              *TINY, "--out", str(tmp_path / "r")])
    # a checkpoint of another class count, for fine-tuning
    cfg2 = load_preset("acdc_unet2d", num_classes=2, class_names=("bg", "fg"))
    two = save_checkpoint(tmp_path / "two.pt", make_payload(cfg2, build_network("unet2d", 1, 2)))
    assert "predicts 2 classes" in err(["train", "--data", "phantom", *TINY, "--init", str(two), "--out", str(tmp_path / "r")])
    # a 3D preset on 2D data
    assert "preset" in err(["train", "--preset", "la_vnet3d", "--data", "phantom", "--out", str(tmp_path / "r")])


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "napari_m3hl", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout and "predict" in out.stdout and "evaluate" in out.stdout


@pytest.mark.data
def test_short_real_acdc_run(shared_data, tmp_path):
    """A short M³HL run on real ACDC slices, evaluated on a real validation volume."""
    root = shared_data / "acdc"
    if not (root / "train_slices.list").is_file():
        pytest.skip(f"no ACDC data in {root}")
    out = tmp_path / "acdc"
    assert main(["train", "--data", str(root), "--iterations", "40", "--batch-size", "8", "--patch-size", "128,128",
                 "--set", "block_size=[32,32]", "--lr", "0.01", "--out", str(out), "--quiet"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["data"]["n_labeled"] == 136 and run["data"]["n_unlabeled"] == 1312 - 136
    assert main(["evaluate", "--checkpoint", str(out / "last.pt"), "--data", str(root), "--limit", "1",
                 "--json", str(tmp_path / "e.json")]) == 0
    res = json.loads((tmp_path / "e.json").read_text())
    (case,) = res["cases"].values()
    assert set(case) == {"RV", "Myo", "LV"}
    # 40 iterations only prove the pipeline: real slices in, finite per-class metrics out
    assert all(np.isfinite(v["dice"]) for v in case.values())


def test_ctrl_c_saves_a_checkpoint(tmp_path):
    """The first Ctrl-C stops training after the current step and still writes last.pt."""
    import os
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "napari_m3hl", "train", "--data", "phantom", "--iterations", "100000",
                             "--batch-size", "4", "--patch-size", "64,64", "--set", "block_size=[16,16]",
                             "--out", str(tmp_path)], stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # wait until training has started
            if "training unet2d" in line:
                break
        time.sleep(3)
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:  # a failed wait leaves no 100,000-iteration run behind
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["stopped_early"] is True and 0 < run["iterations_done"] < 100000
    assert (tmp_path / "last.pt").is_file()


def test_suggest_ranks_unlabeled_slices(trained, tmp_path, capsys):
    assert main(["phantom", "--output", str(tmp_path), "--seed", "4"]) == 0
    img, lab = tmp_path / "phantom_4.nii.gz", tmp_path / "phantom_4_labels.nii.gz"
    full = nib.load(lab)
    part = np.asanyarray(full.dataobj).copy()
    keep = np.zeros(part.shape[2], bool)
    keep[[2, 5]] = True
    part[:, :, ~keep] = 0  # (x, y, z): slices 2 and 5 labeled
    nib.save(nib.Nifti1Image(part, full.affine), tmp_path / "partial.nii.gz")
    out = tmp_path / "s.json"
    capsys.readouterr()
    assert main(["suggest", "--checkpoint", str(trained / "last.pt"), "--image", str(img), "--labels",
                 str(tmp_path / "partial.nii.gz"), "--score", "disagreement", "--no-spread", "--top", "3",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["labeled"] == [2, 5] and sorted(res["ranking"]) == [z for z in range(part.shape[2]) if z not in (2, 5)]
    scores = np.array(res["scores"])
    assert list(scores[res["ranking"]]) == sorted(scores[res["ranking"]], reverse=True)
    assert f"{len(res['ranking'])} unlabeled" in printed and f"1. slice {res['ranking'][0]} " in printed
    # entropy of the teacher (the network one segments with), recorded in the JSON
    assert main(["suggest", "--checkpoint", str(trained / "last.pt"), "--image", str(img), "--labels",
                 str(tmp_path / "partial.nii.gz"), "--score", "entropy", "--which", "teacher", "--json", str(out)]) == 0
    res_t = json.loads(out.read_text())
    assert res_t["network"] == "teacher" and res_t["score"] == "entropy" and "teacher's entropy" in capsys.readouterr().out
    # --spread: score × distance to the nearest labeled slice
    assert main(["suggest", "--checkpoint", str(trained / "last.pt"), "--image", str(img), "--labels",
                 str(tmp_path / "partial.nii.gz"), "--score", "entropy", "--spread", "--json", str(out)]) == 0
    res_s = json.loads(out.read_text())
    assert res_s["spread"] is True and "distance to the labeled slices" in capsys.readouterr().out
    assert res_s["ranking"] == rank_slices(np.array(res_s["scores"]), [2, 5], spread=True)
    # a model file has no teacher: the default score falls back to entropy, an explicit
    # disagreement (or --which teacher) is refused with what to do
    model_file = Path(__file__).resolve().parents[1] / "models" / "acdc70_unet2d.pt"
    assert main(["suggest", "--checkpoint", str(model_file), "--image", str(img), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["score"] == "entropy" and "no teacher" in capsys.readouterr().out
    for extra in (["--score", "disagreement"], ["--which", "teacher"]):
        assert main(["suggest", "--checkpoint", str(model_file), "--image", str(img), *extra]) == 2
        assert "no teacher network" in capsys.readouterr().err
    # mismatched labels are refused with both shapes named
    nib.save(nib.Nifti1Image(part[:, :, :3], full.affine), tmp_path / "short.nii.gz")
    assert main(["suggest", "--checkpoint", str(trained / "last.pt"), "--image", str(img), "--labels",
                 str(tmp_path / "short.nii.gz")]) == 2
    assert "have shape" in capsys.readouterr().err
