import numpy as np
import pytest

from napari_m3hl.fewslice.suggest import disagreement_map, rank_slices, slice_scores


def _probs(d=3, h=8, w=8):
    p = np.zeros((4, d, h, w), np.float32)
    p[0] = 1.0  # all confident background
    return p


def test_entropy_ranks_the_ambiguous_slice_first():
    p = _probs()
    p[:, 1, 2:6, 2:6] = 0
    p[3, 1, 2:6, 2:6] = 0.55  # LV, unsure against Myo
    p[2, 1, 2:6, 2:6] = 0.45
    p[:, 2, 2:6, 2:6] = 0
    p[3, 2, 2:6, 2:6] = 0.99  # LV, sure
    p[2, 2, 2:6, 2:6] = 0.01
    s = slice_scores(p, method="entropy")
    assert s[0] == 0 and s[1] > s[2] > 0
    assert rank_slices(s) == [1, 2, 0]
    assert rank_slices(s, labeled=[1]) == [2, 0]
    m = slice_scores(p, method="margin")
    assert m[1] == pytest.approx(0.9) and m[2] == pytest.approx(0.02)


def test_total_entropy_weighs_the_size_of_the_uncertain_heart():
    p = _probs()
    for z, (a, b) in ((0, (2, 3)), (1, (1, 7))):  # slice 0: 1×1 unsure pixel; slice 1: 6×6 less unsure pixels
        p[:, z, a:b, a:b] = 0
    p[3, 0, 2:3, 2:3], p[2, 0, 2:3, 2:3] = 0.5, 0.5
    p[3, 1, 1:7, 1:7], p[2, 1, 1:7, 1:7] = 0.8, 0.2
    mean, total = slice_scores(p, method="entropy"), slice_scores(p, method="total-entropy")
    assert mean[0] > mean[1] and total[1] > total[0]  # per-pixel the small heart is less sure; in sum the big one
    assert total[0] == pytest.approx(np.log(2) / 64) and total[2] == 0


def test_disagreement():
    s, t = _probs(), _probs()
    s[:, 0, :4] = 0
    s[1, 0, :4] = 1  # student: RV on half of slice 0
    t[:, 0, :2] = 0
    t[1, 0, :2] = 1  # teacher: RV on a quarter
    sc = slice_scores(s, t, method="disagreement")
    assert sc[0] == pytest.approx(0.5) and sc[1] == 0
    with pytest.raises(ValueError, match="teacher"):
        slice_scores(s, None, method="disagreement")
    dm = disagreement_map(s.argmax(0), t.argmax(0))
    assert dm.dtype == np.uint8 and dm.sum() == 2 * 8


def test_entropy_ignores_the_other_networks_foreground():
    s, t = _probs(), _probs()
    t[:, 0, :4] = 0
    t[1, 0, :4] = 0.6  # teacher: unsure RV where the student is sure of background
    t[0, 0, :4] = 0.4
    assert slice_scores(s, t, method="entropy")[0] == 0  # the student's heart region is empty
    assert slice_scores(t, s, method="entropy")[0] > 0.6  # scoring the teacher: its own region
    assert slice_scores(s, t, method="disagreement")[0] == pytest.approx(1.0)  # union region: all of it differs


def test_bad_method():
    with pytest.raises(ValueError, match="unknown"):
        slice_scores(_probs(), method="magic")


def test_analyse_volume_with_real_networks():
    import torch

    from napari_m3hl.method.networks import build_network
    from napari_m3hl.fewslice.suggest import analyse_volume

    torch.manual_seed(0)
    student, teacher = build_network("unet2d", 1, 4), build_network("unet2d", 1, 4)
    vol = np.random.default_rng(0).random((3, 40, 48)).astype(np.float32)
    a = analyse_volume(student, vol, teacher, "disagreement", patch=(32, 32))
    assert a.scores.shape == (3,) and a.student.shape == vol.shape and a.teacher.shape == vol.shape
    assert a.student.dtype == np.uint8
    assert np.array_equal(a.disagreement, (a.student != a.teacher).astype(np.uint8))
    assert sorted(a.ranking(labeled=[1])) == [0, 2]
    same = analyse_volume(student, vol, student, "disagreement", patch=(32, 32))
    assert not same.disagreement.any() and not same.scores.any()
    alone = analyse_volume(student, vol, None, "entropy", patch=(32, 32))
    assert alone.teacher is None and alone.disagreement is None and alone.scores.shape == (3,)
    with pytest.raises(ValueError, match="teacher"):
        analyse_volume(student, vol, None, "disagreement", patch=(32, 32))
    # scoring the teacher: its entropy, and the analysis says so
    by_t = analyse_volume(student, vol, teacher, "entropy", patch=(32, 32), network="teacher")
    swapped = analyse_volume(teacher, vol, student, "entropy", patch=(32, 32))
    assert by_t.network == "teacher" and alone.network == "student"
    np.testing.assert_allclose(by_t.scores, swapped.scores)
    with pytest.raises(ValueError, match="teacher"):
        analyse_volume(student, vol, None, "entropy", patch=(32, 32), network="teacher")
    with pytest.raises(ValueError, match="network"):
        analyse_volume(student, vol, teacher, "entropy", patch=(32, 32), network="both")


def test_spread_ranking_prefers_uncertain_slices_away_from_labels():
    from napari_m3hl.fewslice.suggest import distance_to_labeled

    np.testing.assert_array_equal(distance_to_labeled(6, [1, 4]), [1, 0, 1, 1, 0, 1])
    np.testing.assert_array_equal(distance_to_labeled(3, []), [3, 3, 3])
    scores = np.array([0.1, 0.0, 0.5, 0.3, 0.0, 0.0, 0.2, 0.25])
    assert rank_slices(scores, [1])[:2] == [2, 3]  # plain: most uncertain first, next to the label or not
    # × distance to slice 1: 2→0.5, 3→0.6, 6→1.0, 7→1.5
    assert rank_slices(scores, [1], spread=True)[:4] == [7, 6, 3, 2]
    assert rank_slices(scores, [], spread=True) == rank_slices(scores, [])
