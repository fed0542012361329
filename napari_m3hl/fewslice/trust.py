"""How much of the start model a few-slice fine-tune keeps: its share of the blend.

After a fine-tune the user is shown ``w·p_start + (1 − w)·p_student``, the
start model's and the fine-tuned network's class probabilities averaged
(:func:`napari_m3hl.fewslice.loop.blend_labels`). The start model has never
seen the painted slices, so its Dice there is an honest estimate of how well
it segments this scan; the fine-tuned network has learned them, so its Dice
there says nothing about the rest. :func:`choose_blend` sets ``w`` from that
estimate: ``options.start_blend`` when the start model segments the painted
slices at ``options.trust_high`` or better, ``options.start_blend_untrusted``
at ``options.trust_low`` or worse, linear in between.

Measured on the ACDC validation volumes, as they are and under scanner-like
shifts, and on phantoms (``benchmarks/fewslice_blend.py``, docs/benchmarks.md,
"How much of the start model to keep"): on scans like its training data the
start model scores 90 or more on the painted slices and a share of 0.6 is
best; where it scores 85 or less (a contrast change, a rotation, the
phantom) the fine-tuned network is usually far better than the start model
and 0.6 gives away several points of what the fine-tune gained. A
fine-tuned network that generalises poorly from the painted slices keeps
changing its segmentation of the unpainted ones from check to check, and
there lower shares were dangerous (on one volume whose painted slices are
neighbours, up to 9 points below the start model). So the share for a poor
start model depends on that change, measured after training
(:func:`settle_blend`): ``options.start_blend_stable`` (0.4) when the
student's segmentation of the unpainted slices changed by less than
``options.stable_change`` (1 − Dice, 0.04) between its last two checks,
``options.start_blend_untrusted`` (0.55) otherwise.

The rule's six numbers were checked out of sample (``benchmarks/fewslice_share_cv.py``,
"Can a better share rule close the gap?"): rules chosen on half of the validation
patients score lower on the other half and break the one-point floor where this one
does not, and every volume at its own best share would gain 0.3–0.8 points on a row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from napari_m3hl.metrics.quality import painted_dice


@dataclass(frozen=True)
class BlendChoice:
    """The start model's share of the segmentation (``weight``, 0..1) and what it
    was chosen from: the start model's mean Dice over the painted classes on
    the painted slices (``painted_dice``, 0..1, the mean over the labeled
    volumes; None when nothing is painted)."""

    weight: float
    painted_dice: float | None
    #: 1 − mean Dice between the student's segmentations of the unpainted slices at its last two
    #: checks (0..1), once :func:`settle_blend` has seen them; None before.
    student_change: float | None = None

    def describe(self) -> str:
        """One sentence for the user: the share and why."""
        if self.weight <= 0:
            return "The fine-tuned network segments alone (no start-model blend)."
        if self.painted_dice is None:
            return f"The start model keeps a {self.weight:.2f} share of the segmentation."
        change = "" if self.student_change is None else \
            f" (the fine-tuned network changed {100 * self.student_change:.1f} % of its segmentation at the last check)"
        return (f"The start model scores {100 * self.painted_dice:.0f} Dice on your painted slices, so it keeps a "
                f"{self.weight:.2f} share of the segmentation{change}.")


def start_share(dice: float | None, trusted: float, untrusted: float, low: float, high: float) -> float:
    """The blend weight for a start model scoring ``dice`` (0..1) on the painted
    slices: ``trusted`` at ``high`` or above, ``untrusted`` at ``low`` or below,
    linear in between; ``trusted`` when ``dice`` is None."""
    if dice is None or high <= low:
        return float(trusted) if dice is None or dice >= high else float(untrusted)
    t = float(np.clip((dice - low) / (high - low), 0.0, 1.0))
    return float(untrusted + t * (trusted - untrusted))


def choose_blend(base: Sequence[np.ndarray], painted: Sequence[np.ndarray | None], class_names: Sequence[str],
                 trusted: float, untrusted: float, low: float, high: float) -> BlendChoice:
    """:class:`BlendChoice` for a fine-tune whose labeled volumes have the start
    model's segmentations ``base`` and the painted labels ``painted`` (each
    (D, H, W); None for an unlabeled volume, which is skipped): 0 when
    ``trusted`` is 0, else :func:`start_share` with ``untrusted`` at most
    ``trusted``."""
    scores = [painted_dice(b, p, class_names)[0] for b, p in zip(base, painted) if p is not None]
    scores = [s for s in scores if s is not None]
    dice = float(np.mean(scores)) if scores else None
    if trusted <= 0:
        return BlendChoice(0.0, dice)
    # a share below `trusted` for a poor start model, never above it
    return BlendChoice(start_share(dice, trusted, min(untrusted, trusted), low, high), dice)


def settle_blend(choice: BlendChoice, student_change: float | None, trusted: float, untrusted: float,
                 stable: float, stable_change: float, low: float, high: float) -> BlendChoice:
    """The share once the student has trained: :func:`start_share` of
    ``choice.painted_dice`` with ``stable`` as the share for a poor start model
    when ``student_change`` (1 − Dice of the student's segmentations of the
    unpainted slices at its last two checks, 0..1) is below ``stable_change``,
    ``untrusted`` otherwise or when it is unknown (None, NaN: one check only).
    ``choice`` unchanged in weight when it does not blend (weight 0) or has no
    painted Dice; the share is never above ``trusted``."""
    known = student_change is not None and bool(np.isfinite(student_change))
    if choice.weight <= 0 or choice.painted_dice is None:
        return BlendChoice(choice.weight, choice.painted_dice, student_change if known else None)
    poor = stable if known and student_change < stable_change else untrusted
    weight = start_share(choice.painted_dice, trusted, min(poor, trusted), low, high)
    return BlendChoice(weight, choice.painted_dice, float(student_change) if known else None)
