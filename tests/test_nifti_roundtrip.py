"""NIfTI geometry survives every way labels are written: qform, sform, their
codes, pixdim and units come back exactly as the source image stores them.

Sources: every 3D/4D NIfTI file in nibabel's own test data
(``nibabel.testing.data_path``) and a file built here whose qform differs from
its sform (an oblique sform, a rotated qform, different codes and pixdim, as
scanners export). Each goes through the plugin's reader and writer functions
and through ``m3hl predict`` as a user types it.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from napari_m3hl.io.checkpoint import make_payload, save_checkpoint
from napari_m3hl.cli.main import main
from napari_m3hl.config import TrainConfig
from napari_m3hl.method.networks import build_network


def _nibabel_test_images() -> list[Path]:
    out = []
    for p in sorted(Path(data_path).iterdir()):
        if not p.name.endswith((".nii", ".nii.gz")):
            continue
        try:
            img = nib.load(p)
        except Exception:  # noqa: BLE001 - not an image nibabel reads as NIfTI
            continue
        if isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)) and len(img.shape) in (3, 4):
            out.append(p)
    return out


NIBABEL_IMAGES = _nibabel_test_images()


def _qform_ne_sform(path: Path) -> Path:
    """A scanner-like file: oblique sform (code 1) and a different qform (code 2), pixdim ≠ sform zooms."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 500, (40, 36, 6)).astype(np.int16)
    sform = np.array([[-0.9, 0.05, 0.1, 120.0], [0.04, 0.88, -1.2, -90.5], [0.02, 0.3, 7.5, 33.0], [0, 0, 0, 1]])
    theta = np.deg2rad(20)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    qform = np.eye(4)
    qform[:3, :3] = rot @ np.diag([1.2, 1.2, 8.0])
    qform[:3, 3] = [100.0, -60.0, 10.0]
    img = nib.Nifti1Image(data, None)
    hdr = img.header
    hdr.set_qform(qform, code=2)
    hdr.set_sform(sform, code=1)
    hdr.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
    back = nib.load(path)
    assert not np.allclose(back.header.get_qform(), back.header.get_sform(), atol=1.0)
    return path


SOURCES = [pytest.param(p, id=p.name) for p in NIBABEL_IMAGES] + [pytest.param("built", id="qform_ne_sform.nii.gz")]


@pytest.fixture
def source(request, tmp_path) -> Path:
    if request.param == "built":
        return _qform_ne_sform(tmp_path / "qform_ne_sform.nii.gz")
    return request.param


def _assert_same_geometry(src: Path, out: Path) -> None:
    a, b = nib.load(src), nib.load(out)
    ha, hb = a.header, b.header
    assert b.shape == a.shape
    assert type(hb) is type(ha), f"{out} is {type(hb).__name__}, the source {type(ha).__name__}"
    assert int(hb["qform_code"]) == int(ha["qform_code"]) and int(hb["sform_code"]) == int(ha["sform_code"])
    np.testing.assert_array_equal(hb.get_qform(), ha.get_qform())
    np.testing.assert_array_equal(hb.get_sform(), ha.get_sform())
    np.testing.assert_array_equal(b.affine, a.affine)
    for field in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z",
                  "srow_x", "srow_y", "srow_z"):
        np.testing.assert_array_equal(hb[field], ha[field], err_msg=field)
    np.testing.assert_array_equal(hb["pixdim"][: len(a.shape) + 1], ha["pixdim"][: len(a.shape) + 1])
    assert hb.get_xyzt_units() == ha.get_xyzt_units()


def test_the_nibabel_test_images_are_found():
    assert len(NIBABEL_IMAGES) >= 7, [p.name for p in NIBABEL_IMAGES]


@pytest.mark.parametrize("source", SOURCES, indirect=True)
def test_reader_writer_round_trip(source, tmp_path):
    from napari_m3hl._napari._reader import read_nifti
    from napari_m3hl._napari._writer import write_labels

    [(data, meta, _kind)] = read_nifti(str(source))
    labels = (np.asarray(data) > np.median(data)).astype(np.uint8)
    [out] = write_labels(str(tmp_path / "labels.nii.gz"), labels, meta)
    _assert_same_geometry(source, Path(out))
    stored = np.asanyarray(nib.load(out).dataobj)
    np.testing.assert_array_equal(stored, np.transpose(labels, tuple(range(labels.ndim - 1, -1, -1))))
    # the session folder keeps the geometry too
    from napari_m3hl.io.session import load_session, save_labels

    if labels.ndim == 3:
        save_labels(tmp_path / "s", labels, meta["metadata"]["affine"], meta["metadata"]["header"])
        _assert_same_geometry(source, tmp_path / "s" / "labels.nii.gz")
        np.testing.assert_array_equal(load_session(tmp_path / "s").labels, labels)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    cfg = TrainConfig(patch_size=(32, 32), block_size=(8, 8))
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "net.pt", make_payload(cfg, build_network("unet2d", 1, 4)))


@pytest.mark.parametrize("source", SOURCES, indirect=True)
def test_predict_round_trip(source, checkpoint, tmp_path):
    before = source.read_bytes()
    out = tmp_path / "seg.nii.gz"
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(source), "--output", str(out)]) == 0
    _assert_same_geometry(source, out)
    assert source.read_bytes() == before


def test_writer_refuses_to_overwrite_the_source_image(tmp_path):
    """A labels layer made from an image carries its source_path: saving the labels there is refused."""
    from napari_m3hl._napari._reader import read_nifti
    from napari_m3hl._napari._writer import write_labels
    from napari_m3hl.errors import M3HLInputError

    src = _qform_ne_sform(tmp_path / "scan.nii.gz")
    before = src.read_bytes()
    [(data, meta, kind)] = read_nifti(str(src))
    assert kind == "image"
    labels = np.zeros(data.shape, np.uint8)
    with pytest.raises(M3HLInputError, match="the image these labels were drawn on"):
        write_labels(str(src), labels, meta)
    assert src.read_bytes() == before
    # a label map read from a file may be saved back over itself
    [lab_out] = write_labels(str(tmp_path / "scan_labels.nii.gz"), labels, meta)
    [(lab, lab_meta, lab_kind)] = read_nifti(lab_out)
    assert lab_kind == "labels"
    write_labels(lab_out, lab, lab_meta)
