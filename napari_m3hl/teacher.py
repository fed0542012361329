"""Mean teacher: EMA of the student and pseudo-labels."""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
import torch.nn.functional as F
from torch import nn


def init_teacher(teacher: nn.Module, student: nn.Module, mode: str = "copy") -> None:
    """Initialise the teacher: ``"copy"`` the student's weights, or keep its own
    ``"independent"`` random initialisation (the reference code)."""
    if mode == "copy":
        teacher.load_state_dict(student.state_dict())
    elif mode != "independent":
        raise ValueError(f"teacher init must be 'copy' or 'independent', got {mode!r}")
    for p in teacher.parameters():
        p.requires_grad_(False)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, buffers: str = "copy") -> None:
    """``θ_t ← decay·θ_t + (1−decay)·θ_s`` for the parameters.

    BatchNorm running statistics (floating buffers):

    * ``"copy"`` (default): the teacher takes the student's buffers as they are.
      EMA-averaging them would keep a ``decay**t`` share of their initial values
      (mean 0, variance 1) for hundreds of steps, far from the statistics the
      averaged weights produce, and an eval-mode teacher then labels everything
      background early in a run.
    * ``"ema"``: the same EMA as the parameters (what a state_dict-wide EMA, as
      in the authors' released code, does).
    * ``"own"``: left alone: the teacher keeps statistics of its own
      activations, updated by its labelling passes (:func:`set_labelling_mode`).

    Integer buffers (BatchNorm's ``num_batches_tracked``) are always copied.
    Uses ``torch._foreach`` ops: one fused update per tensor list, no
    state_dict rebuild.
    """
    if buffers not in ("copy", "ema", "own"):
        raise ValueError(f"buffers must be 'copy', 'ema' or 'own', got {buffers!r}")
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    t_buf, s_buf = list(teacher.buffers()), list(student.buffers())
    t_float = [b for b in t_buf if b.is_floating_point()]
    s_float = [b for b in s_buf if b.is_floating_point()]
    if buffers == "ema":
        torch._foreach_lerp_(t_params + t_float, s_params + s_float, 1.0 - decay)
    else:
        torch._foreach_lerp_(t_params, s_params, 1.0 - decay)
        if buffers == "copy":
            torch._foreach_copy_(t_float, s_float)
    for tb, sb in zip(t_buf, s_buf):
        if not tb.is_floating_point():
            tb.copy_(sb)


def set_labelling_mode(teacher: nn.Module, teacher_mode: str, teacher_bn: str) -> None:
    """Put the teacher in the mode it labels in.

    ``teacher_mode="train"``: dropout and batch-statistics BatchNorm (the
    reference code). ``"eval"``: no dropout; BatchNorm normalises with the
    running statistics, except with ``teacher_bn="own"``, where BatchNorm
    normalises with the statistics of the batch being labelled and updates
    the running statistics from the teacher's own activations (so that they
    fit the averaged weights for eval-mode previews).
    """
    teacher.train(teacher_mode == "train")
    if teacher_mode != "train" and teacher_bn == "own":
        for m in teacher.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """EMA decay at optimiser step ``step`` (0-based): ``min(decay, 1 − 1/(step+1))``
    with warm-up (the original mean teacher), else constant ``decay``."""
    return min(decay, 1.0 - 1.0 / (step + 1)) if warmup else decay


def largest_component_per_class(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Keep only the largest connected component of each class in each sample.

    Components use FULL connectivity (8 neighbours in 2D, 26 in 3D), as the
    reference code's ``skimage.measure.label``. Ties go to the component met
    first in raster order.

    Args:
        labels: (B, *S) integer label maps (2D slices or 3D volumes).
        num_classes: classes 1..num_classes-1 are filtered; pixels outside a
            class's largest component become background. A class with no
            component stays as it is.

    Returns:
        a filtered copy, same shape and dtype.
    """
    out = labels.copy()
    structure = ndimage.generate_binary_structure(labels.ndim - 1, labels.ndim - 1)
    for i in range(labels.shape[0]):
        for c in range(1, num_classes):
            mask = labels[i] == c
            comp, n = ndimage.label(mask, structure=structure)
            if n <= 1:
                continue
            sizes = np.bincount(comp.ravel())
            sizes[0] = 0
            out[i][mask & (comp != sizes.argmax())] = 0
    return out


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
    rounds = 0
    while True:
        prev = v
        v = pool(v.unsqueeze(1), 3, stride=1, padding=1).squeeze(1) * fgf
        # pointer jumping: the label of the pixel whose index the label names
        ptr = (n - v).long().clamp_(0, n - 1) + offsets
        v = torch.maximum(v, v.reshape(-1)[ptr.reshape(-1)].reshape(v.shape) * fgf)
        rounds += 1
        if rounds % check_every == 0 and torch.equal(v, prev):
            break
    return torch.where(fg, (n - v).long() + 1, torch.zeros((), dtype=torch.long, device=fg.device))


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
    b = labels.shape[0]
    spatial = labels.shape[1:]
    n = labels[0].numel()
    classes = torch.arange(1, num_classes, device=labels.device).reshape(1, -1, *([1] * len(spatial)))
    masks = labels.unsqueeze(1) == classes  # (B, C-1, *S)
    comp = connected_components_torch(masks.reshape(-1, *spatial), check_every).reshape(b * (num_classes - 1), n)
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


def pseudo_labels(logits: torch.Tensor, lcc: bool = True, on_device: bool | None = None) -> torch.Tensor:
    """Pseudo-labels from teacher logits.

    Softmax → argmax (for two classes this is foreground probability ≥ 0.5),
    then optionally the largest connected component (full connectivity) per
    class and sample.

    Args:
        logits: (B, C, *S).
        lcc: filter to the largest component per class.
        on_device: filter with the torch implementation on the logits'
            device (no host copy); None = on CUDA/MPS only (on the CPU,
            scipy's labelling is faster).

    Returns:
        (B, *S) int64 on the logits' device.
    """
    labels = logits.argmax(dim=1)
    if not lcc:
        return labels
    if on_device is None:
        on_device = logits.device.type != "cpu"
    if on_device:
        return largest_component_per_class_torch(labels, logits.shape[1], check_every=1 if logits.device.type == "cpu" else 8)
    filtered = largest_component_per_class(labels.cpu().numpy(), logits.shape[1])
    return torch.from_numpy(filtered).to(logits.device)
