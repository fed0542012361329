"""Largest connected components: scipy on the CPU, torch on the device.

One connectivity everywhere: full (8 neighbours in 2D, 26 in 3D), the default
of ``skimage.measure.label`` that the reference code's ``getLargestCC`` uses.
Ties go to the component met first in raster (C) order. Users: the teacher's
pseudo-labels (:func:`napari_m3hl.method.teacher.pseudo_labels`: scipy on the CPU,
the torch version on CUDA/MPS) and the 3D sliding window's ``keep_largest``
(:func:`napari_m3hl.inference.slices2d.predict_volume_3d`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from napari_m3hl.errors import M3HLInputError


def largest_component(mask: np.ndarray, connectivity: int | None = None) -> np.ndarray:
    """Largest connected component of a binary mask (any ndim).

    Args:
        mask: boolean (or 0/1) array.
        connectivity: neighbourhood rank for :func:`scipy.ndimage.generate_binary_structure`;
            ``None`` = full connectivity (``mask.ndim``: 8 neighbours in 2D,
            26 in 3D), the package's connectivity; 1 = face neighbours only.

    Returns:
        bool array of the same shape; all False if the mask is empty. Ties
        go to the component met first in C (raster) order.
    """
    m = np.asarray(mask)
    if m.ndim == 0:
        raise M3HLInputError("`mask` must be an array with at least one dimension.")
    m = m.astype(bool)
    if not m.any():
        return np.zeros(m.shape, dtype=bool)
    rank = m.ndim if connectivity is None else int(connectivity)
    if rank < 1:
        raise M3HLInputError(f"`connectivity` must be >= 1 or None, got {connectivity!r}.")
    structure = ndimage.generate_binary_structure(m.ndim, rank)
    lab, n = ndimage.label(m, structure=structure)
    if n == 1:
        return m.copy()
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(sizes.argmax())


def largest_component_per_class(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Keep only the largest connected component of each class in each sample.

    Full connectivity, as :func:`largest_component`.

    Args:
        labels: (B, *S) integer label maps (2D slices or 3D volumes).
        num_classes: classes 1..num_classes-1 are filtered; pixels outside a
            class's largest component become background. A class with no
            component stays as it is.

    Returns:
        a filtered copy, same shape and dtype.
    """
    out = labels.copy()
    for i in range(labels.shape[0]):
        for c in range(1, num_classes):
            mask = labels[i] == c
            out[i][mask & ~largest_component(mask)] = 0
    return out


def _cc_start(mask: torch.Tensor):
    """Initial state of the min-label propagation: (foreground, values, fg as float, offsets, n, pool)."""
    if mask.dim() not in (3, 4):
        raise ValueError(f"mask must be (B, H, W) or (B, D, H, W), got shape {tuple(mask.shape)}")
    fg = mask.bool()
    b = fg.shape[0]
    n = fg[0].numel()
    # values n - index, larger = earlier; float32 is exact up to 2**24 voxels per sample
    dtype = torch.float32 if n < 2**24 else torch.float64
    idx = torch.arange(n, device=fg.device, dtype=dtype).reshape(fg.shape[1:])
    fgf = fg.to(dtype)
    v = (n - idx).unsqueeze(0) * fgf
    pool = F.max_pool2d if fg.dim() == 3 else F.max_pool3d
    offsets = (torch.arange(b, device=fg.device) * n).reshape(b, *([1] * (fg.dim() - 1)))
    return fg, v, fgf, offsets, n, pool


def _cc_round(v: torch.Tensor, fgf: torch.Tensor, offsets: torch.Tensor, n: int, pool) -> torch.Tensor:
    """One round: the largest value in the 3×3 (3×3×3) neighbourhood, then
    pointer jumping (the value of the pixel whose index the value names)."""
    v = pool(v.unsqueeze(1), 3, stride=1, padding=1).squeeze(1) * fgf
    ptr = (n - v).long().clamp_(0, n - 1) + offsets
    return torch.maximum(v, v.reshape(-1)[ptr.reshape(-1)].reshape(v.shape) * fgf)


def _cc_labels(fg: torch.Tensor, v: torch.Tensor, n: int) -> torch.Tensor:
    return torch.where(fg, (n - v).long() + 1, torch.zeros((), dtype=torch.long, device=fg.device))


def connected_components_torch(mask: torch.Tensor, check_every: int = 1) -> torch.Tensor:
    """Connected components of binary masks with full connectivity, on the
    masks' device (no host round trip except the convergence test).

    Min-label propagation: every foreground pixel starts with its own raster
    index, takes the smallest index in its 3×3 (3×3×3) neighbourhood, then
    jumps to the label of the pixel its label points at (pointer jumping, so
    long components converge in few rounds). Runs until nothing changes.

    Args:
        mask: (B, H, W) or (B, D, H, W) bool/0-1 masks, one per sample.
        check_every: rounds between convergence tests (each test is one
            device → host sync; >1 saves syncs on GPUs).

    Returns:
        int64 tensor of the mask's shape: 0 on background; on foreground
        ``1 +`` the raster index (within its sample) of the component's first
        pixel, so labels are ordered like scipy's (first met, smallest).
    """
    fg, v, fgf, offsets, n, pool = _cc_start(mask)
    rounds = 0
    while True:
        prev = v
        v = _cc_round(v, fgf, offsets, n, pool)
        rounds += 1
        if rounds % check_every == 0 and torch.equal(v, prev):
            break
    return _cc_labels(fg, v, n)


def connected_components_rounds(mask: torch.Tensor, rounds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`connected_components_torch` in exactly ``rounds`` rounds, with no
    host synchronisation (what a CUDA graph can capture).

    Returns:
        (labels as :func:`connected_components_torch`'s once converged, a 0-d
        bool tensor: whether the last round changed nothing, i.e. the labels
        are the converged ones).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    fg, v, fgf, offsets, n, pool = _cc_start(mask)
    prev = v
    for _ in range(rounds):
        prev, v = v, _cc_round(v, fgf, offsets, n, pool)
    return _cc_labels(fg, v, n), (v == prev).all()


def _keep_largest(labels: torch.Tensor, comp: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``labels`` with every pixel outside its class's largest component (per
    sample; ``comp``: (B·(C−1), n) component labels) set to background."""
    b = labels.shape[0]
    spatial = labels.shape[1:]
    n = labels[0].numel()
    # component sizes per (sample, class): count pixels per label
    sizes = torch.zeros(b * (num_classes - 1), n + 1, dtype=torch.long, device=labels.device)
    sizes.scatter_add_(1, comp, torch.ones_like(comp))
    sizes[:, 0] = 0
    # largest, ties to the smallest label (first met): key = size·(n+1) + (n − label)
    label_ids = torch.arange(n + 1, device=labels.device)
    key = sizes * (n + 1) + (n - label_ids)
    key[:, 0] = -1
    best = key.argmax(dim=1, keepdim=True)  # (B·(C−1), 1)
    keep = (comp == best) | (comp == 0)
    drop = (~keep).reshape(b, num_classes - 1, *spatial).any(dim=1)
    return labels.masked_fill(drop, 0)


def _class_masks(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    spatial = labels.shape[1:]
    classes = torch.arange(1, num_classes, device=labels.device).reshape(1, -1, *([1] * len(spatial)))
    return (labels.unsqueeze(1) == classes).reshape(-1, *spatial)  # (B·(C−1), *S)


def largest_component_per_class_torch(labels: torch.Tensor, num_classes: int, check_every: int = 1) -> torch.Tensor:
    """Device version of :func:`largest_component_per_class` (same result,
    full connectivity, same tie rule).

    Args:
        labels: (B, *S) int64 label maps on any device.
        num_classes: classes 1..num_classes-1 are filtered.
        check_every: see :func:`connected_components_torch`.

    Returns:
        a filtered copy, (B, *S), same dtype and device.
    """
    if num_classes < 2:
        return labels.clone()
    comp = connected_components_torch(_class_masks(labels, num_classes), check_every)
    return _keep_largest(labels, comp.reshape(comp.shape[0], -1), num_classes)


def largest_component_per_class_rounds(labels: torch.Tensor, num_classes: int,
                                       rounds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`largest_component_per_class_torch` with the components found in
    exactly ``rounds`` rounds (:func:`connected_components_rounds`; no host
    synchronisation). Returns (filtered labels, 0-d bool: converged)."""
    if num_classes < 2:
        return labels.clone(), torch.ones((), dtype=torch.bool, device=labels.device)
    comp, converged = connected_components_rounds(_class_masks(labels, num_classes), rounds)
    return _keep_largest(labels, comp.reshape(comp.shape[0], -1), num_classes), converged
