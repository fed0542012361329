"""Tests for napari_m3hl.data (phantom, partly-labeled volumes, ACDC/LA sources)."""
from __future__ import annotations

import numpy as np
import pytest

from napari_m3hl.labels import ACDC_CLASSES
from napari_m3hl.data.acdc import ACDCSlices, acdc_split, acdc_val_volumes, patient_slice_counts, slices_for_patients
from napari_m3hl.data.la import LACases, la_split
from napari_m3hl.data.volumes import PartlyLabeledVolume
from napari_m3hl.data.types import TrainData
from napari_m3hl.data import load_train_data
from napari_m3hl.data.phantom_source import phantom_train_data, phantom_val_volumes
from napari_m3hl.errors import M3HLInputError
from napari_m3hl.io.nifti import affine_from_spacing, save_nifti_image, save_nifti_labels
from napari_m3hl.data.phantom import make_phantom

SMALL = (6, 64, 64)


def _volume(seed=0, shape=SMALL):
    ph = make_phantom(seed=seed, shape=shape)
    return ph.image, ph.label


# ---------------------------------------------------------------- phantom


def test_phantom_train_data_counts():
    td = phantom_train_data(n_volumes=3, labeled_slices_per_volume=2, seed=0, shape=SMALL)
    assert isinstance(td, TrainData)
    assert (td.ndim, td.num_classes, td.class_names) == (2, 4, ACDC_CLASSES)
    assert len(td.labeled) == 3 * 2 and len(td.unlabeled) == 3 * (6 - 2)
    for i in range(len(td.labeled)):
        img, lab = td.labeled[i]
        assert img.shape == (64, 64) and img.dtype == np.float32
        assert lab.shape == (64, 64) and lab.dtype == np.uint8 and lab.any()
    img, lab = td.unlabeled[0]
    assert img.shape == (64, 64) and lab is None
    val = phantom_val_volumes(2, seed=99, shape=SMALL)
    assert len(val) == 2 and val[0][1].shape == SMALL and val[0][2].shape == SMALL
    assert val[0][0] != val[1][0]


# ---------------------------------------------------------------- partly labeled


def test_partly_labeled_indices_and_sets():
    image, full = _volume()
    label = np.zeros_like(full)
    label[[1, 4]] = full[[1, 4]]
    plv = PartlyLabeledVolume(image, label, num_classes=4)
    assert plv.labeled_slices().tolist() == [1, 4]
    lab_set, unl_set = plv.labeled_set(), plv.unlabeled_set()
    assert len(lab_set) == 2 and len(unl_set) == 4
    img, lab = lab_set[1]
    assert np.array_equal(img, image[4]) and np.array_equal(lab, full[4])
    assert [unl_set[i][1] for i in range(4)] == [None] * 4
    assert plv.unlabeled_index == [(0, 0), (0, 2), (0, 3), (0, 5)]
    td = plv.train_data()
    assert len(td.labeled) == 2 and td.class_names == ACDC_CLASSES


def test_partly_labeled_from_volumes_and_normalize():
    im0, l0 = _volume(0)
    im1, l1 = _volume(1)
    extra, _ = _volume(2, shape=(3, 48, 56))
    l0 = l0.copy()
    l0[:5] = 0  # only the last slice of volume 0 is labeled
    plv = PartlyLabeledVolume.from_volumes([im0 * 400 + 20, im1], [l0, None], extra_unlabeled=[extra],
                                           normalize=True)
    assert plv.labeled_index == [(0, 5)]
    assert len(plv.unlabeled_set()) == 5 + 6 + 3
    img, lab = plv.labeled_set()[0]
    assert 0.0 <= img.min() and img.max() <= 1.0 and lab.dtype == np.uint8
    assert plv.unlabeled_set()[-1][0].shape == (48, 56)
    # float labels from NIfTI are accepted when integer-valued
    plv2 = PartlyLabeledVolume(im0, l0.astype(np.float32))
    assert plv2.labeled_slices().tolist() == [5]


def test_partly_labeled_errors():
    image, label = _volume()
    with pytest.raises(M3HLInputError, match="no labeled slice"):
        PartlyLabeledVolume(image, np.zeros_like(label))
    with pytest.raises(M3HLInputError, match=r"\(6, 64, 60\).*\(6, 64, 64\)"):
        PartlyLabeledVolume(image, label[:, :, :60])
    with pytest.raises(M3HLInputError, match="value 3.*3 classes"):
        PartlyLabeledVolume(image, label, num_classes=3)
    bad = image.copy()
    bad[2, 3, 4] = np.nan
    with pytest.raises(M3HLInputError, match="NaN"):
        PartlyLabeledVolume(bad, label)
    with pytest.raises(M3HLInputError, match="constant"):
        PartlyLabeledVolume(np.ones_like(image), label)
    with pytest.raises(M3HLInputError, match="3D"):
        PartlyLabeledVolume(image[0], label[0])
    with pytest.raises(M3HLInputError, match="negative"):
        PartlyLabeledVolume(image, label.astype(np.int16) - 1)
    with pytest.raises(M3HLInputError, match="no labeled slice"):
        PartlyLabeledVolume.from_volumes([image], None)
    with pytest.raises(M3HLInputError, match="2 images but 1"):
        PartlyLabeledVolume.from_volumes([image, image], [label])


def test_train_data_validation():
    with pytest.raises(M3HLInputError, match="no labeled slice"):
        TrainData([], [], ndim=2, num_classes=4)
    with pytest.raises(M3HLInputError, match="class names"):
        TrainData([(0, 0)], [], ndim=2, num_classes=2, class_names=("a", "b", "c"))
    assert TrainData([(0, 0)], [], ndim=2, num_classes=2).class_names == ("background", "foreground")


def test_slices_for_patients():
    names = ["p1_a_1", "p1_a_2", "p2_a_1", "p3_b_1", "p3_b_2", "p3_b_3"]
    assert slices_for_patients(names, 1) == 2
    assert slices_for_patients(names, 2) == 3
    assert slices_for_patients(names, 3) == 6
    assert list(patient_slice_counts(names).values()) == [2, 1, 3]
    with pytest.raises(M3HLInputError):
        slices_for_patients(names, 4)


# ---------------------------------------------------------------- dispatcher


def test_load_train_data_nifti_pair(tmp_path):
    image, full = _volume(3)
    label = np.zeros_like(full)
    label[2] = full[2]
    affine = affine_from_spacing((10.0, 1.5, 1.5))
    save_nifti_image(image * 1000, tmp_path / "img.nii.gz", affine)
    save_nifti_labels(label, tmp_path / "lab.nii.gz", affine)
    td = load_train_data(str(tmp_path / "img.nii.gz"), tmp_path / "lab.nii.gz")
    assert (len(td.labeled), len(td.unlabeled), td.num_classes) == (1, 5, 4)
    img, lab = td.labeled[0]
    assert np.array_equal(lab, full[2]) and img.max() <= 1.0

    save_nifti_labels(label[:, :, :50], tmp_path / "bad.nii.gz", affine)
    with pytest.raises(M3HLInputError, match="shape"):
        load_train_data(tmp_path / "img.nii.gz", tmp_path / "bad.nii.gz")
    save_nifti_labels(label, tmp_path / "moved.nii.gz", affine_from_spacing((10.0, 1.5, 1.5), (5.0, 0, 0)))
    with pytest.raises(M3HLInputError, match="affine"):
        load_train_data(tmp_path / "img.nii.gz", tmp_path / "moved.nii.gz")
    with pytest.raises(M3HLInputError, match="labels"):
        load_train_data(tmp_path / "img.nii.gz")
    with pytest.raises(M3HLInputError, match="not found"):
        load_train_data(tmp_path / "nothing.nii.gz", tmp_path / "lab.nii.gz")
    with pytest.raises(M3HLInputError, match="not found"):
        load_train_data(tmp_path / "nothing")
    with pytest.raises(M3HLInputError, match="neither an ACDC root"):
        load_train_data(tmp_path)


def test_load_train_data_phantom():
    td = load_train_data("phantom", n_volumes=2, labeled_slices_per_volume=1, phantom_shape=SMALL)
    assert (len(td.labeled), len(td.unlabeled)) == (2, 10)


# ---------------------------------------------------------------- real data


@pytest.fixture()
def acdc(shared_data):
    root = shared_data / "acdc"
    if not (root / "train_slices.list").is_file():
        pytest.skip(f"ACDC data not found under '{root}'")
    return root


@pytest.fixture()
def la(shared_data):
    root = shared_data / "la"
    if not (root / "train.list").is_file():
        pytest.skip(f"LA data not found under '{root}'")
    return root


def test_acdc_split_136_for_7_patients(acdc):
    labeled, unlabeled = acdc_split(acdc, labeled_patients=7)
    assert len(labeled) == 136 and len(labeled) + len(unlabeled) == 1312
    assert len({n.split("_")[0] for n in labeled}) == 7
    assert not {n.split("_")[0] for n in labeled} & {n.split("_")[0] for n in unlabeled}
    assert len(acdc_split(acdc, labeled_count=50)[0]) == 50
    ds = ACDCSlices(acdc, labeled[:3], labeled=True)
    img, lab = ds[0]
    assert img.ndim == 2 and img.dtype == np.float32 and 0 <= img.min() and img.max() <= 1
    assert lab.shape == img.shape and lab.dtype == np.uint8 and lab.max() <= 3
    assert ds[0][0] is img  # cached
    assert ACDCSlices(acdc, unlabeled[:2], labeled=False)[1][1] is None
    with pytest.raises(M3HLInputError, match="missing"):
        ACDCSlices(acdc, ["patient000_frame01_slice_1"], labeled=True)


def test_acdc_val_volumes(acdc):
    vols = acdc_val_volumes(acdc)
    assert len(vols) == 20
    name, img, lab = vols[0]
    assert name == "patient028_frame01" and img.shape == (10, 256, 224)
    for _, img, lab in vols:
        assert img.ndim == 3 and img.shape == lab.shape and img.dtype == np.float32
        assert set(np.unique(lab)) <= {0, 1, 2, 3}


def test_acdc_load_train_data(acdc):
    td = load_train_data(acdc)
    assert (len(td.labeled), len(td.unlabeled), td.ndim, td.num_classes) == (136, 1176, 2, 4)


def test_la_cases(la):
    labeled, unlabeled = la_split(la, labeled=8)
    assert len(labeled) == 8 and len(unlabeled) == 8
    ds = LACases(la, labeled[:1], labeled=True)
    img, lab = ds[0]
    assert img.ndim == 3 and img.shape == lab.shape and set(np.unique(lab)) <= {0, 1}
    assert img.shape[0] > img.shape[2]  # stored (X, Y, Z): Z (~88) is the shortest axis
    td = load_train_data(la)
    assert (td.ndim, td.num_classes, len(td.labeled), len(td.unlabeled)) == (3, 2, 8, 8)
