"""Tests of napari_m3hl.metrics.labelmaps against medpy and hand-made cases."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage

from napari_m3hl.metrics import binary as B
from napari_m3hl.metrics import labelmaps as M
from napari_m3hl.errors import M3HLInputError

binary = pytest.importorskip("medpy.metric.binary")


def _blob(rng: np.random.Generator, shape: tuple[int, ...], sigma: float, frac: float) -> np.ndarray:
    """Binary blob: smoothed noise thresholded at its (1-frac) quantile."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return noise > np.quantile(noise, 1.0 - frac)


def _random_cases(n: int = 60):
    rng = np.random.default_rng(1234)
    cases = []
    for i in range(n):
        ndim = 2 if i % 2 == 0 else 3
        if ndim == 2:
            shape = tuple(int(s) for s in rng.integers(12, 48, size=2))
        else:
            shape = tuple(int(s) for s in rng.integers(6, 20, size=3))
        sigma = float(rng.uniform(1.0, 3.0))
        a = _blob(rng, shape, sigma, float(rng.uniform(0.05, 0.5)))
        if i % 5 == 0:
            # small perturbation of a -> overlapping pair
            b = ndimage.binary_dilation(a, iterations=1) ^ (rng.random(shape) < 0.02)
        else:
            b = _blob(rng, shape, sigma, float(rng.uniform(0.05, 0.5)))
        if not a.any():
            a.flat[0] = True
        if not b.any():
            b.flat[-1] = True
        if i % 3 == 0:
            spacing = None
        elif i % 3 == 1:
            spacing = tuple(float(s) for s in rng.uniform(0.3, 3.0, size=ndim))
        else:
            spacing = float(rng.uniform(0.5, 2.0))
        connectivity = int(rng.integers(1, ndim + 1)) if i % 4 else 1
        # integer-typed masks in some cases (any non-zero counts as object)
        if i % 7 == 0:
            a = a.astype(np.uint8) * 3
        cases.append((a, b, spacing, connectivity))
    return cases


CASES = _random_cases()


def _close(x: float, y: float) -> bool:
    return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-12)


@pytest.mark.parametrize("idx", range(len(CASES)))
def test_matches_medpy(idx: int) -> None:
    a, b, spacing, conn = CASES[idx]
    assert _close(B.dice(a, b), binary.dc(a, b))
    assert _close(B.jaccard(a, b), binary.jc(a, b))
    assert _close(B.hd95(a, b, spacing, conn), binary.hd95(a, b, voxelspacing=spacing, connectivity=conn))
    assert _close(B.asd(a, b, spacing, conn), binary.asd(a, b, voxelspacing=spacing, connectivity=conn))
    # and in the other order (asd is directed)
    assert _close(B.asd(b, a, spacing, conn), binary.asd(b, a, voxelspacing=spacing, connectivity=conn))


def test_objects_touching_edges_and_small_objects() -> None:
    """Crop must not change anything when objects touch the array border."""
    rng = np.random.default_rng(7)
    for _ in range(10):
        shape = (15, 17, 9)
        a = rng.random(shape) < 0.3
        b = rng.random(shape) < 0.3
        a[0, :, :] = True
        b[:, -1, :] = True
        for conn in (1, 2, 3):
            assert _close(B.hd95(a, b, connectivity=conn), binary.hd95(a, b, connectivity=conn))
            assert _close(B.asd(a, b, (1, 2, 3), conn), binary.asd(a, b, (1, 2, 3), conn))
    # single voxels, 1-D, far apart in a big array
    a = np.zeros(200, bool)
    b = np.zeros(200, bool)
    a[3] = True
    b[150] = True
    assert B.hd95(a, b) == binary.hd95(a, b) == 147.0
    assert B.asd(a, b, spacing=0.5) == pytest.approx(73.5)


def test_two_squares_known_offset() -> None:
    pred = np.zeros((40, 40), bool)
    ref = np.zeros((40, 40), bool)
    pred[10:20, 10:20] = True  # 10x10
    ref[10:20, 13:23] = True  # shifted 3 px along axis 1
    # overlap 10x7 = 70
    assert B.dice(pred, ref) == pytest.approx(2 * 70 / 200)
    assert B.jaccard(pred, ref) == pytest.approx(70 / 130)
    # every border pixel moves by at most 3 columns; the left/right edges are
    # exactly 3 away from the nearest border of the other square
    h = B.hd95(pred, ref)
    assert 0 < h <= 3.0
    assert h == pytest.approx(binary.hd95(pred, ref))
    # spacing scales distances along axis 1 only
    assert B.hd95(pred, ref, spacing=(1.0, 2.0)) == pytest.approx(binary.hd95(pred, ref, voxelspacing=(1.0, 2.0)))
    # identical squares
    assert B.dice(pred, pred) == 1.0
    assert B.hd95(pred, pred) == 0.0
    assert B.asd(pred, pred) == 0.0
    # disjoint squares, far apart: HD95 equals the distances of the offsets
    far = np.zeros((40, 40), bool)
    far[10:20, 30:40] = True  # 20 px to the right of pred
    assert B.dice(pred, far) == 0.0
    assert B.hd95(pred, far) == pytest.approx(binary.hd95(pred, far))
    assert B.asd(pred, far) == pytest.approx(binary.asd(pred, far))
    assert B.hd95(pred, far) >= 11.0


def test_empty_edge_cases() -> None:
    e = np.zeros((5, 5), bool)
    x = e.copy()
    x[2, 2] = True
    # medpy's intended value (its ZeroDivisionError branch); medpy 0.5.2 on
    # numpy 2 returns NaN with a warning instead, so it is not compared here.
    assert B.dice(e, e) == 1.0
    assert B.jaccard(e, e) == binary.jc(e, e) == 1.0
    assert B.dice(x, e) == binary.dc(x, e) == 0.0
    assert B.jaccard(e, x) == binary.jc(e, x) == 0.0
    for fn in (B.hd95, B.asd):
        with pytest.raises(B.EmptyObjectError, match="pred"):
            fn(e, x)
        with pytest.raises(ValueError, match="ref"):
            fn(x, e)


def test_bad_inputs() -> None:
    a = np.ones((4, 4), bool)
    with pytest.raises(M3HLInputError, match="shape"):
        B.dice(a, np.ones((4, 5), bool))
    with pytest.raises(M3HLInputError, match="spacing"):
        B.hd95(a, a, spacing=(1, 2, 3))
    with pytest.raises(M3HLInputError, match="spacing"):
        B.hd95(a, a, spacing=(1, -2))
    with pytest.raises(M3HLInputError, match="connectivity"):
        B.asd(a, a, connectivity=0)
    with pytest.raises(M3HLInputError, match="NaN"):
        B.dice(np.full((2, 2), np.nan), a[:2, :2])


def _label_case():
    rng = np.random.default_rng(3)
    shape = (6, 30, 28)
    ref = np.zeros(shape, np.uint8)
    ref[:, 5:25, 4:14] = 1
    ref[:, 8:20, 14:24] = 2
    ref[:, 10:16, 16:22] = 3
    pred = ref.copy()
    noise = rng.random(shape) < 0.05
    pred[noise] = rng.integers(0, 4, size=int(noise.sum()))
    return pred, ref


def test_evaluate_case_matches_medpy_per_class() -> None:
    pred, ref = _label_case()
    for spacing in (None, (10.0, 1.5, 1.5)):
        res = M.evaluate_case(pred, ref, 4, spacing=spacing)
        assert sorted(res) == [1, 2, 3]
        for c, m in res.items():
            p, r = pred == c, ref == c
            assert _close(m.dice, binary.dc(p, r))
            assert _close(m.jaccard, binary.jc(p, r))
            assert _close(m.hd95, binary.hd95(p, r, voxelspacing=spacing))
            assert _close(m.asd, binary.asd(p, r, voxelspacing=spacing))
            assert not m.pred_empty and not m.ref_empty


def test_evaluate_case_empty_conventions() -> None:
    ref = np.zeros((4, 20, 20), np.uint8)
    ref[:, 2:8, 2:8] = 1  # class 1 present
    ref[:, 10:15, 10:15] = 2  # class 2 present but never predicted (miss)
    pred = np.zeros_like(ref)
    pred[:, 2:8, 3:9] = 1
    pred[:, 16:19, 16:19] = 3  # class 3 predicted but absent from ref
    # class 4: absent from both
    paper = M.evaluate_case(pred, ref, 5)
    assert paper[2] == M.ClassMetrics(0.0, 0.0, 0.0, 0.0, pred_empty=True, ref_empty=False)
    assert paper[2].missed and not paper[2].false_positive
    assert (paper[3].dice, paper[3].jaccard, paper[3].hd95, paper[3].asd) == (0.0, 0.0, 0.0, 0.0)
    assert paper[3].false_positive
    assert (paper[4].dice, paper[4].hd95) == (0.0, 0.0)
    assert paper[1].dice == pytest.approx(binary.dc(pred == 1, ref == 1))

    strict = M.evaluate_case(pred, ref, 5, empty_convention="strict")
    assert strict[1] == paper[1]
    assert strict[2].dice == 0.0 and strict[2].jaccard == 0.0
    assert math.isnan(strict[2].hd95) and math.isnan(strict[2].asd)
    assert strict[3].dice == 0.0 and math.isnan(strict[3].hd95)
    assert strict[4].dice == 1.0 and strict[4].jaccard == 1.0 and math.isnan(strict[4].asd)

    s = M.summarize([strict, paper], ["RV", "Myo", "LV", "X"])
    rows = {e["name"]: e for e in s["classes"]}
    assert rows["Myo"]["n_missed"] == 2
    assert rows["LV"]["n_false_positive"] == 2
    assert rows["Myo"]["n_undefined_distance"] == 1
    assert rows["Myo"]["hd95"]["mean"] == 0.0  # NaN left out, paper's 0 kept


def test_evaluate_case_bad_inputs() -> None:
    pred, ref = _label_case()
    with pytest.raises(M3HLInputError, match="num_classes"):
        M.evaluate_case(pred, ref, 3)  # labels up to 3
    with pytest.raises(M3HLInputError, match="num_classes"):
        M.evaluate_case(pred, ref, 1)
    with pytest.raises(M3HLInputError, match="empty_convention"):
        M.evaluate_case(pred, ref, 4, empty_convention="lenient")  # type: ignore[arg-type]
    with pytest.raises(M3HLInputError, match="shape"):
        M.evaluate_case(pred[:2], ref, 4)
    with pytest.raises(M3HLInputError, match="integer"):
        M.evaluate_case(pred + 0.5, ref, 4)


def test_summarize_and_table() -> None:
    c1 = {1: M.ClassMetrics(0.9, 0.8, 2.0, 0.5), 2: M.ClassMetrics(0.7, 0.6, 4.0, 1.0)}
    c2 = {1: M.ClassMetrics(0.8, 0.7, 4.0, 1.5), 2: M.ClassMetrics(0.5, 0.4, 6.0, 2.0)}
    s = M.summarize([c1, c2], ["background", "RV", "LV"])  # background-first naming accepted
    assert s["n_cases"] == 2
    rv, lv = s["classes"]
    assert (rv["id"], rv["name"], lv["name"]) == (1, "RV", "LV")
    assert rv["dice"]["mean"] == pytest.approx(0.85)
    assert rv["dice"]["std"] == pytest.approx(0.05)
    assert lv["hd95"]["mean"] == pytest.approx(5.0)
    assert s["mean"]["dice"] == pytest.approx((0.85 + 0.6) / 2)
    assert s["mean"]["asd"] == pytest.approx((1.0 + 1.5) / 2)
    json.dumps(s)  # JSON-ready
    assert M.summarize([c1], {1: "A", 2: "B"})["classes"][1]["name"] == "B"
    assert M.summarize([c1])["classes"][0]["name"] == "class 1"

    table = M.format_table(s, distance_unit="mm")
    lines = table.splitlines()
    assert lines[0].startswith("| Class | Dice (%) | Jaccard (%) | HD95 (mm) | ASD (mm)")
    assert "| RV | 85.00 ± 5.00 | 75.00 ± 5.00 | 3.00 ± 1.00 | 1.00 ± 0.50 | 0/2 |" in lines
    assert lines[-1].startswith("| **Mean** | 72.50 |")
    assert len(lines) == 5

    with pytest.raises(M3HLInputError):
        M.summarize([])
    with pytest.raises(M3HLInputError, match="class_names"):
        M.summarize([c1], ["a", "b", "c", "d", "e"])
    with pytest.raises(M3HLInputError, match="num_classes"):
        M.summarize([c1, {1: c1[1]}])
    with pytest.raises(M3HLInputError):
        M.format_table({"foo": 1})


def test_strict_table_shows_na() -> None:
    miss = {1: M.ClassMetrics(0.0, 0.0, math.nan, math.nan, True, False)}
    s = M.summarize([miss], ["LA"])
    assert math.isnan(s["classes"][0]["hd95"]["mean"])
    assert "n/a" in M.format_table(s)
    assert "1/1" in M.format_table(s)


def test_volume_crop_speed_path_equivalent() -> None:
    """Small objects in a large volume: crop path equals medpy exactly."""
    vol = np.zeros((40, 120, 120), bool)
    ref = vol.copy()
    vol[18:22, 50:60, 50:62] = True
    ref[19:23, 52:61, 49:60] = True
    assert _close(B.hd95(vol, ref, (10, 1.25, 1.25)), binary.hd95(vol, ref, (10, 1.25, 1.25)))
    assert _close(B.asd(vol, ref), binary.asd(vol, ref))
