import numpy as np
import pytest
import torch

from napari_m3hl.io.checkpoint import make_payload, save_checkpoint
from napari_m3hl.config import TrainConfig
from napari_m3hl.errors import M3HLInputError
from napari_m3hl.io.nifti import affine_from_spacing
from napari_m3hl.method.networks import UNet2D
from napari_m3hl.io.session import load_session, save_session


def test_session_roundtrip(tmp_path):
    labels = np.zeros((5, 12, 10), np.uint8)
    labels[1, 2:5, 3:6] = 3
    labels[3, 4:8, 1:4] = 1
    affine = affine_from_spacing((8.0, 1.25, 1.25))
    ckpt = save_checkpoint(tmp_path / "last.pt", make_payload(TrainConfig(), UNet2D(), iteration=7))
    folder = save_session(tmp_path / "s", labels, affine, checkpoint=ckpt,
                          settings={"iterations": 300, "block_size": [64, 64]}, meta={"image": "scan.nii.gz"})
    s = load_session(folder)
    np.testing.assert_array_equal(s.labels, labels)
    np.testing.assert_allclose(s.affine, affine)
    assert s.settings == {"iterations": 300, "block_size": [64, 64]}
    assert s.meta["image"] == "scan.nii.gz" and s.meta["labeled_slices"] == [1, 3]
    assert torch.load(s.checkpoint, weights_only=True)["iteration"] == 7
    # saving again without a checkpoint keeps the earlier one
    save_session(folder, labels, affine)
    assert load_session(folder).checkpoint is not None


def test_session_errors(tmp_path):
    with pytest.raises(M3HLInputError, match="not an M³HL session"):
        load_session(tmp_path)
    with pytest.raises(M3HLInputError, match="does not exist"):
        save_session(tmp_path / "s", np.zeros((2, 4, 4), np.uint8), np.eye(4), checkpoint=tmp_path / "none.pt")


def test_checkpoint_copy_merges_facts(tmp_path):
    from napari_m3hl.io.session import load_session, save_checkpoint_copy, save_session

    labels = np.zeros((3, 8, 8), np.uint8)
    labels[1, 2:4, 2:4] = 2
    save_session(tmp_path / "s", labels, np.eye(4), meta={"image_name": "img", "iteration": 0})
    ck = tmp_path / "last.pt"
    ck.write_bytes(b"weights")
    save_checkpoint_copy(tmp_path / "s", ck, {"iteration": 40})
    s = load_session(tmp_path / "s")
    assert s.checkpoint.read_bytes() == b"weights"
    assert s.meta["iteration"] == 40 and s.meta["image_name"] == "img" and s.meta["labeled_slices"] == [1]
    with pytest.raises(Exception, match="does not exist"):
        save_checkpoint_copy(tmp_path / "s", tmp_path / "missing.pt")
