"""Clinical measures (napari_m3hl.metrics.clinical) against hand-computed
volumes of synthetic label maps with a known voxel size."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from napari_m3hl.errors import M3HLInputError
from napari_m3hl.metrics.clinical import (MYOCARDIUM_DENSITY, check_voxel_size, frame_volumes, function, measure,
                                          spatial_unit_factor)

#: (D, H, W) mm: 8 mm slices, 1.25 mm pixels -> 12.5 mm³ = 0.0125 mL per voxel.
SPACING = (8.0, 1.25, 1.25)


def _frame(lv: int, rv: int, myo: int, shape=(4, 30, 30)) -> np.ndarray:
    """A label map with exactly ``lv`` / ``rv`` / ``myo`` voxels of labels 3 / 1 / 2."""
    lab = np.zeros(shape, np.uint8)
    flat = lab.reshape(-1)
    flat[:lv] = 3
    flat[lv:lv + rv] = 1
    flat[lv + rv:lv + rv + myo] = 2
    return lab


def test_volumes_of_one_frame_by_hand():
    lab = np.zeros((4, 20, 20), np.uint8)
    lab[1:4, 5:15, 5:15] = 3  # 3 slices x 10 x 10 = 300 voxels
    lab[1:3, 0:4, 0:5] = 1  # 2 x 4 x 5 = 40
    lab[0, 0:10, 10:20] = 2  # 1 x 10 x 10 = 100
    f = frame_volumes(lab, SPACING)
    assert f.lv_ml == pytest.approx(300 * 0.0125)  # 3.75 mL
    assert f.rv_ml == pytest.approx(40 * 0.0125)  # 0.5 mL
    assert f.myo_ml == pytest.approx(1.25)
    assert f.myo_g == pytest.approx(1.25 * 1.05) and MYOCARDIUM_DENSITY == 1.05
    m = measure(lab, SPACING)
    assert len(m.frames) == 1 and m.lv is None and m.ed is None
    assert any("3.8 mL" in line or "3.7 mL" in line for line in m.summary_lines())


def test_through_plane_size_scales_volumes():
    lab = _frame(100, 0, 0)
    a = frame_volumes(lab, (5.0, 1.0, 1.0)).lv_ml
    b = frame_volumes(lab, (10.0, 1.0, 1.0)).lv_ml
    assert a == pytest.approx(0.5) and b == pytest.approx(1.0)


def test_ed_es_pair_function_by_hand():
    ed, es = _frame(1000, 800, 400), _frame(400, 480, 420)
    m = measure(ed, SPACING, es_labels=es)
    assert (m.ed, m.es) == (0, 1)
    assert m.lv.edv_ml == pytest.approx(12.5) and m.lv.esv_ml == pytest.approx(5.0)
    assert m.lv.sv_ml == pytest.approx(7.5) and m.lv.ef_pct == pytest.approx(60.0)
    assert m.rv.edv_ml == pytest.approx(10.0) and m.rv.esv_ml == pytest.approx(6.0)
    assert m.rv.ef_pct == pytest.approx(40.0)
    d = json.loads(json.dumps(m.to_dict()))
    assert d["lv"]["ef_pct"] == pytest.approx(60.0) and d["lv_myo_mass_ed_g"] == pytest.approx(400 * 0.0125 * 1.05)
    rows = m.to_csv().splitlines()
    assert rows[0] == "frame,lv_ml,rv_ml,myo_ml,myo_g,phase" and rows[1].endswith(",ED") and rows[2].endswith(",ES")
    assert "LV EF,60.000,%" in rows and not m.notes


def test_cine_picks_ed_and_es_by_lv_volume():
    lv = [600, 900, 500, 300, 0, 700]  # frame 4: no LV segmented (not an ES candidate)
    cine = np.stack([_frame(v, 200 + 10 * t, 300) for t, v in enumerate(lv)])
    m = measure(cine, SPACING)
    assert (m.ed, m.es) == (1, 3)
    assert [f.lv_ml for f in m.frames] == pytest.approx([v * 0.0125 for v in lv])
    assert m.lv.ef_pct == pytest.approx(100 * (900 - 300) / 900)
    assert m.rv.edv_ml == pytest.approx(210 * 0.0125) and m.rv.esv_ml == pytest.approx(230 * 0.0125)
    assert any("swapped" in n for n in m.notes)  # the RV grows from the picked ED to ES here
    named = measure(cine, SPACING, ed=0, es=2)
    assert named.lv.ef_pct == pytest.approx(100 * (600 - 500) / 600)
    with pytest.raises(M3HLInputError, match="out of range"):
        measure(cine, SPACING, es=6)


def test_function_with_empty_ventricle_is_nan():
    assert math.isnan(function(0.0, 0.0).ef_pct)
    m = measure(_frame(100, 0, 0), SPACING, es_labels=_frame(50, 0, 0))
    assert math.isnan(m.rv.ef_pct) and any("no RV" in n for n in m.notes)


@pytest.mark.parametrize("spacing, words", [
    (None, "no voxel size"),
    ((0.0, 1.0, 1.0), "no usable voxel size"),
    ((float("nan"), 1.0, 1.0), "no usable voxel size"),
    ((1.0, 1.0, 1.0), "saved without a voxel size"),
    ((8.0, 25.0, 1.0), "in-plane pixel size 25"),
    ((80.0, 1.0, 1.0), "slice spacing 80"),
    ((8.0, 1.0), "3 sizes"),
])
def test_missing_or_implausible_voxel_size_is_refused(spacing, words):
    with pytest.raises(M3HLInputError, match=words):
        check_voxel_size(spacing, "seg.nii.gz")
    with pytest.raises(M3HLInputError):
        measure(_frame(10, 10, 10), spacing)


def test_labels_outside_acdc_are_refused():
    with pytest.raises(M3HLInputError, match="ACDC labels"):
        measure(np.full((2, 4, 4), 5, np.uint8), SPACING)
    with pytest.raises(M3HLInputError, match="non-integer"):
        measure(np.full((2, 4, 4), 0.5, np.float32), SPACING)
    with pytest.raises(M3HLInputError, match="3D"):
        measure(np.zeros((4, 4), np.uint8), SPACING)
    with pytest.raises(M3HLInputError, match="no frame holds any LV"):
        measure(np.zeros((3, 2, 4, 4), np.uint8), SPACING)


def test_spatial_unit_factor():
    import nibabel as nib

    h = nib.Nifti1Header()
    h.set_xyzt_units("meter")
    assert spatial_unit_factor(h) == 1000.0
    h.set_xyzt_units("mm")
    assert spatial_unit_factor(h) == 1.0
    assert spatial_unit_factor(None) == 1.0
