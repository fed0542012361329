"""Losses of M³HL: masked CE + Dice (Eq. 3) and high-low feature consistency (Eq. 4, 5)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

_EPS = 1e-5


def masked_ce(logits: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over a region.

    Args:
        logits: (B, C, *S) scores.
        target: (B, *S) int64 class indices.
        region: (B, *S) 0/1 weights; the sum of per-pixel CE inside the region
            is divided by the region's pixel count.
    """
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    return (ce * region).sum() / (region.sum() + 1e-16)


def masked_dice(probs: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss inside a region, pooled over the batch, mean over all classes.

    ``1 − (2·Σ p·y·r + ε) / (Σ p²·r + Σ y·r + ε)`` per class (background
    included), as in the BCP/M³HL code.

    Args:
        probs: (B, C, *S) softmax probabilities.
        target: (B, *S) int64.
        region: (B, *S) 0/1.
    """
    num_classes = probs.shape[1]
    onehot = F.one_hot(target, num_classes).movedim(-1, 1).to(probs.dtype)
    r = region.unsqueeze(1)
    dims = [0] + list(range(2, probs.dim()))
    inter = (probs * onehot * r).sum(dims)
    p_sum = (probs * probs * r).sum(dims)
    y_sum = (onehot * r).sum(dims)
    dice = (2 * inter + _EPS) / (p_sum + y_sum + _EPS)
    return (1 - dice).mean()


def seg_loss(logits: torch.Tensor, target: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    """CE + Dice over a region (the whole image when ``region`` is None)."""
    if region is None:
        region = torch.ones_like(target, dtype=torch.float32)
    probs = torch.softmax(logits.float(), dim=1)
    return masked_ce(logits, target, region) + masked_dice(probs, target, region)


def mix_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    weight_mask: float,
    weight_rest: float,
    dice: str = "regions",
) -> torch.Tensor:
    """Eq. 3 for one mixed batch: (CE + Dice) weighted region-wise.

    ``weight_mask·(CE+Dice)|_{M=1} + weight_rest·(CE+Dice)|_{M=0}``; each term
    is normalised by its own region (CE by its pixel count, Dice within it).
    The caller gives the pseudo-labelled region the weight α and the
    labelled region 1.

    ``dice`` says where the Dice term is pooled: ``"regions"`` (the
    reference code) as above; ``"whole"``: one soft Dice over the whole mixed
    image with per-pixel weights ``weight_mask·M + weight_rest·(1−M)``, so a
    structure cut by a block edge is scored whole rather than as two slivers;
    ``"none"``: CE only.

    Args:
        logits: (B, C, *S); target: (B, *S) int64 (mixed labels); mask: (B, *S) 0/1.
    """
    probs = torch.softmax(logits.float(), dim=1)
    rest = 1 - mask
    loss = weight_mask * masked_ce(logits, target, mask) + weight_rest * masked_ce(logits, target, rest)
    if dice == "regions":
        loss = loss + weight_mask * masked_dice(probs, target, mask) + weight_rest * masked_dice(probs, target, rest)
    elif dice == "whole":
        loss = loss + (weight_mask + weight_rest) * masked_dice(probs, target, weight_mask * mask + weight_rest * rest)
    elif dice != "none":
        raise ValueError(f"dice must be regions, whole or none, got {dice!r}")
    return loss


def low_level_loss(mixed: Sequence[torch.Tensor], unlabeled: Sequence[torch.Tensor]) -> torch.Tensor:
    """Eq. 4: mean L1 distance over all (mixed, unlabeled) feature pairs.

    Args:
        mixed: student features of the mixed halves, each (n, C, *S).
        unlabeled: teacher features of the unlabeled halves, same shapes.
    """
    terms = [(m.float() - u.float()).abs().mean() for m in mixed for u in unlabeled]
    return torch.stack(terms).mean()


def high_level_loss(mixed: Sequence[torch.Tensor], unlabeled: Sequence[torch.Tensor]) -> torch.Tensor:
    """Eq. 5: mean (1 − cosine similarity) of flattened per-sample features over all pairs."""
    terms = [
        (1 - F.cosine_similarity(m.float().flatten(1), u.float().flatten(1), dim=1)).mean()
        for m in mixed
        for u in unlabeled
    ]
    return torch.stack(terms).mean()
