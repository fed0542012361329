"""Averaging class probabilities of several networks: :class:`ProbabilityBlend`.

The few-slice loop (:mod:`napari_m3hl.fewslice.loop`) shows a weighted average of
the start model's and the fine-tuned network's softmax, not the fine-tuned
network alone: on the ACDC validation volumes that blend was better than
either network alone and stayed within a point of the start model
(docs/benchmarks.md, "Few-slice fine-tuning on one volume"). A fine-tune's
checkpoint keeps the start model's weights (``start``) and the blend weight
(``start_blend``) so :class:`napari_m3hl.inference.predictor.Predictor` (``m3hl
predict``, the widget) segments with the same blend.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from napari_m3hl.errors import M3HLInputError
from napari_m3hl.method.networks import NetOutput


class ProbabilityBlend(nn.Module):
    """``Σ_i w_i · softmax(net_i(x))`` returned as logits (its log), so
    ``softmax(logits)`` is the blended probability.

    Args:
        nets: networks of one input/output layout; ``net(x).logits`` is
            ``(B, C, *spatial)``.
        weights: one non-negative weight per network, summing to 1.
    """

    def __init__(self, nets: Sequence[nn.Module], weights: Sequence[float]) -> None:
        super().__init__()
        if len(nets) != len(weights) or not nets:
            raise M3HLInputError(f"a blend needs one weight per network, got {len(nets)} networks, {len(weights)} weights")
        w = [float(x) for x in weights]
        if min(w) < 0 or abs(sum(w) - 1.0) > 1e-6:
            raise M3HLInputError(f"blend weights must be >= 0 and sum to 1, got {w}")
        self.nets = nn.ModuleList(nets)
        self.weights = w

    def forward(self, x: torch.Tensor) -> NetOutput:
        prob = None
        for net, w in zip(self.nets, self.weights):
            out = net(x)
            logits = out.logits if hasattr(out, "logits") else out
            p = w * torch.softmax(logits.float(), dim=1)
            prob = p if prob is None else prob + p
        return NetOutput(torch.log(prob.clamp_min(1e-12)), {})


def start_blend(ckpt: dict) -> float:
    """The weight of the start model's probabilities recorded in a fine-tune's
    checkpoint (0 when it holds no start model)."""
    if "start" not in ckpt:
        return 0.0
    w = float(ckpt.get("start_blend", 0.0))
    if not 0.0 <= w <= 1.0:
        raise M3HLInputError(f"the checkpoint's start_blend is {w}; it must lie in [0, 1]")
    return w
