"""napari plugin contributions: manifest, reader, writer, sample data.

The GUI-free parts run without a viewer; the viewer tests run under Xvfb
(pytest-xvfb starts it).
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "napari.yaml"


def _affine() -> np.ndarray:
    """An oblique, translated affine (as a scanner gives), exact in float32."""
    a = np.array([
        [0.0, -1.25, 0.5, -120.5],
        [1.5, 0.0, 0.25, 33.0],
        [0.0, 0.25, 8.0, -7.75],
        [0.0, 0.0, 0.0, 1.0],
    ])
    return a


def _write_nifti(path: Path, data_xyz: np.ndarray, dtype=None) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data_xyz.astype(dtype or data_xyz.dtype), _affine())
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = b"m3hl test"
    nib.save(img, str(path))
    return nib.load(str(path))


@pytest.fixture
def plugin():
    """The npe2 manifest, registered with npe2 when the package is not installed."""
    from npe2 import PluginManager, PluginManifest

    pm = PluginManager.instance()
    if "napari-m3hl" not in pm._manifests:  # not installed with its entry point
        pm.register(PluginManifest.from_file(MANIFEST))
    return pm.get_manifest("napari-m3hl")


# ------------------------------------------------------------------ manifest


def test_manifest_validates_and_imports():
    from npe2 import PluginManifest

    assert (ROOT / "napari_m3hl" / "napari.yaml").resolve() == MANIFEST.resolve()
    m = PluginManifest.from_file(MANIFEST)
    m.validate_imports()
    assert m.name == "napari-m3hl" and m.display_name == "M³HL"
    c = m.contributions
    assert c.readers[0].filename_patterns == ["*.nii", "*.nii.gz"]
    assert set(c.writers[0].filename_extensions) == {".nii", ".nii.gz"} and c.writers[0].layer_types == ["labels"]
    assert c.sample_data[0].display_name == "Synthetic cardiac MR phantom"
    assert c.widgets[0].display_name == "Train M³HL"


def test_widget_discoverable(plugin, make_napari_viewer):
    from napari_m3hl._napari._widget import M3HLWidget

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-m3hl", "Train M³HL")
    assert isinstance(widget, M3HLWidget)
    viewer.add_image(np.zeros((3, 8, 8), np.float32), name="vol")
    assert widget.data_panel.image_combo.currentText() == "vol"
    assert widget.model_panel.preset_combo.count() >= 1


# ------------------------------------------------------------------ reader


def test_reader_image_3d(tmp_path):
    from napari_m3hl._napari._reader import get_reader

    rng = np.random.default_rng(0)
    xyz = rng.normal(300, 50, (40, 32, 6)).astype(np.float32)  # (X, Y, Z)
    path = tmp_path / "patient001_frame01.nii.gz"
    ref = _write_nifti(path, xyz)
    assert get_reader(str(path)) is not None
    assert get_reader(str(tmp_path / "x.png")) is None
    [(data, meta, kind)] = get_reader(str(path))(str(path))
    assert kind == "image"
    assert data.shape == (6, 32, 40)  # (Z, Y, X)
    np.testing.assert_allclose(data, np.transpose(xyz, (2, 1, 0)), rtol=1e-6)
    zooms = ref.header.get_zooms()
    assert meta["scale"] == pytest.approx((zooms[2], zooms[1], zooms[0]))
    np.testing.assert_array_equal(meta["metadata"]["affine"], ref.affine)
    assert meta["metadata"]["header"]["descrip"] == ref.header["descrip"]
    assert meta["metadata"]["source_path"] == str(path)


def test_reader_4d_and_label_detection(tmp_path):
    from napari_m3hl._napari._reader import read_nifti

    xyzt = np.random.default_rng(1).normal(0, 1, (20, 16, 4, 3)).astype(np.float32)
    p4 = tmp_path / "cine.nii"
    _write_nifti(p4, xyzt)
    [(data, meta, kind)] = read_nifti(str(p4))
    assert kind == "image" and data.shape == (3, 4, 16, 20) and len(meta["scale"]) == 4

    lab = np.zeros((20, 16, 4), np.uint8)
    lab[5:10, 5:10, 1] = 3
    lab[2:4, 2:4, 2] = 1
    # integer dtype with few values -> labels, whatever the name
    p_int = tmp_path / "drawing.nii.gz"
    _write_nifti(p_int, lab)
    # float file named *_gt -> labels (ACDC ground truth names)
    p_gt = tmp_path / "patient001_frame01_gt.nii.gz"
    _write_nifti(p_gt, lab, np.float32)
    for p in (p_int, p_gt):
        [(ldata, lmeta, lkind)] = read_nifti(str(p))
        assert lkind == "labels" and ldata.dtype == np.uint8 and ldata.shape == (4, 16, 20)
        assert ldata[1, 5:10, 5:10].min() == 3
        assert list(lmeta["features"]["class"]) == ["background", "RV", "Myo", "LV"]
    # integer dtype with many values (an int16 MR image) stays an image
    p_mr = tmp_path / "scan.nii.gz"
    _write_nifti(p_mr, (np.random.default_rng(2).random((20, 16, 4)) * 1000).astype(np.int16))
    assert read_nifti(str(p_mr))[0][2] == "image"


def test_reader_bad_file_gives_clear_error(tmp_path):
    from napari_m3hl._napari._reader import read_nifti
    from napari_m3hl.errors import M3HLInputError

    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(M3HLInputError, match="broken.nii.gz"):
        read_nifti(str(bad))


# ------------------------------------------------------------------ writer


def test_labels_round_trip_keeps_voxels_and_affine(tmp_path):
    """NIfTI labels -> reader -> Labels layer data -> writer: identical voxels, affine, header units."""
    from napari_m3hl._napari._reader import read_nifti
    from napari_m3hl._napari._writer import write_labels

    lab = np.zeros((24, 20, 5), np.uint8)
    lab[3:9, 4:12, 0] = 1
    lab[10:20, 2:6, 2] = 2
    lab[1:3, 1:3, 4] = 3
    src = tmp_path / "case_seg.nii.gz"
    ref = _write_nifti(src, lab)
    [(data, meta, kind)] = read_nifti(str(src))
    assert kind == "labels"
    meta = {**meta, "translate": (0.0, 0.0, 0.0)}
    [out] = write_labels(str(tmp_path / "out.nii.gz"), data, meta)
    back = nib.load(out)
    np.testing.assert_array_equal(np.asarray(back.dataobj), lab)
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(back.affine, ref.affine)
    np.testing.assert_array_equal(back.header.get_sform(), ref.header.get_sform())
    assert back.header.get_xyzt_units() == ("mm", "sec")
    assert int(back.header["sform_code"]) == int(ref.header["sform_code"])


def test_image_geometry_flows_to_written_labels(tmp_path):
    """Labels painted on an image read from NIfTI export with the image's affine (4D too)."""
    from napari_m3hl._napari._reader import read_nifti
    from napari_m3hl._napari._writer import write_labels

    xyzt = np.random.default_rng(3).normal(0, 1, (16, 12, 3, 2)).astype(np.float32)
    src = tmp_path / "cine.nii.gz"
    ref = _write_nifti(src, xyzt)
    [(img, meta, _)] = read_nifti(str(src))
    labels = np.zeros(img.shape, np.uint8)
    labels[1, 2, 3:6, 4:9] = 2
    [out] = write_labels(str(tmp_path / "painted"), labels, meta)
    assert out.endswith(".nii.gz")
    back = nib.load(out)
    assert back.shape == (16, 12, 3, 2)
    np.testing.assert_array_equal(np.transpose(np.asarray(back.dataobj), (3, 2, 1, 0)), labels)
    np.testing.assert_array_equal(back.affine, ref.affine)


def test_writer_without_geometry_warns_and_uses_scale(tmp_path, monkeypatch):
    from napari.utils import notifications

    from napari_m3hl._napari._writer import write_labels

    warnings: list[str] = []
    monkeypatch.setattr(notifications, "show_warning", warnings.append)
    labels = np.zeros((4, 8, 10), np.uint8)
    labels[2, 3, 4] = 1
    [out] = write_labels(str(tmp_path / "x.nii"), labels,
                         {"name": "painted", "scale": (8.0, 1.25, 1.5), "translate": (10.0, 20.0, 30.0),
                          "metadata": {}})
    assert warnings and "diagonal affine" in warnings[0]
    back = nib.load(out)
    np.testing.assert_allclose(back.affine, [[1.5, 0, 0, 30], [0, 1.25, 0, 20], [0, 0, 8, 10], [0, 0, 0, 1]])
    assert np.asarray(back.dataobj)[4, 3, 2] == 1


def test_napari_open_and_save_through_plugin(plugin, make_napari_viewer, tmp_path):
    src = tmp_path / "heart_label.nii.gz"
    lab = np.zeros((12, 10, 3), np.uint8)
    lab[2:5, 2:5, 1] = 2
    ref = _write_nifti(src, lab)
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(src), plugin="napari-m3hl")
    assert layer._type_string == "labels" and layer.data.shape == (3, 10, 12)
    out = tmp_path / "saved.nii.gz"
    written = viewer.layers.save(str(out), selected=False, plugin="napari-m3hl")
    assert Path(written[0]) == out
    back = nib.load(str(out))
    np.testing.assert_array_equal(np.asarray(back.dataobj), lab)
    np.testing.assert_array_equal(back.affine, ref.affine)


# ------------------------------------------------------------------ sample


def test_sample_data_ready_to_train():
    from napari_m3hl._napari.layers.control import labeled_slices
    from napari_m3hl._napari._sample import SAMPLE_SLICES, make_phantom_sample

    layers = make_phantom_sample()
    by_name = {meta["name"]: (data, meta, kind) for data, meta, kind in layers}
    img, imeta, ikind = by_name["phantom image"]
    assert ikind == "image" and img.shape == (10, 216, 256) and img.dtype == np.float32
    assert imeta["scale"] == (10.0, 1.5, 1.5)
    lab, lmeta, lkind = by_name["phantom labels"]
    assert lkind == "labels" and lab.shape == img.shape
    assert tuple(labeled_slices(lab)) == SAMPLE_SLICES
    gt_name = "phantom ground truth (reference only)"
    gt, gmeta, _ = by_name[gt_name]
    assert gmeta["visible"] is False and len(labeled_slices(gt)) > len(SAMPLE_SLICES)
    np.testing.assert_array_equal(lab[list(SAMPLE_SLICES)], gt[list(SAMPLE_SLICES)])
    # painted labels come last, so the widget picks them over the hidden truth
    assert layers[-1][1]["name"] == "phantom labels"


def test_sample_opens_in_viewer(plugin, make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-m3hl", "cardiac_phantom")
    assert {"phantom image", "phantom labels"} <= {lay.name for lay in viewer.layers}
    assert tuple(viewer.layers["phantom labels"].scale) == (10.0, 1.5, 1.5)
