"""Mutual mask mix (M³, paper Eq. 2).

A block mask ``M`` splits the input into a grid of blocks; exactly
``round(ratio * n_blocks)`` blocks per sample are set to 0 ("masked"), the
rest are 1. ``mix(a, b, M) = a·M + b·(1−M)``: ``a`` shows where ``M = 1``.
With the paper's ``X_lumix = X_u·M + X_l·(1−M)`` the mask ratio is therefore
the share of the image taken from the labeled image.

Grids use ``ceil(size / block)`` blocks per axis, so an input that is not a
multiple of the block size gets partial blocks at its far edges (they count
as whole blocks when choosing which to mask). Everything is vectorised: one
random draw per (sample, block), a top-k by ``argsort``, then nearest
up-sampling of the block grid to the input size, on the input's device.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def block_grid(spatial: Sequence[int], block: Sequence[int]) -> tuple[int, ...]:
    """Number of blocks per axis, ``ceil(size / block)``."""
    if len(spatial) != len(block):
        raise ValueError(f"block size {tuple(block)} has {len(block)} axes, input {tuple(spatial)} has {len(spatial)}")
    if any(b <= 0 for b in block):
        raise ValueError(f"block size must be positive, got {tuple(block)}")
    return tuple(math.ceil(s / b) for s, b in zip(spatial, block))


def block_masks(
    n: int,
    spatial: Sequence[int],
    block: Sequence[int],
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Random block masks, one per sample.

    Args:
        n: number of masks (samples).
        spatial: input size, (H, W) or (D, H, W) in pixels/voxels.
        block: block size per axis, same length as ``spatial``.
        ratio: share of blocks set to 0, in [0, 1].
        generator: CPU generator for reproducible masks.
        device: where the returned mask lives.

    Returns:
        float32 tensor (n, *spatial) of 0/1; each sample has exactly
        ``round(ratio * prod(grid))`` zero blocks.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1], got {ratio}")
    grid = block_grid(spatial, block)
    n_blocks = math.prod(grid)
    k = int(round(ratio * n_blocks))
    scores = torch.rand(n, n_blocks, generator=generator)
    ranks = scores.argsort(dim=1).argsort(dim=1)  # rank of each block, 0..n_blocks-1
    # non_blocking: a blocking host-to-device copy would wait for the device's queued work
    small = (ranks >= k).to(torch.float32).reshape(n, *grid).to(device, non_blocking=True)
    for axis, b in enumerate(block):
        small = small.repeat_interleave(int(b), dim=axis + 1)
    index = (slice(None),) + tuple(slice(0, s) for s in spatial)
    return small[index].contiguous()


def mix(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``a·M + b·(1−M)`` for images or label maps.

    Args:
        a, b: images (n, C, *spatial) float, or label maps (n, *spatial) integer.
        mask: (n, *spatial) 0/1 from :func:`block_masks`.

    Returns:
        the mixed tensor, same shape and dtype as ``a``.
    """
    if a.shape != b.shape:
        raise ValueError(f"cannot mix tensors of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.is_floating_point():
        m = mask.unsqueeze(1) if a.dim() == mask.dim() + 1 else mask
        return a * m + b * (1 - m)
    return torch.where(mask.bool(), a, b)
