"""`m3hl train --data A --labels A_painted --data B --labels B_painted --unlabeled C`,
typed as a user types it: one M³HL fine-tune over several volumes, each
segmented and written; a 4D cine's unpainted frames as unlabeled data."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from napari_m3hl.cli.main import main


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """Phantom volumes of seeds 7, 8, 9 (NIfTI, (X, Y, Z)); 7 and 8 painted on two slices each."""
    d = tmp_path_factory.mktemp("vols")
    assert main(["phantom", "--output", str(d), "--seed", "7", "--count", "3"]) == 0
    out = {}
    for seed, sel in ((7, [3, 6]), (8, [2, 5]), (9, None)):
        truth = nib.load(str(d / f"phantom_{seed}_labels.nii.gz"))
        lab = np.asarray(truth.dataobj).astype(np.uint8)
        painted = np.zeros_like(lab)
        if sel:
            painted[..., sel] = lab[..., sel]
            nib.save(nib.Nifti1Image(painted, truth.affine, truth.header), d / f"painted_{seed}.nii.gz")
        out[seed] = (d / f"phantom_{seed}.nii.gz", d / f"painted_{seed}.nii.gz", painted)
    return out


def test_two_labeled_volumes_and_one_unlabeled_train_one_m3hl_model(volumes, tmp_path, capsys):
    (a, ap, apaint), (b, bp, bpaint), (c, _, _) = volumes[7], volumes[8], volumes[9]
    out = tmp_path / "run"
    assert main(["train", "--data", str(a), "--labels", str(ap), "--data", str(b), "--labels", str(bp),
                 "--unlabeled", str(c), "--mode", "m3hl", "--iterations", "2", "--quiet", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["kind"] == "few-slice fine-tune" and run["options"]["mode"] == "m3hl"
    assert [i["option"] for i in run["inputs"]] == ["--data", "--data", "--unlabeled"]
    assert [i["painted_slices"] for i in run["inputs"]] == [[[3, 6]], [[2, 5]], [[]]]
    assert run["inputs"][2]["verdicts"] == [None]
    for src, paint, name in ((a, apaint, "phantom_7"), (b, bpaint, "phantom_8"), (c, None, "phantom_9")):
        seg = nib.load(str(out / f"segmentation_{name}.nii.gz"))
        pred = nib.load(str(out / f"prediction_{name}.nii.gz"))
        image = nib.load(str(src))
        assert seg.shape == pred.shape == image.shape
        np.testing.assert_array_equal(seg.affine, image.affine)
        if paint is not None:  # the painted slices exactly as painted
            sel = np.flatnonzero(paint.reshape(-1, paint.shape[-1]).any(axis=0))
            np.testing.assert_array_equal(np.asarray(seg.dataobj)[..., sel], paint[..., sel])
    printed = capsys.readouterr().out
    assert printed.count("segmentation:") == 3


def test_counts_that_do_not_pair_up_are_refused(volumes, tmp_path, capsys):
    (a, ap, _), (b, _, _) = volumes[7], volumes[8]
    assert main(["train", "--data", str(a), "--labels", str(ap), "--data", str(b), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "2 --data but 1 --labels" in err and "--unlabeled" in err
    assert not (tmp_path / "r" / "run.json").exists()
    bp = volumes[8][1]
    assert main(["train", "--data", str(a), "--labels", str(ap), "--data", str(b), "--labels", str(bp),
                 "--patch-size", "32,32", "--out", str(tmp_path / "r")]) == 2
    assert "a preset's run takes one --data" in capsys.readouterr().err
    src = nib.load(str(ap))
    nib.save(nib.Nifti1Image(np.zeros(src.shape, np.uint8), src.affine, src.header), tmp_path / "empty.nii.gz")
    assert main(["train", "--data", str(a), "--labels", str(tmp_path / "empty.nii.gz"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "has no painted slice" in err and "--unlabeled" in err
    assert not (tmp_path / "r" / "run.json").exists()


def test_the_same_file_twice_gets_unique_output_names(volumes, tmp_path):
    a, ap, _ = volumes[7]
    out = tmp_path / "run"
    assert main(["train", "--data", str(a), "--labels", str(ap), "--data", str(a), "--labels", str(ap),
                 "--iterations", "1", "--quiet", "--out", str(out)]) == 0
    assert (out / "segmentation_phantom_7.nii.gz").is_file() and (out / "segmentation_phantom_7_2.nii.gz").is_file()


def test_a_cine_trains_with_its_unpainted_frames_as_unlabeled_data(volumes, tmp_path):
    (a, _, apaint), (b, _, _) = volumes[7], volumes[8]
    img_a, img_b = nib.load(str(a)), nib.load(str(b))
    cine = np.stack([np.asarray(img_b.dataobj), np.asarray(img_a.dataobj)], axis=-1)  # (X, Y, Z, T): t1 painted
    paint = np.stack([np.zeros_like(apaint), apaint], axis=-1)
    nib.save(nib.Nifti1Image(cine, img_a.affine), tmp_path / "cine.nii.gz")
    nib.save(nib.Nifti1Image(paint, img_a.affine), tmp_path / "cine_painted.nii.gz")
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "cine.nii.gz"), "--labels", str(tmp_path / "cine_painted.nii.gz"),
                 "--mode", "m3hl", "--iterations", "1", "--quiet", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["inputs"][0]["painted_slices"] == [[], [3, 6]] and run["painted_slices"] == [3, 6]
    assert run["inputs"][0]["verdicts"][0] is None  # frame 0: unlabeled data, nothing painted to judge by
    seg = np.asarray(nib.load(str(out / "segmentation.nii.gz")).dataobj)
    assert seg.shape == cine.shape
    np.testing.assert_array_equal(seg[..., [3, 6], 1], apaint[..., [3, 6]])
