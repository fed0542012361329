"""Clean segmentations by default (each class's largest 3D component), flip
TTA as an option: the Predictor, and ``m3hl predict`` / ``evaluate`` typed
as a user types them."""
from __future__ import annotations

import json
import shlex

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from napari_m3hl.cli.main import main
from napari_m3hl.config import load_preset
from napari_m3hl.inference.predictor import Predictor
from napari_m3hl.inference.tta import FLIPS, FlipAverage
from napari_m3hl.io.checkpoint import make_payload, save_checkpoint
from napari_m3hl.method.components import largest_component_per_class
from napari_m3hl.method.networks import NetOutput, build_network


class Threshold(nn.Module):
    """Class 1 where the input is above 0.5, else background (logits ±5)."""

    def forward(self, x: torch.Tensor) -> NetOutput:
        fg = (x > 0.5).float()
        return NetOutput(torch.cat([5 * (1 - fg), 5 * fg], dim=1) - 2.5, {})


def _two_blobs() -> np.ndarray:
    vol = np.zeros((4, 32, 32), np.float32)
    vol[1:3, 4:14, 4:14] = 1.0  # 200 voxels
    vol[2, 24:28, 24:28] = 1.0  # 16 voxels, apart
    return vol


def test_predictor_keeps_the_largest_3d_component_unless_told_not_to():
    vol = _two_blobs()
    p = Predictor(Threshold(), (32, 32), 2, ("bg", "fg"), "nearest", precision="fp32", channels_last=False)
    assert p.clean and not p.tta  # the defaults
    labels, probs = p.predict(vol, return_probs=True)
    assert labels.sum() == 200 and ndimage.label(labels)[1] == 1
    raw, raw_probs = Predictor(Threshold(), (32, 32), 2, ("bg", "fg"), "nearest", precision="fp32",
                               channels_last=False, clean=False).predict(vol, return_probs=True)
    assert raw.sum() == 216 and ndimage.label(raw)[1] == 2
    np.testing.assert_array_equal(probs, raw_probs)  # probabilities are never changed
    np.testing.assert_array_equal(p.finish(raw), labels)


def test_from_checkpoint_cleans_and_from_network_does_not(tmp_path):
    cfg = load_preset("acdc_unet2d")
    path = save_checkpoint(tmp_path / "m.pt", make_payload(cfg, build_network("unet2d", 1, 4)))
    assert Predictor.from_checkpoint(path).clean
    assert not Predictor.from_checkpoint(path, clean=False).clean and Predictor.from_checkpoint(path, tta=True).tta
    assert not Predictor.from_network(build_network("unet2d", 1, 4), cfg).clean  # training validates as the papers


def test_flip_average_is_the_mean_of_the_mirrored_passes():
    torch.manual_seed(0)
    net = nn.Conv2d(1, 3, 3, padding=1)  # not mirror-symmetric
    x = torch.rand(2, 1, 8, 6)
    want = sum(torch.flip(torch.softmax(net(torch.flip(x, d) if d else x), 1), d) if d else
               torch.softmax(net(x), 1) for d in FLIPS) / len(FLIPS)
    got = torch.softmax(FlipAverage(net)(x).logits, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert len(FLIPS) == 4


class Threshold4(nn.Module):
    """Four classes: RV (1) where the input is above 0.5, else background."""

    def forward(self, x: torch.Tensor) -> NetOutput:
        fg = (x > 0.5).float()
        zero = torch.zeros_like(fg)
        return NetOutput(torch.cat([5 * (1 - fg), 5 * fg, zero, zero], dim=1), {})


@pytest.fixture
def scan_and_model(tmp_path, monkeypatch):
    """A scan as NIfTI with two bright blobs apart (40 and 8 voxels), and a model
    file whose network labels bright voxels RV (the checkpoint's network is
    replaced by :class:`Threshold4`, so the raw segmentation is known)."""
    import napari_m3hl.io.checkpoint as ck

    vol = np.zeros((4, 32, 32), np.float32)
    vol[1:3, 4:8, 4:9] = 1000.0  # 40 voxels
    vol[2, 24:26, 24:28] = 1000.0  # 8 voxels
    nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0), np.diag([1.5, 1.5, 8.0, 1.0])), str(tmp_path / "scan.nii.gz"))
    cfg = load_preset("acdc_unet2d").replace(patch_size=(32, 32), block_size=(8, 8), image_interp="nearest")
    model = save_checkpoint(tmp_path / "m.pt", make_payload(cfg, build_network("unet2d", 1, 4)))
    monkeypatch.setattr(ck, "model_from_checkpoint", lambda ckpt, which, dev: Threshold4())
    return tmp_path, tmp_path / "scan.nii.gz", model


def _labels(path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj).transpose(2, 1, 0)


def test_m3hl_predict_cleans_by_default_and_no_clean_keeps_every_blob(scan_and_model):
    d, scan, model = scan_and_model
    assert main(shlex.split(f"predict --checkpoint {model} --input {scan} --output {d / 'clean.nii.gz'}")) == 0
    assert main(shlex.split(f"predict --checkpoint {model} --input {scan} --output {d / 'raw.nii.gz'} "
                            "--no-clean")) == 0
    clean, raw = _labels(d / "clean.nii.gz"), _labels(d / "raw.nii.gz")
    assert (raw == 1).sum() == 48 and (clean == 1).sum() == 40 and not clean[2, 24:26, 24:28].any()
    np.testing.assert_array_equal(clean, largest_component_per_class(raw[None], 4)[0])
    assert main(shlex.split(f"predict --checkpoint {model} --input {scan} --output {d / 'tta.nii.gz'} --tta")) == 0
    np.testing.assert_array_equal(_labels(d / "tta.nii.gz"), clean)  # a pointwise network: mirroring changes nothing


def test_m3hl_evaluate_records_cleaning(scan_and_model):
    d, _, model = scan_and_model  # the Threshold4 network on the phantom
    for flag, clean in (("", True), ("--no-clean", False)):
        out = d / f"eval{int(clean)}.json"
        assert main(shlex.split(f"evaluate --checkpoint {model} --data phantom --limit 1 --json {out} {flag}")) == 0
        r = json.loads(out.read_text())
        assert r["clean"] is clean and r["tta"] is False


def test_fewslice_start_segmentation_cleaned_unless_told_not_to(scan_and_model):
    from napari_m3hl.fewslice.loop import FewSliceOptions, prepare
    from napari_m3hl.io.nifti import load_nifti

    _, scan, model = scan_and_model  # two bright blobs, the Threshold4 network
    image = load_nifti(scan).data
    painted = np.zeros(image.shape, np.uint8)
    painted[0, :2, :2] = 1
    raw = prepare(model, image, painted, FewSliceOptions(clean=False)).volumes[0].base
    clean = prepare(model, image, painted, FewSliceOptions()).volumes[0].base
    assert (raw == 1).sum() == 48 and (clean == 1).sum() == 40
    np.testing.assert_array_equal(clean, largest_component_per_class(raw[None], 4)[0])
    assert "not cleaned" in FewSliceOptions(clean=False).summary() and "clean" not in FewSliceOptions().summary()


def test_no_clean_on_a_training_run_is_refused(tmp_path, capsys):
    assert main(shlex.split(f"train --data phantom --iterations 1 --no-clean --out {tmp_path / 'r'}")) == 2
    assert "--no-clean belongs to the few-slice loop" in capsys.readouterr().err
