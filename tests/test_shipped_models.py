"""The shipped models in models/ still segment real ACDC validation volumes.

Each shipped model is scored on the first two validation volumes of the
shared ACDC data (one patient, end-diastole and end-systole); the mean Dice
over RV/Myo/LV and both volumes must stay above a floor set a few points
under the value measured when the model was made (the model cards in
models/<name>.yaml hold the full 20-volume numbers). A broken model file, a
changed network or a preprocessing change in the inference path cannot land
silently. The tests skip, with the reason, when ../shared/data is absent.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from napari_m3hl.io.checkpoint import load_model
from napari_m3hl.cli.main import main
from napari_m3hl.data import load_val_volumes
from napari_m3hl.inference.slices2d import predict_volume_2d
from napari_m3hl.metrics.binary import dice

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"

# name -> (mean Dice measured on the two volumes when shipped, floor)
SHIPPED = {
    "acdc7_m3hl_unet2d": (0.8430, 0.80),
    "acdc70_unet2d": (0.8934, 0.85),
}


def _mean_dice(pred: np.ndarray, label: np.ndarray) -> float:
    return float(np.mean([dice(pred == c, label == c) for c in (1, 2, 3)]))


@pytest.fixture(scope="module")
def two_val_volumes(shared_data):
    if not (shared_data / "acdc" / "val.list").is_file():
        pytest.skip(f"no ACDC validation data under {shared_data / 'acdc'}")
    return load_val_volumes(shared_data / "acdc", limit=2)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_file_and_card(name):
    pt, card_path = MODELS_DIR / f"{name}.pt", MODELS_DIR / f"{name}.yaml"
    assert pt.is_file(), f"shipped model {pt} is missing"
    model, ckpt = load_model(pt)
    assert ckpt["arch"] == "unet2d" and ckpt["num_classes"] == 4 and "teacher" not in ckpt and "optimizer" not in ckpt
    assert all(v.dtype.is_floating_point is False or v.dtype.itemsize == 2 for v in ckpt["student"].values())
    assert pt.stat().st_size < 8 * 2**20
    card = yaml.safe_load(card_path.read_text())
    assert "variants" not in card, "a card with 'variants' would be listed as a training preset"
    assert card["validation"]["mean"]["dice"] > 0.5


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_dice_on_real_volumes(name, two_val_volumes):
    measured, floor = SHIPPED[name]
    model, ckpt = load_model(MODELS_DIR / f"{name}.pt")
    scores = []
    for _, image, label in two_val_volumes:
        pred = predict_volume_2d(model, image, patch=tuple(ckpt["patch_size"]), device="cpu",
                                 resize_input=ckpt["config"].get("image_interp", "bilinear"))
        assert pred.shape == label.shape and pred.dtype == np.uint8
        scores.append(_mean_dice(pred, label))
    got = float(np.mean(scores))
    assert got >= floor, f"{name}: mean Dice {got:.4f} on two validation volumes, floor {floor} (measured {measured})"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_predict_nifti_from_val_volume_keeps_affine(name, two_val_volumes, tmp_path):
    case, image, label = two_val_volumes[0]
    # package order (Z, Y, X) -> NIfTI (X, Y, Z); an oblique affine with spacing and an origin
    affine = np.array([[0.0, -1.4, 0.0, 120.5], [1.3, 0.0, 0.1, -80.25], [0.0, 0.0, 10.0, 33.0], [0, 0, 0, 1]])
    img = nib.Nifti1Image((image.transpose(2, 1, 0) * 800).astype(np.int16), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    src = tmp_path / f"{case}.nii.gz"
    nib.save(img, src)
    assert main(["predict", "--checkpoint", str(MODELS_DIR / f"{name}.pt"), "--input", str(src),
                 "--output", str(tmp_path / "out")]) == 0
    seg = nib.load(tmp_path / "out" / f"{case}.nii.gz")
    src_img = nib.load(src)
    assert seg.shape == src_img.shape
    np.testing.assert_allclose(seg.affine, src_img.affine, atol=1e-5)
    np.testing.assert_allclose(seg.header.get_zooms(), src_img.header.get_zooms(), atol=1e-5)
    pred = np.asanyarray(seg.dataobj).transpose(2, 1, 0)
    # the NIfTI path (percentile normalisation instead of min-max) must still segment the heart
    assert _mean_dice(pred, label) >= SHIPPED[name][1] - 0.1
