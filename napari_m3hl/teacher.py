"""Mean teacher: EMA of the student and pseudo-labels."""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
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

    Integer buffers (BatchNorm's ``num_batches_tracked``) are always copied.
    Uses ``torch._foreach`` ops: one fused update per tensor list, no
    state_dict rebuild.
    """
    if buffers not in ("copy", "ema"):
        raise ValueError(f"buffers must be 'copy' or 'ema', got {buffers!r}")
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    t_buf, s_buf = list(teacher.buffers()), list(student.buffers())
    t_float = [b for b in t_buf if b.is_floating_point()]
    s_float = [b for b in s_buf if b.is_floating_point()]
    if buffers == "ema":
        torch._foreach_lerp_(t_params + t_float, s_params + s_float, 1.0 - decay)
    else:
        torch._foreach_lerp_(t_params, s_params, 1.0 - decay)
        torch._foreach_copy_(t_float, s_float)
    for tb, sb in zip(t_buf, s_buf):
        if not tb.is_floating_point():
            tb.copy_(sb)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """EMA decay at optimiser step ``step`` (0-based): ``min(decay, 1 − 1/(step+1))``
    with warm-up (the original mean teacher), else constant ``decay``."""
    return min(decay, 1.0 - 1.0 / (step + 1)) if warmup else decay


def largest_component_per_class(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Keep only the largest connected component of each class in each sample.

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
            comp, n = ndimage.label(mask)
            if n <= 1:
                continue
            sizes = np.bincount(comp.ravel())
            sizes[0] = 0
            out[i][mask & (comp != sizes.argmax())] = 0
    return out


def pseudo_labels(logits: torch.Tensor, lcc: bool = True) -> torch.Tensor:
    """Pseudo-labels from teacher logits.

    Softmax → argmax (for two classes this is foreground probability ≥ 0.5),
    then optionally the largest connected component per class and sample.

    Args:
        logits: (B, C, *S).

    Returns:
        (B, *S) int64 on the logits' device.
    """
    labels = logits.argmax(dim=1)
    if not lcc:
        return labels
    filtered = largest_component_per_class(labels.cpu().numpy(), logits.shape[1])
    return torch.from_numpy(filtered).to(logits.device)
