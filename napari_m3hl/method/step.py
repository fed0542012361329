"""One training step: its schedule, its device setup and its losses.

One M³HL step (batch B = B/2 labeled + B/2 unlabeled, each split into a/b
halves of n = B/4):

1. teacher (no grad) on [u_a; u_b] → pseudo-labels p_a, p_b and features;
2. one block mask M per sample (n masks, shared by both mixes);
3. mix_u = u_a·M + l_a·(1−M) with target p_a·M + y_a·(1−M);
   mix_l = l_b·M + u_b·(1−M) with target y_b·M + p_b·(1−M);
4. student on [mix_u; mix_l] → L_mix (Eq. 3; pseudo regions weighted α),
   L_low and L_high against the teacher's unlabeled features (Eq. 4, 5);
5. L = mix_weight·L_mix + λ·(L_low + L_high); SGD step; EMA update
   (the last two in :func:`napari_m3hl.training.trainer.train`).

``config.sup_weight > 0`` (not in the paper; for fine-tuning a trained model)
adds ``sup_weight·(CE + Dice)`` of the labeled images unmixed, which then go
through the student in the same forward as the mixed ones;
``config.unsup_rampup`` ramps ``L_mix`` and ``L_HL`` in from 0 beside it
(:func:`unsup_weight_at`), so a fine-tune starts supervised.

Speed (``config.precision``, ``channels_last``, ``readback_every``; see
:class:`StepSetup`): the step runs on the training device, 2D nets and
batches are NHWC (channels_last), the forward passes run under bf16 autocast
where the device computes bf16 natively (losses in fp32), and on GPUs the
losses are read back to the host only every ``readback_every`` steps
(:func:`read_back`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from napari_m3hl.config import TrainConfig
from napari_m3hl.method.losses import high_level_loss, low_level_loss, mix_loss, seg_loss
from napari_m3hl.method.mixing import block_masks, mix
from napari_m3hl.runtime import autocast_context, resolve_precision
from napari_m3hl.method.teacher import pseudo_labels, pseudo_labels_rounds, set_labelling_mode


def alpha_at(config: TrainConfig, iteration: int) -> float:
    """α at 0-based ``iteration``: ramped linearly from 0 over the first
    ``alpha_rampup`` M³HL iterations (those after ``warm_start``), else constant."""
    if config.alpha_rampup <= 0:
        return config.alpha
    return config.alpha * min(1.0, (iteration - config.warm_iterations + 1) / config.alpha_rampup)


def unsup_weight_at(config: TrainConfig, iteration: int) -> float:
    """Factor on L_mix and L_HL at 0-based ``iteration``: ramped linearly from
    0 to 1 over the first ``unsup_rampup`` M³HL iterations (those after
    ``warm_start``), else 1. The unmixed supervised term (``sup_weight``) is
    not ramped, so a fine-tune starts as a supervised one."""
    if config.unsup_rampup <= 0:
        return 1.0
    return max(0.0, min(1.0, (iteration - config.warm_iterations) / config.unsup_rampup))


def learning_rate(config: TrainConfig, iteration: int) -> float:
    """Learning rate at 0-based ``iteration`` for the configured schedule; the
    M³HL iterations after a warm start take ``m3hl_lr_scale`` times it."""
    if config.lr_schedule == "poly":
        lr = config.lr * (1.0 - iteration / config.iterations) ** 0.9
    elif config.lr_schedule == "step":
        lr = config.lr * 0.1 ** (iteration // config.lr_step)
    else:
        lr = config.lr
    warm = config.warm_iterations
    return lr * config.m3hl_lr_scale if warm > 0 and iteration >= warm else lr


@dataclass
class StepSetup:
    """How the step runs on its device (resolved once from the config).

    Attributes:
        device: the training device.
        amp_dtype: autocast dtype (``torch.bfloat16``) or None for fp32.
        memory_format: ``torch.channels_last`` for 2D nets when enabled, else
            ``torch.contiguous_format``.
        readback_every: steps between loss read-backs to the host.
    """

    device: torch.device
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    readback_every: int

    @classmethod
    def from_config(cls, config: TrainConfig, device: torch.device) -> "StepSetup":
        amp_dtype = resolve_precision(config.precision if config.amp else "fp32", device)
        fmt = torch.channels_last if (config.channels_last and config.ndim == 2) else torch.contiguous_format
        every = config.readback_every or (1 if device.type == "cpu" else 25)
        return cls(device, amp_dtype, fmt, every)

    def autocast(self):
        """A fresh autocast context (disabled for fp32)."""
        return autocast_context(self.device, self.amp_dtype)

    @property
    def precision(self) -> str:
        return "bf16" if self.amp_dtype == torch.bfloat16 else "fp32"



@dataclass
class StepResult:
    """One step's loss terms (0-d tensors, ``total`` the one to back-propagate),
    for M³HL steps the first sample's mix for ``MixPreview``: (images, targets,
    masks), and with ``lcc_rounds`` whether the pseudo-labels' components had
    converged (0-d bool tensor)."""

    losses: dict[str, torch.Tensor]
    preview: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    lcc_converged: torch.Tensor | None = None


def m3hl_losses(
    config: TrainConfig,
    student: nn.Module,
    teacher: nn.Module,
    img_l: torch.Tensor,
    lab_l: torch.Tensor,
    img_u: torch.Tensor,
    gen: torch.Generator | None,
    autocast: Any,
    alpha: float | torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    lcc_rounds: int | None = None,
    unsup: float | torch.Tensor = 1.0,
) -> StepResult:
    """Loss terms of one M³HL step (see the module docstring).

    Args:
        img_l: (2n, C, *S) labeled images, lab_l: (2n, *S) int64 labels,
        img_u: (2n, C, *S) unlabeled images.
        gen: CPU generator of the block masks (unused when ``mask`` is given).
        alpha: weight of the pseudo-labelled regions (None: ``config.alpha``;
            a 0-d tensor in a captured step).
        mask: (n, *S) block masks drawn by the caller (a captured step), else
            drawn here from ``gen``.
        lcc_rounds: the pseudo-labels' largest components in exactly this
            many rounds on the device, no host synchronisation (a captured
            step; ``StepResult.lcc_converged`` says whether they converged);
            None: :func:`napari_m3hl.method.teacher.pseudo_labels` (run to convergence).
        unsup: factor on ``mix_weight·L_mix`` and ``λ·L_HL``
            (:func:`unsup_weight_at`; a 0-d tensor in a captured step).
    """
    alpha = config.alpha if alpha is None else alpha
    n = img_l.shape[0] // 2
    la, lb = img_l[:n], img_l[n:]
    ya, yb = lab_l[:n], lab_l[n:]
    ua, ub = img_u[:n], img_u[n:]
    tap = config.low_tap

    set_labelling_mode(teacher, config.teacher_mode, config.teacher_bn)
    with torch.no_grad(), autocast():
        t_out = teacher(img_u)
    converged = None
    if lcc_rounds is not None and config.pseudo_lcc:
        plab, converged = pseudo_labels_rounds(t_out.logits.float(), lcc_rounds)
    else:
        plab = pseudo_labels(t_out.logits.float(), lcc=config.pseudo_lcc)
    pa, pb = plab[:n], plab[n:]

    spatial = tuple(img_l.shape[2:])
    m = mask if mask is not None else block_masks(n, spatial, config.block_size, config.mask_ratio, generator=gen,
                                                  device=img_l.device)
    mix_u = mix(ua, la, m)
    mix_l = mix(lb, ub, m)
    tgt_u = mix(pa, ya, m)  # pseudo where M = 1
    tgt_l = mix(yb, pb, m)  # pseudo where M = 0

    losses: dict[str, torch.Tensor] = {}
    student.train()
    if config.use_mix:
        anchored = config.sup_weight > 0  # the labeled images unmixed ride in the same forward (and BatchNorm batch)
        with autocast():
            s_out = student(torch.cat([mix_u, mix_l, img_l]) if anchored else torch.cat([mix_u, mix_l]))
        logits_u, logits_l = s_out.logits[:n], s_out.logits[n:2 * n]
        losses["mix"] = (mix_loss(logits_u, tgt_u, m, alpha, 1.0, config.mix_dice)
                          + mix_loss(logits_l, tgt_l, m, 1.0, alpha, config.mix_dice))
        total = unsup * config.mix_weight * losses["mix"]
        if anchored:
            losses["sup"] = seg_loss(s_out.logits[2 * n:], lab_l)
            total = total + config.sup_weight * losses["sup"]
        s_feats = s_out.features
        f_mix = (s_feats[tap][:n], s_feats[tap][n:2 * n]), (s_feats["high"][:n], s_feats["high"][n:2 * n])
    else:  # HL-only ablation: supervised loss on the labeled images, mixed images for L_HL only
        with autocast():
            s_out = student(torch.cat([img_l, mix_u, mix_l]))
        losses["sup"] = seg_loss(s_out.logits[: 2 * n], lab_l)
        total = losses["sup"]
        f = s_out.features
        f_mix = (f[tap][2 * n : 3 * n], f[tap][3 * n :]), (f["high"][2 * n : 3 * n], f["high"][3 * n :])
    if config.use_hl:
        t_feats = t_out.features
        f_u_low = (t_feats[tap][:n], t_feats[tap][n:])
        f_u_high = (t_feats["high"][:n], t_feats["high"][n:])
        losses["low"] = low_level_loss(f_mix[0], f_u_low)
        losses["high"] = high_level_loss(f_mix[1], f_u_high)
        total = total + unsup * config.lam * (losses["low"] + losses["high"])
    losses["total"] = total
    preview = (torch.stack([mix_u[0, 0], mix_l[0, 0]]), torch.stack([tgt_u[0], tgt_l[0]]), torch.stack([m[0], 1 - m[0]]))
    return StepResult(losses, preview, converged)


def supervised_losses(config: TrainConfig, student: nn.Module, img_l: torch.Tensor, lab_l: torch.Tensor, autocast: Any) -> StepResult:
    """CE + Dice on the labeled images only (the supervised baseline)."""
    student.train()
    with autocast():
        out = student(img_l)
    loss = seg_loss(out.logits, lab_l)
    return StepResult({"sup": loss, "total": loss})


def read_back(pending: list[tuple[int, dict[str, torch.Tensor]]]) -> tuple[dict[str, float], int | None]:
    """Copy the losses of the last steps to the host in one transfer.

    Args:
        pending: (iteration, {name: 0-d loss tensor}) per step since the last read-back.

    Returns:
        (mean of each loss over those steps, first iteration whose losses are
        not finite or None).
    """
    names = list(pending[0][1])
    table = torch.stack([torch.stack([ls[k].float() for k in names]) for _, ls in pending]).cpu()  # (steps, losses)
    finite = torch.isfinite(table).all(dim=1)
    bad = None if bool(finite.all()) else pending[int((~finite).nonzero()[0])][0]
    return dict(zip(names, (float(v) for v in table.mean(dim=0)))), bad
