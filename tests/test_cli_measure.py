"""``m3hl measure`` typed as a user types it: volumes and EF from NIfTI
segmentations with a known voxel size, a 4D cine, and its refusals."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from napari_m3hl.cli.main import main

#: NIfTI (X, Y, Z) voxel size: 1.25 mm pixels, 8 mm slices -> 12.5 mm³ = 0.0125 mL.
ZOOMS = (1.25, 1.25, 8.0)


def _save(path, zyx: np.ndarray, zooms=ZOOMS) -> str:
    """Write a (Z, Y, X) or (T, Z, Y, X) label map as NIfTI (X, Y, Z[, T]) with ``zooms``."""
    data = np.ascontiguousarray(np.transpose(zyx, tuple(range(zyx.ndim - 1, -1, -1)))).astype(np.uint8)
    affine = np.diag([*zooms[:3], 1.0])
    img = nib.Nifti1Image(data, affine)
    img.header.set_zooms(tuple(zooms) + ((1.0,) if zyx.ndim == 4 and len(zooms) == 3 else ()))
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
    return str(path)


def _frame(lv: int, rv: int, myo: int) -> np.ndarray:
    lab = np.zeros((4, 30, 30), np.uint8)
    flat = lab.reshape(-1)
    flat[:lv] = 3
    flat[lv:lv + rv] = 1
    flat[lv + rv:lv + rv + myo] = 2
    return lab


def m3hl(line: str) -> int:
    """Run ``m3hl <line>`` in this process, split as a shell splits it."""
    return main(shlex.split(line))


def test_ed_es_files_print_and_write_ef(tmp_path, capsys):
    ed = _save(tmp_path / "ed.nii.gz", _frame(1000, 800, 400))
    es = _save(tmp_path / "es.nii.gz", _frame(400, 480, 420))
    out_json, out_csv = tmp_path / "m.json", tmp_path / "m.csv"
    assert m3hl(f"measure {ed} {es} --json {out_json} --csv {out_csv}") == 0
    text = capsys.readouterr().out
    assert "voxel 8 x 1.25 x 1.25 mm" in text
    assert "LV: EDV 12.5 mL, ESV 5.0 mL, SV 7.5 mL, EF 60.0 %" in text
    assert "RV: EDV 10.0 mL, ESV 6.0 mL, SV 4.0 mL, EF 40.0 %" in text
    assert "LV myocardial mass 5.2 g at ED (5.0 mL)" in text
    d = json.loads(out_json.read_text())
    assert d["lv"]["ef_pct"] == pytest.approx(60.0) and d["spacing_mm"] == [8.0, 1.25, 1.25]
    assert d["segmentation"] == [ed, es]
    assert "LV EF,60.000,%" in out_csv.read_text().splitlines()


def test_one_volume_and_a_4d_cine(tmp_path, capsys):
    one = _save(tmp_path / "one.nii.gz", _frame(300, 40, 100))
    assert m3hl(f"measure {one}") == 0
    text = capsys.readouterr().out
    assert "LV blood pool 3.8 mL, RV blood pool 0.5 mL" in text and "mass 1.3 g" in text
    lv = [600, 900, 500, 300, 700]
    cine = _save(tmp_path / "cine.nii.gz", np.stack([_frame(v, 200, 300) for v in lv]))
    assert m3hl(f"measure {cine} --json {tmp_path / 'c.json'}") == 0
    text = capsys.readouterr().out
    assert "ED = frame 1 (largest LV), ES = frame 3 (smallest LV) of 5 frames" in text
    d = json.loads((tmp_path / "c.json").read_text())
    assert [f["lv_ml"] for f in d["frames"]] == pytest.approx([v * 0.0125 for v in lv])
    assert d["lv"]["ef_pct"] == pytest.approx(100 * 600 / 900)
    assert m3hl(f"measure {cine} --ed 0 --es 2") == 0
    assert "EF 16.7 %" in capsys.readouterr().out


def test_refusals_name_the_culprit(tmp_path, capsys):
    seg = _save(tmp_path / "seg.nii.gz", _frame(300, 40, 100))
    before = (tmp_path / "seg.nii.gz").read_bytes()
    for line, words in [
        (f"measure {seg} --json {seg}", "--json"),
        (f"measure {seg} --csv {tmp_path / '.' / 'seg.nii.gz'}", "is the input segmentation"),
        (f"measure {seg} --json {tmp_path / 'a'} --csv {tmp_path / 'a'}", "are one file"),
        (f"measure {tmp_path / 'missing.nii.gz'}", "not found"),
        (f"measure {seg} --ed 1", "4D cine"),
    ]:
        assert m3hl(line) == 2, line
        err = capsys.readouterr().err
        assert err.startswith("m3hl measure: error:") and words in err, (line, err)
    assert (tmp_path / "seg.nii.gz").read_bytes() == before
    # a file without a real voxel size is refused, unless the user states it
    bare = _save(tmp_path / "bare.nii.gz", _frame(300, 40, 100), zooms=(1.0, 1.0, 1.0))
    assert m3hl(f"measure {bare}") == 2
    assert "saved without a voxel size" in capsys.readouterr().err
    assert m3hl(f"measure {bare} --spacing 10 1.5 1.5") == 0
    assert "LV blood pool 6.8 mL" in capsys.readouterr().out  # 300 x 22.5 mm³
    other = _save(tmp_path / "other.nii.gz", _frame(100, 40, 100), zooms=(1.5, 1.5, 10.0))
    assert m3hl(f"measure {seg} {other}") == 2
    assert "different voxel sizes" in capsys.readouterr().err


def test_python_dash_m_measure(tmp_path):
    seg = _save(tmp_path / "seg.nii.gz", _frame(300, 40, 100))
    r = subprocess.run([sys.executable, "-m", "napari_m3hl", "measure", seg], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "LV blood pool 3.8 mL" in r.stdout


def test_real_acdc_patient_ed_es(shared_data, tmp_path, capsys):
    """One ACDC validation patient's ground truth (ED = frame01, ES = frame02)
    written as NIfTI with a stated voxel size: ``m3hl measure`` gives the EF of
    the voxel counts and volumes of counts x voxel volume."""
    from napari_m3hl.io.h5 import load_h5_volume

    vols = shared_data / "acdc" / "volumes"
    if not (vols / "patient002_frame01.h5").is_file():
        pytest.skip(f"no ACDC validation volumes under {vols}")
    ed = load_h5_volume(vols / "patient002_frame01.h5")[1]
    es = load_h5_volume(vols / "patient002_frame02.h5")[1]
    zooms = (1.5, 1.5, 10.0)  # 22.5 mm³ per voxel
    a, b = _save(tmp_path / "ed.nii.gz", ed, zooms), _save(tmp_path / "es.nii.gz", es, zooms)
    assert m3hl(f"measure {a} {b} --json {tmp_path / 'm.json'}") == 0
    d = json.loads((tmp_path / "m.json").read_text())
    lv_ed, lv_es = int((ed == 3).sum()), int((es == 3).sum())
    assert d["lv"]["edv_ml"] == pytest.approx(lv_ed * 0.0225) and d["lv"]["esv_ml"] == pytest.approx(lv_es * 0.0225)
    assert d["lv"]["ef_pct"] == pytest.approx(100 * (lv_ed - lv_es) / lv_ed)
    assert 10 < d["lv"]["ef_pct"] < 90 and d["lv_myo_mass_ed_g"] == pytest.approx((ed == 2).sum() * 0.0225 * 1.05)
