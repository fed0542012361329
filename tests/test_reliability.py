"""Careless and hostile input, as a user types it (issue 13).

Every case runs ``m3hl ...`` through ``main([...])`` and checks the exit
status, a fragment of the one-line message, that no traceback was printed and
that no input file changed. What each command refuses, and why, is listed in
docs/refusals.md.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_m3hl.io.checkpoint import make_payload, save_checkpoint
from napari_m3hl.cli.main import main
from napari_m3hl.config import TrainConfig
from napari_m3hl.method.networks import build_network
from napari_m3hl.data.phantom import make_phantom_cohort

TINY = ["--iterations", "2", "--batch-size", "4", "--patch-size", "32,32", "--quiet"]
AFFINE = np.array([[1.4, 0, 0, -40.0], [0, 1.4, 0, 12.0], [0, 0, 8.0, 3.5], [0, 0, 0, 1]])
MARKER = "m3hl_pwned_marker"


class Evil:
    """Unpickling this would create a marker file (it must never run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _nifti(path: Path, zyx: np.ndarray, affine=AFFINE, dtype=None) -> Path:
    data = np.ascontiguousarray(np.transpose(zyx, tuple(range(zyx.ndim - 1, -1, -1))))
    img = nib.Nifti1Image(data if dtype is None else data.astype(dtype), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def _raw_header_file(path: Path, shape: tuple[int, ...], dtype=np.int16, payload: bytes = b"\0" * 64) -> Path:
    """A NIfTI file whose header claims ``shape`` but holds only ``payload``."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_sform(np.eye(4), code=1)
    raw = hdr.binaryblock + b"\0" * 4 + payload
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def _tiny_ckpt(path: Path, classes: int = 4, teacher: bool = True, patch=(32, 32)) -> Path:
    names = ("background", "RV", "Myo", "LV") if classes == 4 else ("background", "fg")
    arch = "unet2d" if len(patch) == 2 else "vnet3d"
    cfg = TrainConfig(arch=arch, num_classes=classes, class_names=names, patch_size=patch,
                      block_size=tuple(max(1, p // 4) for p in patch))
    net = build_network(arch, 1, classes)
    return save_checkpoint(path, make_payload(cfg, net, net if teacher else None))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Every input file the cases use (never to be changed by any command)."""
    d = tmp_path_factory.mktemp("inputs")
    e = {"dir": d}
    ph = make_phantom_cohort(1, seed=5, shape=(6, 64, 64))[0]
    e["scan"] = _nifti(d / "scan.nii.gz", ph.image.astype(np.float32))
    part = np.zeros_like(ph.label)
    part[[1, 4]] = ph.label[[1, 4]]
    e["labels"] = _nifti(d / "scan_labels.nii.gz", part, dtype=np.uint8)
    for name, value in (("lab7", 7), ("labneg", -1), ("labfrac", 1.5)):
        bad = part.astype(np.float32)
        bad[2, 10:20, 10:20] = value
        e[name] = _nifti(d / f"{name}.nii.gz", bad, dtype=np.float32)
    moved = AFFINE.copy()
    moved[:3, 3] += [30.0, 0, 0]
    e["labmoved"] = _nifti(d / "labmoved.nii.gz", part, affine=moved, dtype=np.uint8)
    e["imgcopy"] = _nifti(d / "imgcopy.nii.gz", ph.image.astype(np.float32))
    # inputs for predict
    pair = d / "pair"
    pair.mkdir()
    e["pair"] = pair
    _nifti(pair / "a.nii", ph.image.astype(np.float32))
    _nifti(pair / "a.nii.gz", ph.image.astype(np.float32))
    same = d / "same"
    same.mkdir()
    e["same"] = same
    _nifti(same / "b.nii.gz", ph.image.astype(np.float32))
    two = d / "two"
    two.mkdir()
    e["two"] = two
    _nifti(two / "c.nii.gz", ph.image.astype(np.float32))
    _nifti(two / "d.nii.gz", ph.image.astype(np.float32))
    e["constant"] = _nifti(d / "constant.nii.gz", np.full((4, 40, 40), 7.0, np.float32))
    nan = ph.image.astype(np.float32).copy()
    nan[2, 5, 5] = np.nan
    e["nan"] = _nifti(d / "nan.nii.gz", nan)
    e["complex"] = _nifti(d / "complex.nii", ph.image.astype(np.complex64) * (1 + 1j))
    rgb = np.zeros((8, 8, 3), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(d / "rgb.nii.gz"))
    e["rgb"] = d / "rgb.nii.gz"
    e["huge_gz"] = _raw_header_file(d / "huge.nii.gz", (30000, 30000, 300))
    e["huge"] = _raw_header_file(d / "huge.nii", (30000, 30000, 300))
    e["empty_axis"] = _raw_header_file(d / "empty.nii.gz", (16, 0, 4), payload=b"")
    e["not_image"] = d / "notes.txt"
    e["not_image"].write_text("not an image")
    # checkpoints
    e["ck"] = _tiny_ckpt(d / "net.pt")
    e["model_file"] = _tiny_ckpt(d / "model_file.pt", teacher=False)
    e["ck2"] = _tiny_ckpt(d / "two_classes.pt", classes=2)
    e["ck3d"] = _tiny_ckpt(d / "vnet.pt", classes=2, patch=(16, 16, 8))
    evil = d / "evil.pt"
    torch.save({"format": "m3hl-checkpoint-1", "student": Evil(d / MARKER)}, evil)
    e["evil"] = evil
    ck = torch.load(e["ck"], weights_only=True)
    missing = dict(ck)
    missing["student"] = {k: v for k, v in list(ck["student"].items())[1:]}
    missing.pop("weights_sha256")
    torch.save(missing, d / "missing_keys.pt")
    e["missing_keys"] = d / "missing_keys.pt"
    shaped = dict(ck)
    first = next(iter(ck["student"]))
    shaped["student"] = {**ck["student"], first: torch.zeros(3, 3)}
    shaped.pop("weights_sha256")
    torch.save(shaped, d / "wrong_shape.pt")
    e["wrong_shape"] = d / "wrong_shape.pt"
    e["flipped"] = _flip_weight_bytes(e["ck"], d / "flipped.pt", ck)
    # presets
    (d / "broken.yaml").write_text("settings: [unclosed\nvariants: {")
    (d / "scalar.yaml").write_text("42\n")
    (d / "arch.yaml").write_text("settings: {arch: resnet9000}\nvariants: {paper: {}}\n")
    (d / "neglr.yaml").write_text("settings: {lr: -0.01}\nvariants: {paper: {}}\n")
    (d / "mine.yaml").write_text("settings: {iterations: 2, batch_size: 4, patch_size: [32, 32]}\nvariants: {paper: {}}\n")
    e["blocker"] = d / "blocker"
    e["blocker"].write_text("a file where a folder is expected")
    return e


def _flip_weight_bytes(src: Path, dest: Path, ck: dict) -> Path:
    """A copy of ``src`` with 2,000 bytes inside the largest weight tensor flipped."""
    raw = bytearray(src.read_bytes())
    key = max(ck["student"], key=lambda k: ck["student"][k].numel())
    blob = ck["student"][key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    at = raw.find(blob[:256])
    assert at > 0, "tensor bytes not found in the file"
    for i in range(at + 512, at + 2512):
        raw[i] ^= 0xFF
    dest.write_bytes(bytes(raw))
    return dest


def _digest(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse refusals
        code = exc.code
    out = capsys.readouterr()
    return code, out.out + out.err


Case = tuple[str, Callable[[dict, Path], list], int, str]

PREDICT = ["predict", "--checkpoint"]

CASES: list[Case] = [
    # ---------------------------------------------------------------- data loss
    ("predict: output folder = input folder", lambda e, t: [*PREDICT, e["ck"], "--input", e["same"], "--output", e["same"]],
     2, "would destroy it"),
    ("predict: output = the input file", lambda e, t: [*PREDICT, e["ck"], "--input", e["scan"], "--output", e["scan"]],
     2, "would destroy it"),
    ("predict: --overwrite never writes over an input",
     lambda e, t: [*PREDICT, e["ck"], "--input", e["scan"], "--output", e["scan"], "--overwrite"], 2, "would destroy it"),
    ("predict: a.nii and a.nii.gz map to one output",
     lambda e, t: [*PREDICT, e["ck"], "--input", e["pair"], "--output", t / "out"], 2, "would both be written"),
    ("predict: a file name for several inputs",
     lambda e, t: [*PREDICT, e["ck"], "--input", e["two"], "--output", t / "seg.nii.gz"], 2, "names one file"),
    ("predict: --output is an existing file", lambda e, t: [*PREDICT, e["ck"], "--input", e["scan"], "--output", e["not_image"]],
     2, "is an existing file"),
    ("train: --out is a file", lambda e, t: ["train", "--data", "phantom", *TINY, "--out", e["blocker"]], 2, "is a file"),
    ("train: malicious --init leaves no run.json",
     lambda e, t: ["train", "--data", "phantom", *TINY, "--init", e["evil"], "--out", t / "run"], 2, "refused without running"),
    # ---------------------------------------------------------------- silently wrong
    ("train: block larger than the patch",
     lambda e, t: ["train", "--data", "phantom", *TINY, "--block-size", "64,64", "--out", t / "r"], 2, "larger than the patch"),
    ("train: block = patch mixes nothing",
     lambda e, t: ["train", "--data", "phantom", *TINY, "--block-size", "32,32", "--out", t / "r"], 2, "would take nothing"),
    ("train: negative alpha", lambda e, t: ["train", "--data", "phantom", *TINY, "--alpha", "-5", "--out", t / "r"], 2, "alpha"),
    ("train: negative lam", lambda e, t: ["train", "--data", "phantom", *TINY, "--lam", "-3", "--out", t / "r"], 2, "lam"),
    ("evaluate: --limit 0", lambda e, t: ["evaluate", "--checkpoint", e["ck"], "--data", "phantom", "--limit", "0"],
     2, "--limit: must be at least 1"),
    ("evaluate: --list with the phantom",
     lambda e, t: ["evaluate", "--checkpoint", e["ck"], "--data", "phantom", "--list", e["not_image"]], 2, "the phantom has none"),
    ("predict: --which teacher without a teacher",
     lambda e, t: [*PREDICT, e["model_file"], "--input", e["scan"], "--output", t, "--which", "teacher"], 2, "no teacher network"),
    ("evaluate: --which teacher without a teacher",
     lambda e, t: ["evaluate", "--checkpoint", e["model_file"], "--data", "phantom", "--which", "teacher"], 2, "no teacher network"),
    ("predict: complex image", lambda e, t: [*PREDICT, e["ck"], "--input", e["complex"], "--output", t], 2, "complex"),
    ("suggest: label value 7", lambda e, t: ["suggest", "--checkpoint", e["ck"], "--image", e["scan"], "--labels", e["lab7"]],
     2, "value 7"),
    ("suggest: label value -1", lambda e, t: ["suggest", "--checkpoint", e["ck"], "--image", e["scan"], "--labels", e["labneg"]],
     2, "value -1"),
    ("suggest: label value 1.5", lambda e, t: ["suggest", "--checkpoint", e["ck"], "--image", e["scan"], "--labels", e["labfrac"]],
     2, "fractional"),
    ("suggest: labels of another affine",
     lambda e, t: ["suggest", "--checkpoint", e["ck"], "--image", e["scan"], "--labels", e["labmoved"]], 2, "different affine"),
    ("suggest: the image given as labels",
     lambda e, t: ["suggest", "--checkpoint", e["ck"], "--image", e["scan"], "--labels", e["scan"]], 2, "is the image itself"),
    ("suggest: a copy of the image as labels",
     lambda e, t: ["suggest", "--checkpoint", e["ck"], "--image", e["scan"], "--labels", e["imgcopy"]], 2, "label map"),
    ("predict: weights with flipped bytes", lambda e, t: [*PREDICT, e["flipped"], "--input", e["scan"], "--output", t],
     2, "do not match the checksum"),
    # ---------------------------------------------------------------- raw tracebacks
    ("predict: unwritable output folder",
     lambda e, t: [*PREDICT, e["ck"], "--input", e["scan"], "--output", e["blocker"] / "out"], 2, "not writable"),
    ("train: unwritable --out", lambda e, t: ["train", "--data", "phantom", *TINY, "--out", e["blocker"] / "run"], 2, "not writable"),
    ("evaluate: unwritable --json (checked before the run)",
     lambda e, t: ["evaluate", "--checkpoint", e["ck"], "--data", "phantom", "--json", e["blocker"] / "m.json"], 2,
     "is a file, not a folder"),
    ("phantom: --output is a file", lambda e, t: ["phantom", "--output", e["blocker"]], 2, "is a file"),
    ("train: --patch-size 0,0", lambda e, t: ["train", "--data", "phantom", *TINY, "--patch-size", "0,0", "--out", t / "r"],
     2, "patch size (0, 0)"),
    ("train: --block-size 0,0", lambda e, t: ["train", "--data", "phantom", *TINY, "--block-size", "0,0", "--out", t / "r"],
     2, "block size (0, 0)"),
    ("train: --patch-size abc", lambda e, t: ["train", "--data", "phantom", "--patch-size", "abc", "--out", t / "r"],
     2, "expected sizes like 256,256"),
    ("train: --set batch_size=abc", lambda e, t: ["train", "--data", "phantom", "--set", "batch_size=abc", "--out", t / "r"],
     2, "batch_size must be an integer"),
    ("train: --set lr=[1]", lambda e, t: ["train", "--data", "phantom", "--set", "lr=[1]", "--out", t / "r"],
     2, "lr must be a number"),
    ("train: --set use_hl=maybe", lambda e, t: ["train", "--data", "phantom", "--set", "use_hl=maybe", "--out", t / "r"],
     2, "use_hl must be true or false"),
    ("train: --set patch_size=32", lambda e, t: ["train", "--data", "phantom", "--set", "patch_size=32", "--out", t / "r"],
     2, "patch_size must be a list"),
    ("train: --set an unknown key", lambda e, t: ["train", "--data", "phantom", "--set", "speed=11", "--out", t / "r"],
     2, "unknown training settings: speed"),
    ("train: --set broken YAML", lambda e, t: ["train", "--data", "phantom", "--set", "block_size=[1,", "--out", t / "r"],
     2, "not a valid value"),
    ("train: broken preset YAML", lambda e, t: ["train", "--preset", e["dir"] / "broken.yaml", "--out", t / "r"],
     2, "broken.yaml is not valid YAML"),
    ("train: scalar preset", lambda e, t: ["train", "--preset", e["dir"] / "scalar.yaml", "--out", t / "r"],
     2, "must be a YAML mapping"),
    ("train: preset with an unknown architecture", lambda e, t: ["train", "--preset", e["dir"] / "arch.yaml", "--out", t / "r"],
     2, "arch must be one of"),
    ("train: preset with a negative lr", lambda e, t: ["train", "--preset", e["dir"] / "neglr.yaml", "--out", t / "r"],
     2, "lr must be a finite number >= 0"),
    ("train: --init with missing keys",
     lambda e, t: ["train", "--data", "phantom", *TINY, "--init", e["missing_keys"], "--out", t / "r"], 2, "missing"),
    ("train: --init with a wrongly shaped tensor",
     lambda e, t: ["train", "--data", "phantom", *TINY, "--init", e["wrong_shape"], "--out", t / "r"], 2, "has shape (3, 3)"),
    ("train: --resume with a wrongly shaped tensor",
     lambda e, t: ["train", "--data", "phantom", "--resume", e["wrong_shape"], "--out", t / "r"], 2, "has shape (3, 3)"),
    ("train: --resume of a model file", lambda e, t: ["train", "--data", "phantom", "--resume", e["model_file"], "--out", t / "r"],
     2, "no optimizer state"),
    # ---------------------------------------------------------------- unclear or hanging
    ("train: NaN voxels name the file",
     lambda e, t: ["train", "--data", e["nan"], "--labels", e["labels"], *TINY, "--out", t / "r"], 2, "nan.nii.gz"),
    ("predict: RGB NIfTI", lambda e, t: [*PREDICT, e["ck"], "--input", e["rgb"], "--output", t], 2, "RGB"),
    ("predict: a header claiming 30000x30000x300 (.nii.gz)",
     lambda e, t: [*PREDICT, e["ck"], "--input", e["huge_gz"], "--output", t], 2, "of memory but only"),
    ("predict: a header claiming 30000x30000x300 (.nii)",
     lambda e, t: [*PREDICT, e["ck"], "--input", e["huge"], "--output", t], 2, "is truncated"),
    ("predict: a zero-length axis", lambda e, t: [*PREDICT, e["ck"], "--input", e["empty_axis"], "--output", t], 2, "empty axis"),
    ("predict: an input that is not NIfTI", lambda e, t: [*PREDICT, e["ck"], "--input", e["not_image"], "--output", t],
     2, "is not a .nii"),
    ("train: unknown --preset lists the presets", lambda e, t: ["train", "--preset", "nope", "--out", t / "r"],
     2, "acdc_unet2d"),
    ("evaluate: 2-class checkpoint on 4-class data",
     lambda e, t: ["evaluate", "--checkpoint", e["ck2"], "--data", "phantom"], 2, "2D model with 2 classes"),
    ("evaluate: 3D checkpoint on 2D data",
     lambda e, t: ["evaluate", "--checkpoint", e["ck3d"], "--data", "phantom"], 2, "3D model with 2 classes"),
    ("predict: malicious checkpoint", lambda e, t: [*PREDICT, e["evil"], "--input", e["scan"], "--output", t],
     2, "refused without running"),
    ("evaluate: malicious checkpoint", lambda e, t: ["evaluate", "--checkpoint", e["evil"], "--data", "phantom"],
     2, "refused without running"),
    ("suggest: malicious checkpoint", lambda e, t: ["suggest", "--checkpoint", e["evil"], "--image", e["scan"]],
     2, "refused without running"),
    ("train: malicious --resume", lambda e, t: ["train", "--data", "phantom", "--resume", e["evil"], "--out", t / "r"],
     2, "refused without running"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_refused_with_one_line(case: Case, env, tmp_path, capsys):
    _, argv, status, fragment = case
    before = _digest(env["dir"])
    code, text = _run(argv(env, tmp_path), capsys)
    assert code == status, text
    assert fragment in text, text
    assert "Traceback" not in text and "weights_only" not in text
    assert len([ln for ln in text.strip().splitlines() if "error" in ln]) == 1, text
    assert _digest(env["dir"]) == before, "an input file changed"
    assert not (env["dir"] / MARKER).exists(), "a pickled payload ran"
    assert not (tmp_path / "run" / "run.json").exists() and not (tmp_path / "r" / "run.json").exists()


# ------------------------------------------------------------------ accepted, with the right result


def test_predict_writes_a_named_file_and_refuses_to_overwrite(env, tmp_path, capsys):
    before = _digest(env["dir"])
    seg = tmp_path / "seg.nii.gz"
    assert _run([*PREDICT, env["ck"], "--input", env["scan"], "--output", seg], capsys)[0] == 0
    assert seg.is_file() and nib.load(seg).shape == nib.load(env["scan"]).shape
    first = seg.read_bytes()
    code, text = _run([*PREDICT, env["ck"], "--input", env["scan"], "--output", seg], capsys)
    assert code == 2 and "--overwrite" in text and seg.read_bytes() == first
    # an output folder already holding <name>.nii.gz: refused, then replaced with --overwrite
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "scan.nii.gz").write_bytes(b"keep me")
    code, text = _run([*PREDICT, env["ck"], "--input", env["scan"], "--output", tmp_path / "out"], capsys)
    assert code == 2 and "already exist" in text and (tmp_path / "out" / "scan.nii.gz").read_bytes() == b"keep me"
    assert _run([*PREDICT, env["ck"], "--input", env["scan"], "--output", tmp_path / "out", "--overwrite"], capsys)[0] == 0
    assert nib.load(tmp_path / "out" / "scan.nii.gz").shape == nib.load(env["scan"]).shape
    assert _digest(env["dir"]) == before


def test_predict_constant_image_warns(env, tmp_path, capsys):
    code, text = _run([*PREDICT, env["ck"], "--input", env["constant"], "--output", tmp_path], capsys)
    assert code == 0 and "warning" in text and "constant" in text and "constant.nii.gz" in text


def test_predict_nan_voxels_warn_and_become_background(env, tmp_path, capsys):
    code, text = _run([*PREDICT, env["ck"], "--input", env["nan"], "--output", tmp_path], capsys)
    assert code == 0 and "warning" in text and "nan.nii.gz" in text and "1 NaN" in text
    seg = np.asanyarray(nib.load(tmp_path / "nan.nii.gz").dataobj)
    assert seg[5, 5, 2] == 0


def test_old_checkpoint_without_checksum_loads(env, tmp_path, capsys):
    from napari_m3hl.io.checkpoint import load_checkpoint

    ck = torch.load(env["ck"], weights_only=True)
    ck.pop("weights_sha256")
    torch.save(ck, tmp_path / "old.pt")
    assert "weights_sha256" not in load_checkpoint(tmp_path / "old.pt")
    assert _run([*PREDICT, tmp_path / "old.pt", "--input", env["scan"], "--output", tmp_path / "o"], capsys)[0] == 0
    for shipped in sorted((Path(__file__).resolve().parents[1] / "models").glob("*.pt")):
        assert "weights_sha256" in load_checkpoint(shipped)  # re-saved with the checksum, verified here


def test_preset_path_without_yaml(env, tmp_path, capsys):
    code, text = _run(["train", "--preset", env["dir"] / "mine", "--data", "phantom", "--quiet", "--out", tmp_path / "r"],
                      capsys)
    assert code == 0, text
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["config"]["iterations"] == 2 and run["config"]["block_size"] == [8, 8]


def test_json_parent_is_created(env, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "s.json"
    code, text = _run(["suggest", "--checkpoint", env["ck"], "--image", env["scan"], "--labels", env["labels"],
                       "--json", out], capsys)
    assert code == 0, text
    assert json.loads(out.read_text())["labeled"] == [1, 4]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "a"
    assert main(["train", "--data", "phantom", *TINY, "--out", str(out)]) == 0
    return out


def test_block_is_derived_from_the_patch(run_a):
    cfg = json.loads((run_a / "run.json").read_text())["config"]
    assert cfg["patch_size"] == [32, 32] and cfg["block_size"] == [8, 8]


def test_second_run_into_the_same_folder(run_a, capsys, tmp_path):
    before = _digest(run_a)
    code, text = _run(["train", "--data", "phantom", *TINY, "--out", run_a], capsys)
    assert code == 2 and "not empty" in text and "--overwrite" in text
    assert _digest(run_a) == before
    # a refused --resume (another patch) leaves the run as it was
    code, text = _run(["train", "--data", "phantom", "--resume", run_a / "last.pt", "--patch-size", "64,64",
                       "--out", run_a], capsys)
    assert code == 2 and "keeps its patch_size" in text and _digest(run_a) == before
    # --overwrite replaces the run and removes the earlier run's files
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in run_a.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    (copy / "best.pt").write_bytes(b"old best")
    code, text = _run(["train", "--data", "phantom", *TINY, "--out", copy, "--overwrite"], capsys)
    assert code == 0, text
    assert not (copy / "best.pt").exists() and (copy / "last.pt").is_file()


def test_resume_restores_patch_and_block(run_a, capsys, tmp_path):
    run_b = tmp_path / "b"
    run_b.mkdir()
    (run_b / "last.pt").write_bytes((run_a / "last.pt").read_bytes())
    code, text = _run(["train", "--data", "phantom", "--resume", run_b / "last.pt", "--iterations", "3", "--quiet",
                       "--out", run_b], capsys)
    assert code == 0, text
    run = json.loads((run_b / "run.json").read_text())
    assert run["config"]["patch_size"] == [32, 32] and run["config"]["block_size"] == [8, 8]
    assert run["config"]["batch_size"] == 4 and run["iterations_done"] == 3
    assert "iterations 2→3" in text


def test_divergence_is_one_line(tmp_path, capsys, monkeypatch):
    from napari_m3hl.training import trainer

    def diverging(real):  # the loss becomes NaN at the first step: a certain divergence, not a large lr's chance
        def step(*args, **kwargs):
            res = real(*args, **kwargs)
            res.losses["total"] = res.losses["total"] * float("nan")
            return res
        return step

    for name in ("supervised_losses", "m3hl_losses"):
        monkeypatch.setattr(trainer, name, diverging(getattr(trainer, name)))
    code, text = _run(["train", "--data", "phantom", *TINY[:-1], "--iterations", "30", "--quiet",
                       "--out", tmp_path / "r"], capsys)
    assert code == 1, text
    assert "diverged" in text and "lower --lr" in text and "no checkpoint of this run was saved" in text
    assert "Traceback" not in text and not (tmp_path / "r" / "last.pt").exists()
    assert (tmp_path / "r" / "diverged.pt").is_file()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the blocker-file cases cover this")
def test_read_only_output_folder(env, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, text = _run([*PREDICT, env["ck"], "--input", env["scan"], "--output", ro], capsys)
        assert code == 2 and "not writable" in text
    finally:
        ro.chmod(0o700)


def test_out_of_memory_is_not_called_corrupt(env, tmp_path, capsys, monkeypatch):
    def no_memory(self, *a, **k):
        raise MemoryError

    monkeypatch.setattr(nib.Nifti1Image, "get_fdata", no_memory)
    code, text = _run([*PREDICT, env["ck"], "--input", env["scan"], "--output", tmp_path], capsys)
    assert code == 2 and "Not enough memory" in text and "corrupt" not in text


# ------------------------------------------------------------------ sessions and checkpoints (the widget's files)


@pytest.mark.parametrize("value", [-1, 300, 1.5])
def test_session_labels_out_of_range_are_refused(tmp_path, value):
    from napari_m3hl.errors import M3HLInputError
    from napari_m3hl.io.session import load_session, save_session

    labels = np.zeros((3, 8, 8), np.float32)
    labels[1, 2:4, 2:4] = value
    with pytest.raises(M3HLInputError, match="labels"):
        save_session(tmp_path / "s", labels, np.eye(4))
    assert not (tmp_path / "s" / "labels.nii.gz").exists()
    # a labels file edited by hand is refused on opening, not wrapped around
    (tmp_path / "t").mkdir()
    _nifti(tmp_path / "t" / "labels.nii.gz", labels, affine=np.eye(4), dtype=np.float32)
    with pytest.raises(M3HLInputError, match="labels.nii.gz"):
        load_session(tmp_path / "t")


@pytest.mark.parametrize("name, text, fragment", [
    ("settings.json", "{not json", "settings.json is not valid JSON"),
    ("session.json", "[1, 2", "session.json is not valid JSON"),
    ("settings.json", '{"advanced": {"iterations": "many"}}', "advanced.iterations"),
    ("settings.json", '{"spread": "yes"}', "setting spread"),
    ("settings.json", '{"advanced": {"patch_size": [0, 64]}}', "advanced.patch_size"),
    ("settings.json", "[1, 2, 3]", "JSON object"),
])
def test_damaged_session_files_are_named(tmp_path, name, text, fragment):
    from napari_m3hl.errors import M3HLInputError
    from napari_m3hl.io.session import load_session, save_session

    labels = np.zeros((3, 8, 8), np.uint8)
    labels[1, 2:4, 2:4] = 2
    folder = save_session(tmp_path / "s", labels, np.eye(4), settings={"advanced": {"iterations": 10}})
    (folder / name).write_text(text)
    with pytest.raises(M3HLInputError, match=fragment):
        load_session(folder)


def test_session_files_share_one_mode(tmp_path):
    from napari_m3hl.io.session import save_session

    labels = np.zeros((3, 8, 8), np.uint8)
    ck = _tiny_ckpt(tmp_path / "net.pt")
    folder = save_session(tmp_path / "s", labels, np.eye(4), checkpoint=ck, settings={"a": 1}, meta={"b": 2})
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert len(set(modes.values())) == 1, modes


def test_interrupted_checkpoint_write_keeps_the_old_file(tmp_path, monkeypatch):
    from napari_m3hl.io import checkpoint as ckmod

    path = _tiny_ckpt(tmp_path / "last.pt")
    before = path.read_bytes()

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckmod.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ckmod.save_checkpoint(path, {"student": {}})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_cine_session_labels_round_trip(tmp_path):
    from napari_m3hl.io.session import load_session, save_session

    labels = np.zeros((2, 3, 8, 8), np.uint8)
    labels[1, 2, 2:4, 2:4] = 3
    s = load_session(save_session(tmp_path / "s", labels, np.eye(4)))
    np.testing.assert_array_equal(s.labels, labels)
