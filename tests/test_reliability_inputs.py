"""Inputs understood or refused, and every refusal one line naming the file or
flag and what to do (issue 25). Each case runs ``m3hl ...`` as a user types it
(``main([...])``) and checks that no input file changed."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_reliability import AFFINE, _digest, _nifti, _run, _tiny_ckpt

from napari_m3hl.data.phantom import make_phantom_cohort
from napari_m3hl.io.checkpoint import load_checkpoint, save_checkpoint

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "acdc70_unet2d.pt"
FEW = ["--iterations", "2", "--batch-size", "4", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    ph = make_phantom_cohort(1, seed=11, shape=(6, 64, 64))[0]
    part = np.zeros_like(ph.label)
    part[[1, 4]] = ph.label[[1, 4]]
    e = {"dir": d, "image": ph.image.astype(np.float32), "part": part}
    e["scan"] = _nifti(d / "scan.nii.gz", e["image"])
    e["labels"] = _nifti(d / "labels.nii.gz", part, dtype=np.uint8)
    e["ck"] = _tiny_ckpt(d / "net.pt")
    # the labels stored mirrored along x with a mirrored affine: the same world positions
    mirror = AFFINE.copy()
    mirror[:3, 0] = -AFFINE[:3, 0]
    mirror[:3, 3] = AFFINE[:3, 3] + AFFINE[:3, 0] * (part.shape[2] - 1)
    e["mirrored"] = _nifti(d / "mirrored.nii.gz", part[:, :, ::-1], affine=mirror, dtype=np.uint8)
    shifted = AFFINE.copy()
    shifted[:3, 3] += [30.0, 0, 0]
    e["shifted"] = _nifti(d / "shifted.nii.gz", part, affine=shifted, dtype=np.uint8)
    # slices along the first NIfTI axis (world geometry right): thick voxels along i
    xyz = np.transpose(e["image"], (0, 1, 2))  # (D, H, W) stored as (X=D, Y=H, Z=W)
    img = nib.Nifti1Image(np.ascontiguousarray(xyz), np.diag([8.0, 1.4, 1.4, 1.0]))
    nib.save(img, str(d / "slices_first.nii.gz"))
    e["slices_first"] = d / "slices_first.nii.gz"
    # an array saved without the axis transpose, unit voxels: (D, H, W) = (6, 64, 64) stored as (X, Y, Z)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(e["image"]), np.eye(4)), str(d / "untransposed.nii.gz"))
    e["untransposed"] = d / "untransposed.nii.gz"
    e["narrow"] = _nifti(d / "narrow.nii.gz", e["image"][:, :, 22:42].copy())
    hot = e["image"].copy()
    hot[0, 2, 2] = 10 * hot.max()
    e["hot"] = _nifti(d / "hot.nii.gz", hot)
    e["clean"] = _nifti(d / "clean.nii.gz", e["image"])
    lv_only = np.where(part == 3, 3, 0).astype(np.uint8)
    e["lv_only"] = _nifti(d / "lv_only.nii.gz", lv_only, dtype=np.uint8)
    blob = np.zeros_like(part)
    blob[1] = part[1]
    blob[4, 30:34, 30:34] = part[4, 30:34, 30:34].max() or 3
    e["blob"] = _nifti(d / "blob.nii.gz", blob, dtype=np.uint8)
    return e


def _finite_ckpt_variants(env, tmp_path):
    ck = torch.load(env["ck"], weights_only=True)
    bad = dict(ck)
    key = next(k for k, v in ck["student"].items() if v.is_floating_point() and v.numel() > 1)
    bad["student"] = {**ck["student"], key: torch.full_like(ck["student"][key], float("nan"))}
    bad.pop("weights_sha256")
    return save_checkpoint(tmp_path / "nan.pt", bad)


# ------------------------------------------------------------------ labels on another grid


def test_fewslice_labels_stored_mirrored_are_moved_onto_the_image_grid(env, tmp_path, capsys):
    out = tmp_path / "run"
    code, text = _run(["train", "--data", env["scan"], "--labels", env["mirrored"], "--init", env["ck"], *FEW,
                       "--out", out], capsys)
    assert code == 0, text
    assert "mirrored.nii.gz is stored on another grid" in text and "nearest neighbour" in text, text
    seg = np.asanyarray(nib.load(out / "segmentation.nii.gz").dataobj).transpose(2, 1, 0)
    np.testing.assert_array_equal(seg[[1, 4]], env["part"][[1, 4]])  # the painted slices, where they were painted


@pytest.mark.parametrize("command", ["train", "suggest"])
def test_labels_shifted_off_the_image_grid_are_refused_naming_the_offset(env, tmp_path, capsys, command):
    argv = (["train", "--data", env["scan"], "--labels", env["shifted"], "--init", env["ck"], *FEW, "--out",
             tmp_path / "run"] if command == "train" else
            ["suggest", "--checkpoint", env["ck"], "--image", env["scan"], "--labels", env["shifted"]])
    before = _digest(env["dir"])
    code, text = _run(argv, capsys)
    assert code == 2 and "shifted.nii.gz" in text and "(30.0, 0.0, 0.0) mm" in text, text
    assert len(text.strip().splitlines()) == 1 and _digest(env["dir"]) == before
    assert not (tmp_path / "run" / "last.pt").exists()


def test_suggest_takes_labels_stored_mirrored(env, capsys):
    code, text = _run(["suggest", "--checkpoint", env["ck"], "--image", env["scan"], "--labels", env["mirrored"]],
                      capsys)
    assert code == 0 and "nearest neighbour" in text, text


# ------------------------------------------------------------------ the slice axis, the in-plane shape


@pytest.mark.parametrize("name, fragment", [("slices_first", "first (i) axis"),
                                            ("untransposed", "axis transpose"),
                                            ("narrow", "stretched")])
def test_predict_warns_about_the_slice_axis_and_narrow_slices(env, tmp_path, capsys, name, fragment):
    code, text = _run(["predict", "--checkpoint", env["ck"], "--input", env[name], "--output", tmp_path], capsys)
    assert code == 0 and "warning" in text and fragment in text and f"{name}.nii.gz" in text, text


def test_a_normal_stack_gets_no_warning(env, tmp_path, capsys):
    code, text = _run(["predict", "--checkpoint", env["ck"], "--input", env["scan"], "--output", tmp_path], capsys)
    assert code == 0 and "warning" not in text, text


# ------------------------------------------------------------------ intensity: one hot voxel


def test_one_hot_voxel_does_not_flatten_a_minmax_scan(env, tmp_path, capsys):
    """A few-slice fine-tune's checkpoint records min–max scaling: one voxel at
    10x the maximum must not change the segmentation of the other slices
    (the shipped model, recorded as min–max, segments the phantom)."""
    ck = load_checkpoint(SHIPPED)
    ck["config"] = {**ck["config"], "intensity": "minmax"}
    ck = save_checkpoint(tmp_path / "minmax.pt", ck)
    for name in ("clean", "hot"):
        assert _run(["predict", "--checkpoint", ck, "--input", env[name], "--output", tmp_path / name], capsys)[0] == 0
    clean = np.asanyarray(nib.load(tmp_path / "clean" / "clean.nii.gz").dataobj)
    hot = np.asanyarray(nib.load(tmp_path / "hot" / "hot.nii.gz").dataobj)
    assert np.unique(clean[..., 1:]).size > 1  # the model finds structures: the comparison means something
    np.testing.assert_array_equal(hot[..., 1:], clean[..., 1:])  # the slices without the hot voxel


def test_minmax_scaling_is_unchanged_on_real_acdc_volumes(shared_data):
    """The ACDC volumes (min–max normalised to [0, 1]) scale exactly as the plain range."""
    import h5py

    from napari_m3hl.io.intensity import scale_intensity

    for name in ("patient002_frame01", "patient019_frame01"):
        with h5py.File(shared_data / "acdc" / "volumes" / f"{name}.h5") as f:
            img = f["image"][:] * 800.0 + 20.0
        plain = (img - img.min()) / (img.max() - img.min())
        np.testing.assert_array_equal(scale_intensity(img, "minmax"), plain.astype(np.float32))


# ------------------------------------------------------------------ painting


@pytest.mark.parametrize("name, fragment", [("lv_only", "slice 1 is painted without RV, Myo"),
                                            ("blob", "slice 4")])
def test_fewslice_warns_about_a_partly_painted_slice(env, tmp_path, capsys, name, fragment):
    code, text = _run(["train", "--data", env["scan"], "--labels", env[name], "--init", env["ck"], *FEW,
                       "--out", tmp_path / "run"], capsys)
    assert code == 0 and "warning" in text and fragment in text, text


# ------------------------------------------------------------------ checkpoints


def test_a_checkpoint_with_non_finite_weights_is_refused(env, tmp_path, capsys):
    nan = _finite_ckpt_variants(env, tmp_path)
    code, text = _run(["predict", "--checkpoint", nan, "--input", env["scan"], "--output", tmp_path / "o"], capsys)
    assert code == 2 and "NaN" in text and "nan.pt" in text and not (tmp_path / "o").exists(), text
    assert load_checkpoint(env["ck"])["weights_finite"] == {"student": True, "teacher": True}


def test_a_diverged_runs_checkpoint_is_refused_by_predict(env, tmp_path, capsys, monkeypatch):
    from napari_m3hl.training import trainer

    real = trainer.supervised_losses

    def diverging(*args, **kwargs):  # the loss becomes NaN at once: a certain divergence
        res = real(*args, **kwargs)
        res.losses["total"] = res.losses["total"] * float("nan")
        return res

    monkeypatch.setattr(trainer, "supervised_losses", diverging)
    code, text = _run(["train", "--data", "phantom", "--iterations", "3", "--batch-size", "4", "--patch-size", "32,32",
                       "--mode", "supervised", "--quiet", "--out", tmp_path / "r"], capsys)
    assert code == 1 and "diverged" in text and (tmp_path / "r" / "diverged.pt").is_file(), text
    monkeypatch.undo()
    code, text = _run(["predict", "--checkpoint", tmp_path / "r" / "diverged.pt", "--input", env["scan"], "--output",
                       tmp_path / "o"], capsys)
    assert code == 2 and "diverged" in text and "diverged.pt" in text, text
    code, text = _run(["evaluate", "--checkpoint", tmp_path / "r" / "diverged.pt", "--data", "phantom", "--limit", "1"],
                      capsys)
    assert code == 2 and "diverged" in text and "diverged.pt" in text and "note" not in text, text


def test_a_stopped_runs_checkpoint_is_used_with_a_one_line_note(env, tmp_path, capsys, monkeypatch):
    """A run stopped with Ctrl-C leaves last.pt marked unfinished: predict and
    evaluate use it and say so in one line; a finished run's files say nothing;
    the same run's diverged weights stay refused with the reason."""
    from napari_m3hl.training import trainer

    real = trainer.train

    def ctrl_c(*args, **kwargs):  # the first Ctrl-C: the step finishes, last.pt is saved, the run ends
        for e in real(*args, **kwargs):
            yield e
            if type(e).__name__ == "Progress":
                kwargs["control"].stop()

    run = ["train", "--data", "phantom", "--batch-size", "4", "--patch-size", "32,32", "--mode", "supervised",
           "--quiet"]
    monkeypatch.setattr(trainer, "train", ctrl_c)
    code, text = _run([*run, "--iterations", "50", "--out", tmp_path / "stopped"], capsys)
    assert code == 0, text
    monkeypatch.undo()
    last = tmp_path / "stopped" / "last.pt"
    assert load_checkpoint(last)["completed"] is False
    code, text = _run(["predict", "--checkpoint", last, "--input", env["scan"], "--output", tmp_path / "o"], capsys)
    notes = [ln for ln in text.splitlines() if "did not finish" in ln]
    assert code == 0 and (tmp_path / "o" / "scan.nii.gz").is_file(), text
    assert len(notes) == 1 and notes[0].startswith("m3hl predict: note: checkpoint") and str(last) in notes[0], text
    assert "of 50" in notes[0] and "stopped or interrupted" in notes[0], notes
    code, text = _run(["evaluate", "--checkpoint", last, "--data", "phantom", "--limit", "1"], capsys)
    assert code == 0 and len([ln for ln in text.splitlines() if "m3hl evaluate: note:" in ln]) == 1, text

    code, text = _run([*run, "--iterations", "2", "--val", "--val-every", "1", "--out", tmp_path / "finished"], capsys)
    assert code == 0, text
    for name in ("last.pt", "best.pt"):
        code, text = _run(["predict", "--checkpoint", tmp_path / "finished" / name, "--input", env["scan"],
                           "--output", tmp_path / f"o_{name}"], capsys)
        assert code == 0 and "note" not in text, text


def test_a_diverging_fewslice_run_is_one_line(env, tmp_path, capsys, monkeypatch):
    from napari_m3hl.training import trainer

    real = trainer.supervised_losses

    def diverging(*args, **kwargs):
        res = real(*args, **kwargs)
        res.losses["total"] = res.losses["total"] * float("nan")
        return res

    monkeypatch.setattr(trainer, "supervised_losses", diverging)
    code, text = _run(["train", "--data", env["scan"], "--labels", env["labels"], "--init", env["ck"], *FEW,
                       "--out", tmp_path / "r"], capsys)
    assert code == 1 and "diverged" in text and "lower --lr" in text and "internal error" not in text, text
    assert len([ln for ln in text.splitlines() if "error" in ln]) == 1, text


# ------------------------------------------------------------------ one line, naming the file or flag


def _torchscript(path: Path) -> Path:
    class Double(torch.nn.Module):
        def forward(self, x):
            return 2 * x

    torch.jit.save(torch.jit.trace(Double(), torch.zeros(1)), str(path))
    return path


CASES = [
    ("a folder as --checkpoint", lambda e, t: ["predict", "--checkpoint", e["dir"], "--input", e["scan"], "--output", t],
     "is a folder"),
    ("a folder as --image", lambda e, t: ["suggest", "--checkpoint", e["ck"], "--image", e["dir"]], "is a folder"),
    ("a folder as the few-slice --init", lambda e, t: ["train", "--data", e["scan"], "--labels", e["labels"], "--init",
                                                       e["dir"], "--out", t / "r"], "is a folder"),
    ("a folder as --labels", lambda e, t: ["train", "--data", e["scan"], "--labels", e["dir"], "--init", e["ck"], *FEW,
                                           "--out", t / "r"], "is a folder"),
    ("a symbolic link loop as --checkpoint",
     lambda e, t: ["predict", "--checkpoint", e["loop"], "--input", e["scan"], "--output", t], "symbolic link loop"),
    ("a symbolic link loop as --input",
     lambda e, t: ["predict", "--checkpoint", e["ck"], "--input", e["loop"], "--output", t], "symbolic link loop"),
    ("a TorchScript archive as --checkpoint",
     lambda e, t: ["predict", "--checkpoint", e["torchscript"], "--input", e["scan"], "--output", t], "TorchScript"),
    ("evaluate --spacing 0 0 0", lambda e, t: ["evaluate", "--checkpoint", e["ck"], "--data", "phantom", "--spacing",
                                              "0", "0", "0"], "--spacing"),
    ("evaluate --spacing -1 1 1", lambda e, t: ["evaluate", "--checkpoint", e["ck"], "--data", "phantom", "--spacing",
                                               "-1", "1", "1"], "--spacing"),
    ("evaluate --spacing with two values",
     lambda e, t: ["evaluate", "--checkpoint", e["ck"], "--data", "phantom", "--spacing", "1", "1"], "3 values"),
    ("few-slice --device bogus", lambda e, t: ["train", "--data", e["scan"], "--labels", e["labels"], "--init", e["ck"],
                                               "--iterations", "2", "--device", "bogus", "--out", t / "r"],
     "--device bogus"),
    ("few-slice --seed -1", lambda e, t: ["train", "--data", e["scan"], "--labels", e["labels"], "--init", e["ck"],
                                          "--iterations", "2", "--seed", "-1", "--out", t / "r"], "--seed"),
    ("phantom --seed -1", lambda e, t: ["phantom", "--seed", "-1", "--output", t / "p"], "--seed"),
    ("few-slice --no-hl", lambda e, t: ["train", "--data", e["scan"], "--labels", e["labels"], "--init", e["ck"],
                                        "--no-hl", "--out", t / "r"], "--no-hl"),
    ("few-slice --no-mix", lambda e, t: ["train", "--data", e["scan"], "--labels", e["labels"], "--init", e["ck"],
                                         "--no-mix", "--out", t / "r"], "--no-mix"),
    ("a folder with one bad file", lambda e, t: ["predict", "--checkpoint", e["ck"], "--input", e["mixed"], "--output",
                                                 t / "o"], "broken.nii.gz"),
]
if not torch.cuda.is_available():
    CASES.append(("few-slice --device cuda without a GPU",
                  lambda e, t: ["train", "--data", e["scan"], "--labels", e["labels"], "--init", e["ck"],
                                "--iterations", "2", "--device", "cuda", "--out", t / "r"], "--device cuda"))


@pytest.fixture(scope="module")
def refusal_env(env, tmp_path_factory):
    d = tmp_path_factory.mktemp("more")
    e = dict(env)
    e["loop"] = d / "loop_a"
    (d / "loop_b").symlink_to(d / "loop_a")
    (d / "loop_a").symlink_to(d / "loop_b")
    e["torchscript"] = _torchscript(d / "scripted.pt")
    mixed = d / "mixed"
    mixed.mkdir()
    _nifti(mixed / "a_good.nii.gz", env["image"])
    (mixed / "broken.nii.gz").write_bytes(b"not a nifti file at all")
    e["mixed"] = mixed
    return e


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_refused_in_one_line_naming_the_flag_or_file(case, refusal_env, tmp_path, capsys):
    _, argv, fragment = case
    before = _digest(refusal_env["dir"])
    code, text = _run(argv(refusal_env, tmp_path), capsys)
    assert code == 2 and fragment in text, text
    lines = [ln for ln in text.strip().splitlines()  # argparse's usage lines come before its one error line
             if ln.strip() and not ln.startswith(("usage:", " "))]
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in text, text
    assert _digest(refusal_env["dir"]) == before
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == [], f"a refused command wrote {written}"


def test_sigterm_during_predict_leaves_no_partial_file(refusal_env, tmp_path, capsys, monkeypatch):
    """SIGTERM while a label map is being written: the temporary file is removed,
    the command ends in one line (status 143), and the next folder run works."""
    from napari_m3hl.io import nifti

    real = nib.save

    def killed_while_writing(img, path, *a, **k):
        Path(path).write_bytes(b"")  # the write had begun
        os.kill(os.getpid(), signal.SIGTERM)
        return real(img, path, *a, **k)

    monkeypatch.setattr(nifti.nib if hasattr(nifti, "nib") else nib, "save", killed_while_writing)
    out = tmp_path / "out"
    code, text = _run(["predict", "--checkpoint", refusal_env["ck"], "--input", refusal_env["scan"], "--output", out],
                      capsys)
    assert code == 143 and "terminated" in text and "Traceback" not in text, text
    assert [p.name for p in out.iterdir()] == [] if out.exists() else True
    monkeypatch.undo()
    (out / ".scan.nii.gz.leftover.nii.gz").parent.mkdir(parents=True, exist_ok=True)
    (out / ".scan.nii.gz.leftover.nii.gz").write_bytes(b"")  # what an older version left behind
    _nifti(out / "next.nii.gz", refusal_env["image"])
    code, text = _run(["predict", "--checkpoint", refusal_env["ck"], "--input", out, "--output", tmp_path / "o2"], capsys)
    assert code == 0 and "leftover" not in text, text


def test_a_folder_whose_later_file_is_corrupt_says_what_was_written(env, tmp_path, capsys):
    """A file whose header reads but whose voxels do not (a cut-off .nii.gz) is met
    after the outputs of the files before it were written: status 1 (not 2,
    "nothing written"), naming the bad file and the written label maps."""
    import gzip

    folder = tmp_path / "in"
    folder.mkdir()
    _nifti(folder / "a_good.nii.gz", env["image"])
    whole = gzip.decompress((folder / "a_good.nii.gz").read_bytes())
    (folder / "b_cut.nii.gz").write_bytes(gzip.compress(whole[: len(whole) // 2]))
    code, text = _run(["predict", "--checkpoint", env["ck"], "--input", folder, "--output", tmp_path / "o"], capsys)
    assert code == 1 and "b_cut.nii.gz" in text and "a_good.nii.gz" in text and "were written" in text, text
    assert len([ln for ln in text.splitlines() if "error" in ln]) == 1 and "Traceback" not in text, text
    assert (tmp_path / "o" / "a_good.nii.gz").is_file() and not (tmp_path / "o" / "b_cut.nii.gz").exists()
