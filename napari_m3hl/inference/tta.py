"""Flip test-time augmentation: :class:`FlipAverage`.

The network sees the input as it is and mirrored along each in-plane axis
and both (four passes); the class probabilities of the four, each mirrored
back, are averaged. Off by default: what it adds and costs on the ACDC
validation volumes is in docs/benchmarks.md ("Cleaning and flip TTA").
"""
from __future__ import annotations

import torch
from torch import nn

from napari_m3hl.method.networks import NetOutput

#: The in-plane flips, as ``torch.flip`` dims of a ``(B, C, ..., H, W)`` tensor.
FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


class FlipAverage(nn.Module):
    """``mean_f flip_f(softmax(net(flip_f(x))))`` over :data:`FLIPS`, returned
    as logits (its log), so ``softmax(logits)`` is the averaged probability.

    Args:
        net: a 2D or 3D network; ``net(x).logits`` (or ``net(x)``) is ``(B, C, *spatial)``.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> NetOutput:
        prob = None
        for dims in FLIPS:
            out = self.net(torch.flip(x, dims) if dims else x)
            logits = out.logits if hasattr(out, "logits") else out
            p = torch.softmax(logits.float(), dim=1)
            p = torch.flip(p, dims) if dims else p
            prob = p if prob is None else prob + p
        return NetOutput(torch.log((prob / len(FLIPS)).clamp_min(1e-12)), {})
