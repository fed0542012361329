"""Mean teacher: EMA of the student and pseudo-labels."""
from __future__ import annotations

import torch
from torch import nn

from napari_m3hl.method.components import (
    largest_component_per_class, largest_component_per_class_rounds, largest_component_per_class_torch,
)


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
def ema_update(teacher: nn.Module, student: nn.Module, decay: float | torch.Tensor, buffers: str = "copy") -> None:
    """``θ_t ← decay·θ_t + (1−decay)·θ_s`` for the parameters (``decay`` a number,
    or a 0-d tensor on the networks' device, as in a captured step).

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
        _lerp_(t_params + t_float, s_params + s_float, 1.0 - decay)
    else:
        _lerp_(t_params, s_params, 1.0 - decay)
        if buffers == "copy":
            torch._foreach_copy_(t_float, s_float)
    for tb, sb in zip(t_buf, s_buf):
        if not tb.is_floating_point():
            tb.copy_(sb)


def _lerp_(targets: list[torch.Tensor], sources: list[torch.Tensor], weight: float | torch.Tensor) -> None:
    """``t ← t + weight·(s − t)`` for each pair, in foreach ops. A tensor weight
    goes through ``_foreach_mul_`` (``_foreach_lerp_`` takes only numbers and
    would read a tensor back to the host, which a CUDA graph cannot capture)."""
    if not isinstance(weight, torch.Tensor):
        torch._foreach_lerp_(targets, sources, weight)
        return
    diff = torch._foreach_sub(sources, targets)
    torch._foreach_mul_(diff, weight)
    torch._foreach_add_(targets, diff)


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


def pseudo_labels_rounds(logits: torch.Tensor, rounds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pseudo_labels` with the largest components found in exactly
    ``rounds`` rounds on the logits' device, with no host synchronisation
    (a captured step). Returns ((B, *S) int64 labels, 0-d bool: the
    components had converged, so the labels equal :func:`pseudo_labels`')."""
    return largest_component_per_class_rounds(logits.argmax(dim=1), logits.shape[1], rounds)
