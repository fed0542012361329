"""Tests for the synthetic cardiac phantom."""
from __future__ import annotations

import numpy as np
import pytest

from napari_m3hl.errors import M3HLInputError
from napari_m3hl.io.nifti import load_nifti
from napari_m3hl.data.phantom import make_phantom, make_phantom_cohort, save_phantom_nifti


@pytest.fixture(scope="module")
def ph0():
    return make_phantom(seed=0)


def test_shapes_types_range(ph0):
    assert ph0.image.shape == (10, 216, 256) and ph0.image.dtype == np.float32
    assert ph0.label.shape == ph0.image.shape and ph0.label.dtype == np.uint8
    assert ph0.spacing == (10.0, 1.5, 1.5)
    assert ph0.image.min() >= 0.0 and ph0.image.max() <= 1.0
    assert ph0.image.max() - ph0.image.min() > 0.9
    assert set(np.unique(ph0.label)) == {0, 1, 2, 3}


def test_deterministic_per_seed(ph0):
    again = make_phantom(seed=0)
    assert np.array_equal(again.image, ph0.image)
    assert np.array_equal(again.label, ph0.label)


def test_varies_across_seeds(ph0):
    other = make_phantom(seed=1)
    assert not np.array_equal(other.label, ph0.label)
    # heart position / size differ, not just the noise
    c0 = np.argwhere(ph0.label[4] == 3).mean(0)
    c1 = np.argwhere(other.label[4] == 3).mean(0)
    areas = [int((make_phantom(seed=s).label[4] == 3).sum()) for s in range(2, 6)]
    assert np.abs(c0 - c1).max() > 2.0
    assert len(set(areas)) == len(areas) and max(areas) > 1.2 * min(areas)
    assert abs(float(other.image.mean()) - float(ph0.image.mean())) > 1e-3


@pytest.mark.parametrize("seed", [0, 7, 42])
def test_anatomy_base_to_apex(seed):
    ph = make_phantom(seed=seed)
    d = ph.label.shape[0]
    for z in range(d // 2 - 2, d // 2 + 1):  # mid-ventricular slices hold every class
        assert set(np.unique(ph.label[z])) == {0, 1, 2, 3}, z
    assert not np.any(ph.label[-1] == 1), "RV must be absent at the apex"
    lv = [(ph.label[z] == 3).sum() for z in range(d)]
    assert lv[0] > lv[d // 2] > lv[-1] > 0  # LV shrinks toward the apex
    rv = [(ph.label[z] == 1).sum() for z in range(d)]
    assert rv[1] > rv[d // 2 + 1]


def test_intensity_contrast(ph0):
    img, lab = ph0.image, ph0.label
    lv, myo, rv = (float(img[lab == c].mean()) for c in (3, 2, 1))
    assert lv > myo + 0.25 and rv > myo + 0.25  # bright blood, dark myocardium
    # a single threshold cannot separate LV from background: bright non-LV tissue exists
    bright_bg = np.sum((lab == 0) & (img > np.percentile(img[lab == 3], 25)))
    assert bright_bg > (lab == 3).sum() * 0.2


def test_small_grid_and_cohort():
    ph = make_phantom(seed=3, shape=(4, 64, 64))
    assert ph.image.shape == (4, 64, 64)
    assert set(np.unique(ph.label[1])) == {0, 1, 2, 3}
    cohort = make_phantom_cohort(3, seed=5, shape=(4, 64, 64))
    assert len(cohort) == 3 and len({c.seed for c in cohort}) == 3
    again = make_phantom_cohort(3, seed=5, shape=(4, 64, 64))
    assert all(np.array_equal(a.image, b.image) for a, b in zip(cohort, again))
    with pytest.raises(M3HLInputError):
        make_phantom(shape=(4, 8, 8))


def test_save_phantom_nifti(tmp_path):
    img_p, lab_p = tmp_path / "ph.nii.gz", tmp_path / "ph_labels.nii.gz"
    ph = save_phantom_nifti(img_p, seed=2, labels_path=lab_p, shape=(4, 64, 80))
    vol, lab = load_nifti(img_p), load_nifti(lab_p)
    assert np.array_equal(vol.data, ph.image)
    assert np.array_equal(lab.data, ph.label)
    assert vol.spacing == pytest.approx(ph.spacing)
    assert np.array_equal(vol.affine, lab.affine)
