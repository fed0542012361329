"""The start model's share of a few-slice fine-tune's segmentation (napari_m3hl.fewslice.trust)."""
from __future__ import annotations

import numpy as np
import pytest

from napari_m3hl.fewslice.trust import BlendChoice, choose_blend, settle_blend, start_share

NAMES = ("background", "RV", "Myo", "LV")


def test_start_share_is_trusted_above_high_untrusted_below_low_and_linear_between():
    assert start_share(0.95, 0.6, 0.3, 0.85, 0.90) == 0.6
    assert start_share(0.90, 0.6, 0.3, 0.85, 0.90) == 0.6
    assert start_share(0.85, 0.6, 0.3, 0.85, 0.90) == pytest.approx(0.3)
    assert start_share(0.40, 0.6, 0.3, 0.85, 0.90) == pytest.approx(0.3)
    assert start_share(0.875, 0.6, 0.3, 0.85, 0.90) == pytest.approx(0.45)
    assert start_share(None, 0.6, 0.3, 0.85, 0.90) == 0.6  # nothing to judge by: the trusted share
    assert start_share(0.89, 0.6, 0.3, 0.9, 0.9) == 0.3 and start_share(0.9, 0.6, 0.3, 0.9, 0.9) == 0.6


def _volume(wrong_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(start model's segmentation, painted labels): two painted slices with an RV, Myo and
    LV square each; the segmentation misses ``wrong_rows`` of the LV square's 10 rows."""
    painted = np.zeros((5, 40, 40), np.uint8)
    for z in (1, 3):
        painted[z, 5:15, 5:15], painted[z, 5:15, 20:30], painted[z, 20:30, 5:15] = 1, 2, 3
    base = painted.copy()
    base[:, 20:20 + wrong_rows, 5:15] = 0
    base[2, 30:35, 30:35] = 1  # an unpainted slice: not judged
    return base, painted


def test_choose_blend_scores_the_start_model_on_the_painted_slices_of_every_labeled_volume():
    good, painted = _volume(0)
    poor_lv, _ = _volume(8)  # LV Dice 2·20/(20+100) = 1/3 on the painted slices
    assert choose_blend([good], [painted], NAMES, 0.6, 0.3, 0.85, 0.90) == BlendChoice(0.6, 1.0)
    poor = choose_blend([poor_lv], [painted], NAMES, 0.6, 0.3, 0.85, 0.90)
    assert poor.painted_dice == pytest.approx((1 + 1 + 1 / 3) / 3) and poor.weight == pytest.approx(0.3)
    both = choose_blend([good, poor_lv, good], [painted, painted, None], NAMES, 0.6, 0.3, 0.85, 0.90)
    mean = (1 + (1 + 1 + 1 / 3) / 3) / 2  # 0.889: the unlabeled volume is skipped
    assert both.painted_dice == pytest.approx(mean)
    assert both.weight == pytest.approx(0.3 + 0.3 * (mean - 0.85) / 0.05)  # between trust_low and trust_high


def test_choose_blend_without_a_blend_or_with_a_low_trusted_share():
    half, painted = _volume(8)
    assert choose_blend([half], [painted], NAMES, 0.0, 0.3, 0.85, 0.90).weight == 0.0  # the network alone
    assert choose_blend([half], [painted], NAMES, 0.2, 0.3, 0.85, 0.90).weight == pytest.approx(0.2)  # never above
    unlabeled = choose_blend([half], [None], NAMES, 0.6, 0.3, 0.85, 0.90)
    assert unlabeled == BlendChoice(0.6, None)


def test_describe_says_the_share_and_the_score():
    assert "85 Dice on your painted slices" in BlendChoice(0.3, 0.85).describe()
    assert "0.30 share" in BlendChoice(0.3, 0.85).describe()
    assert "alone" in BlendChoice(0.0, 0.85).describe()


def test_settle_blend_lowers_a_poor_start_models_share_only_for_a_settled_student():
    poor, mid, good = BlendChoice(0.55, 0.80), BlendChoice(0.575, 0.885), BlendChoice(0.6, 0.95)
    args = (0.6, 0.55, 0.4, 0.04, 0.85, 0.92)  # trusted, untrusted, stable, stable_change, low, high
    assert settle_blend(poor, 0.02, *args) == BlendChoice(0.4, 0.80, 0.02)  # settled: the stable share
    assert settle_blend(poor, 0.06, *args) == BlendChoice(0.55, 0.80, 0.06)  # still moving: the untrusted one
    assert settle_blend(poor, None, *args) == BlendChoice(0.55, 0.80, None)  # unknown (one check)
    assert settle_blend(poor, float("nan"), *args).weight == 0.55
    assert settle_blend(mid, 0.02, *args).weight == pytest.approx(0.5)  # linear between trust_low and trust_high
    assert settle_blend(good, 0.02, *args).weight == 0.6  # a start model that fits keeps its share
    assert settle_blend(BlendChoice(0.0, 0.80), 0.02, 0.0, 0.55, 0.4, 0.04, 0.85, 0.92).weight == 0.0  # no blend
    assert settle_blend(BlendChoice(0.6, None), 0.02, *args) == BlendChoice(0.6, None, 0.02)  # nothing painted
    assert "changed 2.0 %" in settle_blend(poor, 0.02, *args).describe()
