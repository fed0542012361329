"""A session folder's "more volumes" (other images trained on beside the main
one): written, read back and checked by napari_m3hl.io.session."""
import gzip
import json

import numpy as np
import pytest

from napari_m3hl.errors import M3HLInputError
from napari_m3hl.io.nifti import affine_from_spacing
from napari_m3hl.io.session import SessionVolume, load_session, save_session


def _labels(shape, seed: int, slices) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.zeros(shape, np.uint8)
    for z in slices:
        out[z] = rng.integers(0, 4, size=shape[1:], dtype=np.uint8)
    return out


def _main():
    return _labels((4, 10, 8), 0, [1]), affine_from_spacing((8.0, 1.5, 1.5))


def _three_volumes(tmp_path):
    """Two labeled more volumes (different shapes and geometry) and one unlabeled."""
    a = SessionVolume("ED image", (5, 12, 10), str(tmp_path / "ed.nii.gz"), "ED labels", _labels((5, 12, 10), 1, [0, 3]),
                      affine_from_spacing((10.0, 1.25, 1.25), origin=(3.0, -2.0, 5.0)))
    b = SessionVolume("ES image", (2, 3, 6, 6), None, "ES labels", _labels((2, 3, 6, 6), 2, [1]),
                      affine_from_spacing((6.0, 2.0, 2.0)))
    c = SessionVolume("other patient", (7, 9, 9), str(tmp_path / "p2.nii.gz"))
    return [a, b, c]


def test_more_volumes_round_trip(tmp_path):
    labels, affine = _main()
    extras = _three_volumes(tmp_path)
    folder = save_session(tmp_path / "s", labels, affine, meta={"image_name": "main"}, extras=extras)
    assert sorted(p.name for p in (folder / "more").iterdir()) == ["01_labels.nii.gz", "02_labels.nii.gz"]
    s = load_session(folder)
    np.testing.assert_array_equal(s.labels, labels)
    assert [v.image_name for v in s.extras] == ["ED image", "ES image", "other patient"]
    for got, want in zip(s.extras, extras):
        assert got.image_shape == want.image_shape and got.image_source == want.image_source
        assert got.labels_name == want.labels_name
        if want.labels is None:
            assert got.labels is None and got.labels_file is None and got.affine is None
        else:
            assert got.labels.dtype == np.uint8 and got.labels_file.parent == folder / "more"
            np.testing.assert_array_equal(got.labels, want.labels)
            np.testing.assert_allclose(got.affine, want.affine)  # each volume keeps its own geometry
    meta = json.loads((folder / "session.json").read_text())
    assert [e["labels_file"] for e in meta["extra_volumes"]] == ["more/01_labels.nii.gz", "more/02_labels.nii.gz", None]
    assert meta["extra_volumes"][0]["labeled_slices"] == [0, 3]

    # saved again with fewer volumes: the dropped volume's labels file goes, a reopen lists only what was saved
    save_session(folder, labels, affine, extras=[extras[2], extras[1]])
    assert sorted(p.name for p in (folder / "more").iterdir()) == ["02_labels.nii.gz"]
    s = load_session(folder)
    assert [(v.image_name, v.labels is not None) for v in s.extras] == [("other patient", False), ("ES image", True)]
    np.testing.assert_array_equal(s.extras[1].labels, extras[1].labels)
    # and with none: no more/ folder is left behind
    save_session(folder, labels, affine)
    assert not (folder / "more").exists() and load_session(folder).extras == []


def test_damaged_more_volume_labels_are_refused_by_name(tmp_path):
    labels, affine = _main()
    folder = save_session(tmp_path / "s", labels, affine, extras=_three_volumes(tmp_path))
    path = folder / "more" / "02_labels.nii.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[: len(data) // 2]))  # truncated
    with pytest.raises(M3HLInputError, match="02_labels.nii.gz"):
        load_session(folder)
    path.unlink()
    with pytest.raises(M3HLInputError, match=r"02_labels.nii.gz is missing.*'ES image'"):
        load_session(folder)
    # a labels file of another volume's shape in its place
    path.write_bytes((folder / "more" / "01_labels.nii.gz").read_bytes())
    with pytest.raises(M3HLInputError, match=r"02_labels.nii.gz: labels of shape \(5, 12, 10\) do not match"):
        load_session(folder)
    # an entry pointing outside the folder
    meta = json.loads((folder / "session.json").read_text())
    meta["extra_volumes"][0]["labels_file"] = "../../elsewhere.nii.gz"
    (folder / "session.json").write_text(json.dumps(meta))
    with pytest.raises(M3HLInputError, match="more volume 1 is damaged"):
        load_session(folder)


def test_bad_more_volume_labels_are_refused_before_writing(tmp_path):
    labels, affine = _main()
    bad = SessionVolume("ED image", (5, 12, 10), None, "ED labels", np.full((5, 12, 10), 300, np.int32))
    with pytest.raises(M3HLInputError, match="'ED labels' of the more volume 'ED image'.*300"):
        save_session(tmp_path / "s", labels, affine, extras=[bad])
    wrong = SessionVolume("ED image", (5, 12, 10), None, "ED labels", np.zeros((5, 12, 9), np.uint8))
    with pytest.raises(M3HLInputError, match=r"do not match the more volume 'ED image' \(5, 12, 10\)"):
        save_session(tmp_path / "s", labels, affine, extras=[wrong])
    assert not (tmp_path / "s").exists()


def test_session_without_more_volumes_still_opens(tmp_path):
    """A session written before more volumes were saved: no ``extra_volumes`` in session.json."""
    labels, affine = _main()
    folder = save_session(tmp_path / "s", labels, affine, meta={"image_name": "main"})
    meta = json.loads((folder / "session.json").read_text())
    del meta["extra_volumes"]
    (folder / "session.json").write_text(json.dumps(meta))
    s = load_session(folder)
    assert s.extras == [] and s.meta["image_name"] == "main"
    np.testing.assert_array_equal(s.labels, labels)


def test_a_save_that_fails_on_a_full_disk_leaves_the_earlier_session_whole(tmp_path, monkeypatch):
    """The disk fills while the last file (session.json) is written: no file of
    the folder changes, no temporary file and no new more/ folder is left."""
    import errno
    import hashlib
    from pathlib import Path

    labels, affine = _main()
    folder = save_session(tmp_path / "s", labels, affine, meta={"image_name": "main"})

    def digest() -> dict:  # every file's content and every folder, hidden ones included
        return {p.relative_to(folder): p.is_dir() or hashlib.sha256(p.read_bytes()).hexdigest()
                for p in folder.rglob("*")}

    before = digest()
    real = Path.write_text

    def disk_fills(self, text, *args, **kwargs):
        if self.name.startswith(".session.json."):
            real(self, text[: len(text) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_fills)
    with pytest.raises(OSError, match="No space left"):
        save_session(folder, _labels((4, 10, 8), 5, [1, 2]), affine, extras=_three_volumes(tmp_path))
    assert digest() == before
    monkeypatch.undo()
    np.testing.assert_array_equal(load_session(folder).labels, labels)
