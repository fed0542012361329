"""Tests for napari_m3hl.io.nifti: NIfTI/h5 reading and writing, input checks."""
from __future__ import annotations


import h5py
import nibabel as nib
import numpy as np
import pytest

from napari_m3hl.errors import M3HLInputError
from napari_m3hl.io.nifti import affine_from_spacing, load_nifti, save_nifti_image, save_nifti_labels
from napari_m3hl.io.h5 import load_h5_slice, load_h5_volume, load_la_case
from napari_m3hl.io.intensity import normalize_intensity
from napari_m3hl.io.checks import validate_image, validate_label

# an oblique affine whose entries are exact float32 values (NIfTI stores float32)
AFFINE = np.array(
    [[-1.25, 0.125, 0.0, 90.5],
     [0.0, 1.5, -0.25, -120.0],
     [0.0625, 0.0, 8.0, 33.25],
     [0.0, 0.0, 0.0, 1.0]]
)


def _write_source(path, shape, zooms_t=None, affine=AFFINE):
    """A float NIfTI image with codes/units/description/scaling set."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 1000, shape).astype(np.int16)
    img = nib.Nifti1Image(data, affine)
    hdr = img.header
    hdr.set_sform(affine, code=1)
    hdr.set_qform(affine, code=1)
    hdr.set_xyzt_units("mm", "sec")
    hdr["descrip"] = b"m3hl test"
    if zooms_t is not None:
        hdr.set_zooms(hdr.get_zooms()[:3] + (zooms_t,))
    img.header.set_slope_inter(0.5, 10.0)
    nib.save(img, str(path))
    return data * 0.5 + 10.0


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_3d_roundtrip(tmp_path, suffix):
    src = tmp_path / f"img{suffix}"
    raw = _write_source(src, (7, 6, 5))
    vol = load_nifti(src)
    assert vol.data.dtype == np.float32
    assert vol.data.shape == (5, 6, 7)
    np.testing.assert_allclose(vol.data, np.transpose(raw, (2, 1, 0)))
    zooms = nib.load(str(src)).header.get_zooms()
    assert vol.spacing == pytest.approx(tuple(reversed(zooms)))
    assert np.array_equal(vol.affine, AFFINE)
    assert vol.path == src

    labels = np.random.default_rng(1).integers(0, 4, vol.data.shape).astype(np.uint8)
    out = tmp_path / f"lab{suffix}"
    save_nifti_labels(labels, out, vol.affine, vol.header)
    back = nib.load(str(out))
    assert back.get_data_dtype() == np.uint8
    assert np.array_equal(np.asanyarray(back.dataobj), np.transpose(labels, (2, 1, 0)))
    assert np.array_equal(back.affine, AFFINE)
    hdr = back.header
    assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1
    assert hdr.get_xyzt_units() == ("mm", "sec")
    assert bytes(hdr["descrip"]).rstrip(b"\0") == b"m3hl test"
    slope, inter = hdr.get_slope_inter()
    assert slope in (None, 1.0) and inter in (None, 0.0)
    again = load_nifti(out)
    assert np.array_equal(again.data, labels.astype(np.float32))
    assert np.array_equal(again.affine, vol.affine)
    assert again.spacing == pytest.approx(vol.spacing)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_4d_roundtrip(tmp_path, suffix):
    src = tmp_path / f"cine{suffix}"
    raw = _write_source(src, (6, 5, 4, 3), zooms_t=0.03)
    vol = load_nifti(src)
    assert vol.data.shape == (3, 4, 5, 6)
    np.testing.assert_allclose(vol.data, np.transpose(raw, (3, 2, 1, 0)))
    assert vol.spacing[0] == pytest.approx(0.03)
    assert vol.spacing[1:] == pytest.approx(tuple(reversed(nib.load(str(src)).header.get_zooms()[:3])))

    labels = np.random.default_rng(2).integers(0, 3, vol.data.shape)
    out = tmp_path / f"lab4{suffix}"
    save_nifti_labels(labels, out, vol.affine, vol.header)
    again = load_nifti(out)
    assert again.data.shape == labels.shape
    assert np.array_equal(again.data, labels)
    assert np.array_equal(again.affine, AFFINE)
    assert again.spacing[0] == pytest.approx(0.03)


def test_save_labels_without_header_and_int16(tmp_path):
    affine = affine_from_spacing((10.0, 1.5, 1.25))
    assert np.array_equal(np.diag(affine), [1.25, 1.5, 10.0, 1.0])
    labels = np.zeros((3, 4, 5), np.int32)
    labels[1, 2, 3] = 300
    out = tmp_path / "big.nii.gz"
    save_nifti_labels(labels, out, affine)
    back = nib.load(str(out))
    assert back.get_data_dtype() == np.int16
    assert np.array_equal(back.affine, affine)
    assert int(back.header["sform_code"]) > 0
    assert np.array_equal(load_nifti(out).data, labels)
    assert load_nifti(out).spacing == pytest.approx((10.0, 1.5, 1.25))


def test_save_image_roundtrip(tmp_path):
    img = np.random.default_rng(3).random((4, 5, 6)).astype(np.float32)
    out = tmp_path / "img.nii.gz"
    save_nifti_image(img, out, AFFINE)
    vol = load_nifti(out)
    assert np.array_equal(vol.data, img)
    assert np.array_equal(vol.affine, AFFINE)


def test_trailing_singleton_is_3d(tmp_path):
    p = tmp_path / "x.nii"
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6, 1), np.float32), np.eye(4)), str(p))
    assert load_nifti(p).data.shape == (6, 5, 4)


def test_nifti_errors(tmp_path):
    with pytest.raises(M3HLInputError, match="not found"):
        load_nifti(tmp_path / "missing.nii.gz")
    junk = tmp_path / "junk.nii"
    junk.write_bytes(b"this is not a nifti file" * 20)
    with pytest.raises(M3HLInputError, match="junk.nii"):
        load_nifti(junk)
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(20, 20, 20).astype(np.float32), np.eye(4)), str(good))
    truncated = tmp_path / "trunc.nii.gz"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(M3HLInputError, match="trunc.nii.gz"):
        load_nifti(truncated)
    flat = tmp_path / "flat.nii"
    nib.save(nib.Nifti1Image(np.ones((4, 5), np.float32), np.eye(4)), str(flat))
    with pytest.raises(M3HLInputError, match="2D"):
        load_nifti(flat)
    five = tmp_path / "five.nii"
    nib.save(nib.Nifti1Image(np.ones((2, 3, 4, 2, 2), np.float32), np.eye(4)), str(five))
    with pytest.raises(M3HLInputError, match="5D"):
        load_nifti(five)


def test_save_labels_errors(tmp_path):
    ok = np.zeros((2, 3, 4), np.uint8)
    with pytest.raises(M3HLInputError, match="negative"):
        save_nifti_labels(ok.astype(np.int16) - 1, tmp_path / "a.nii", np.eye(4))
    with pytest.raises(M3HLInputError, match="integer"):
        save_nifti_labels(ok + 0.5, tmp_path / "a.nii", np.eye(4))
    with pytest.raises(M3HLInputError, match=r"\.nii"):
        save_nifti_labels(ok, tmp_path / "a.png", np.eye(4))
    with pytest.raises(M3HLInputError, match="4x4"):
        save_nifti_labels(ok, tmp_path / "a.nii", np.eye(3))
    with pytest.raises(M3HLInputError, match="shape"):
        save_nifti_labels(np.zeros((3, 4), np.uint8), tmp_path / "a.nii", np.eye(4))


def _h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f.create_dataset(k, data=v)
    return path


def test_h5_loaders(tmp_path):
    img = np.random.default_rng(0).random((3, 8, 9)).astype(np.float32)
    lab = (img > 0.5).astype(np.uint8)
    image, label = load_h5_volume(_h5(tmp_path / "v.h5", image=img, label=lab))
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert np.array_equal(image, img) and np.array_equal(label, lab)
    image, label = load_h5_volume(_h5(tmp_path / "v2.h5", image=img))
    assert label is None

    image, label = load_h5_slice(_h5(tmp_path / "s.h5", image=img[0], label=lab[0]))
    assert image.shape == (8, 9) and np.array_equal(label, lab[0])
    image, label = load_h5_slice(tmp_path / "s.h5", need_label=False)
    assert label is None and np.array_equal(image, img[0])

    la = np.random.default_rng(1).standard_normal((10, 7, 5)).astype(np.float32)
    image, label = load_la_case(_h5(tmp_path / "la.h5", image=la, label=(la > 0).astype(np.uint8)))
    assert image.shape == (10, 7, 5)  # stored (X, Y, Z) order, not transposed
    assert np.array_equal(image, la)


def test_h5_errors(tmp_path):
    img = np.random.default_rng(0).random((8, 9)).astype(np.float32)
    with pytest.raises(M3HLInputError, match="not found"):
        load_h5_slice(tmp_path / "nope.h5")
    with pytest.raises(M3HLInputError, match="'image'"):
        load_h5_slice(_h5(tmp_path / "a.h5", label=np.zeros((8, 9), np.uint8)))
    with pytest.raises(M3HLInputError, match="'label'"):
        load_h5_slice(_h5(tmp_path / "b.h5", image=img))
    with pytest.raises(M3HLInputError, match="differs"):
        load_h5_slice(_h5(tmp_path / "c.h5", image=img, label=np.zeros((8, 8), np.uint8)))
    bad = img.copy()
    bad[2, 3] = np.nan
    with pytest.raises(M3HLInputError, match="NaN"):
        load_h5_slice(_h5(tmp_path / "d.h5", image=bad, label=np.zeros((8, 9), np.uint8)))
    with pytest.raises(M3HLInputError, match="3D"):
        load_h5_volume(_h5(tmp_path / "e.h5", image=img))
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5" * 10)
    with pytest.raises(M3HLInputError, match="junk.h5"):
        load_h5_volume(junk)


def test_validate_image():
    img = np.random.default_rng(0).random((4, 4)).astype(np.float32)
    validate_image(img, "layer x")
    for bad_value in (np.nan, np.inf):
        bad = img.copy()
        bad[0, 0] = bad_value
        with pytest.raises(M3HLInputError, match="layer x.*NaN"):
            validate_image(bad, "layer x")
    with pytest.raises(M3HLInputError, match="layer y.*constant"):
        validate_image(np.full((4, 4), 3.0), "layer y")


def test_validate_label():
    validate_label(np.array([[0, 1], [2, 3]], np.uint8), 4, "labels")
    with pytest.raises(M3HLInputError, match="my labels.*value 4"):
        validate_label(np.array([[0, 4]]), 4, "my labels")
    with pytest.raises(M3HLInputError, match="negative"):
        validate_label(np.array([[0, -1]]), 4, "my labels")
    with pytest.raises(M3HLInputError, match="integer"):
        validate_label(np.array([[0, 1.5]]), 4, "my labels")


def test_normalize_intensity():
    rng = np.random.default_rng(0)
    img = rng.normal(100, 10, (20, 50)).astype(np.float64)
    img[0, 0] = 1e6  # a single outlier must not squash the rest
    out = normalize_intensity(img)
    assert out.dtype == np.float32 and out.shape == img.shape
    assert out.min() == 0.0 and out.max() == 1.0
    assert 0.3 < np.median(out) < 0.7
    lo, hi = np.percentile(img, [0.5, 99.5])
    np.testing.assert_allclose(out[5, 5], np.clip((img[5, 5] - lo) / (hi - lo), 0, 1), rtol=1e-5)
    assert np.all(normalize_intensity(np.full((3, 3), 7.0)) == 0)
    with pytest.raises(M3HLInputError):
        normalize_intensity(np.array([1.0, np.nan]))
