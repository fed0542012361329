"""`m3hl train --data IMAGE --labels PAINTED`, typed as a user types it: the
few-slice loop with the start model's own input size, painted slices kept."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from napari_m3hl.io.checkpoint import load_checkpoint
from napari_m3hl.cli.main import main
from napari_m3hl.cli.fewslice import default_start
from napari_m3hl.fewslice.loop import FewSliceOptions


@pytest.fixture(scope="module")
def painted_volume(tmp_path_factory):
    d = tmp_path_factory.mktemp("vol")
    assert main(["phantom", "--output", str(d), "--seed", "7"]) == 0
    truth = nib.load(str(d / "phantom_7_labels.nii.gz"))
    lab = np.asarray(truth.dataobj).astype(np.uint8)  # (X, Y, Z): slices on the last axis
    painted = np.zeros_like(lab)
    painted[..., [3, 6]] = lab[..., [3, 6]]
    nib.save(nib.Nifti1Image(painted, truth.affine, truth.header), d / "painted.nii.gz")
    return d / "phantom_7.nii.gz", d / "painted.nii.gz", painted


def test_train_with_painted_labels_runs_the_fewslice_loop(painted_volume, tmp_path, capsys):
    img, painted_path, painted = painted_volume
    out = tmp_path / "run"
    assert main(["train", "--data", str(img), "--labels", str(painted_path), "--iterations", "3", "--quiet",
                 "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["kind"] == "few-slice fine-tune" and run["painted_slices"] == [3, 6]
    start = load_checkpoint(default_start())
    assert run["config"]["patch_size"] == list(start["patch_size"])  # the model's own input size, not rescaled
    assert load_checkpoint(out / "last.pt")["iteration"] == 3
    seg = nib.load(str(out / "segmentation.nii.gz"))
    src = nib.load(str(img))
    np.testing.assert_array_equal(seg.affine, src.affine)
    data = np.asarray(seg.dataobj)
    np.testing.assert_array_equal(data[..., [3, 6]], painted[..., [3, 6]])  # painted slices exactly as painted
    assert (out / "prediction.nii.gz").is_file()
    assert "segmentation:" in capsys.readouterr().out
    # the fine-tune scaled the image min-max; `m3hl predict` with its last.pt must scale it the same way
    assert load_checkpoint(out / "last.pt")["config"]["intensity"] == "minmax"
    # ... and segment with the same blend of start model and fine-tuned network as the loop showed
    # (the share chosen from the start model's Dice on the painted slices, recorded in run.json)
    share = run["start_blend"]["weight"]
    opts = FewSliceOptions()
    assert min(opts.start_blend_stable, opts.start_blend_untrusted) <= share <= opts.start_blend and share > 0
    change = run["start_blend"]["student_change"]  # settles the share: None with fewer than two checks
    assert change is None or 0 <= change <= 1
    assert load_checkpoint(out / "last.pt")["start_blend"] == share
    assert 0 < run["start_blend"]["start_painted_dice"] <= 1
    again = tmp_path / "again.nii.gz"
    assert main(["predict", "--checkpoint", str(out / "last.pt"), "--input", str(img), "--output", str(again)]) == 0
    np.testing.assert_array_equal(np.asarray(nib.load(str(again)).dataobj),
                                  np.asarray(nib.load(str(out / "prediction.nii.gz")).dataobj))


def test_start_blend_zero_keeps_the_fine_tuned_network_alone(painted_volume, tmp_path, capsys):
    img, painted_path, _ = painted_volume
    out = tmp_path / "run"
    assert main(["train", "--data", str(img), "--labels", str(painted_path), "--iterations", "2", "--start-blend", "0",
                 "--quiet", "--out", str(out)]) == 0
    ckpt = load_checkpoint(out / "last.pt")
    assert "start" not in ckpt and json.loads((out / "run.json").read_text())["options"]["start_blend"] == 0
    capsys.readouterr()
    assert main(["train", "--data", str(img), "--labels", str(painted_path), "--iterations", "2", "--start-blend", "0.5",
                 "--patch-size", "32,32", "--quiet", "--out", str(tmp_path / "preset")]) == 2
    assert "--start-blend belongs to the few-slice loop" in capsys.readouterr().err
    assert main(["train", "--data", str(img), "--labels", str(painted_path), "--start-blend", "1.5", "--quiet",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "must lie in [0, 1]; got 1.5" in capsys.readouterr().err
    assert main(["train", "--data", str(img), "--labels", str(painted_path), "--start-blend-untrusted", "-0.1",
                 "--quiet", "--out", str(tmp_path / "bad2")]) == 2
    err = capsys.readouterr().err
    assert "--start-blend-untrusted" in err and "must lie in [0, 1]; got -0.1" in err
    assert not (tmp_path / "bad2" / "run.json").exists()
    assert main(["train", "--data", str(img), "--labels", str(painted_path), "--start-blend-stable", "2",
                 "--quiet", "--out", str(tmp_path / "bad3")]) == 2
    err = capsys.readouterr().err
    assert "--start-blend-stable" in err and "must lie in [0, 1]; got 2" in err


def test_preset_options_keep_the_data_set_path(painted_volume, tmp_path):
    img, painted_path, _ = painted_volume
    out = tmp_path / "run"
    assert main(["train", "--data", str(img), "--labels", str(painted_path), "--iterations", "2", "--batch-size", "4",
                 "--patch-size", "32,32", "--quiet", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert "kind" not in run and run["config"]["patch_size"] == [32, 32]


def test_fewslice_refuses_labels_of_another_grid(painted_volume, tmp_path, capsys):
    img, _, painted = painted_volume
    nib.save(nib.Nifti1Image(painted[:-1], np.eye(4)), tmp_path / "small.nii.gz")
    assert main(["train", "--data", str(img), "--labels", str(tmp_path / "small.nii.gz"), "--out", str(tmp_path / "r")]) == 2
    assert "shape" in capsys.readouterr().err
    assert not (tmp_path / "r" / "run.json").exists()


def test_fewslice_names_the_image_with_nan_voxels_and_a_missing_start_model(painted_volume, tmp_path, capsys):
    img, painted_path, _ = painted_volume
    src = nib.load(str(img))
    data = np.asarray(src.dataobj, dtype=np.float32)
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, src.affine), tmp_path / "nan.nii.gz")
    assert main(["train", "--data", str(tmp_path / "nan.nii.gz"), "--labels", str(painted_path),
                 "--out", str(tmp_path / "r")]) == 2
    assert "nan.nii.gz holds 1 NaN" in capsys.readouterr().err
    assert main(["train", "--data", str(img), "--labels", str(painted_path), "--init", str(tmp_path / "none.pt"),
                 "--out", str(tmp_path / "r")]) == 2
    assert "none.pt" in capsys.readouterr().err
    assert not (tmp_path / "r" / "run.json").exists()
