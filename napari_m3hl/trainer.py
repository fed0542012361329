"""The M³HL training loop as a generator of events.

``train(config, data, out_dir)`` yields :mod:`napari_m3hl.events` while it
trains; the CLI prints them and the napari widget draws them from a worker
thread. A :class:`TrainControl` pauses, resumes or stops the loop from
another thread; a stop always ends with a saved checkpoint.

One M³HL step (batch B = B/2 labeled + B/2 unlabeled, each split into a/b
halves of n = B/4):

1. teacher (no grad) on [u_a; u_b] → pseudo-labels p_a, p_b and features;
2. one block mask M per sample (n masks, shared by both mixes);
3. mix_u = u_a·M + l_a·(1−M) with target p_a·M + y_a·(1−M);
   mix_l = l_b·M + u_b·(1−M) with target y_b·M + p_b·(1−M);
4. student on [mix_u; mix_l] → L_mix (Eq. 3; pseudo regions weighted α),
   L_low and L_high against the teacher's unlabeled features (Eq. 4, 5);
5. L = mix_weight·L_mix + λ·(L_low + L_high); SGD step; EMA update.
"""
from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from . import events as ev
from .checkpoint import check_compatible, load_checkpoint, make_payload, save_checkpoint
from .config import TrainConfig
from .errors import M3HLInputError
from .losses import high_level_loss, low_level_loss, mix_loss, seg_loss
from .mixing import block_masks, mix
from .networks import build_network, network_ndim
from .runtime import resolve_device, tune_malloc
from .teacher import ema_decay_at, ema_update, init_teacher, pseudo_labels


class TrainControl:
    """Thread-safe pause / resume / stop requests for a running :func:`train`."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()

    def stop(self) -> None:
        self._stop.set()
        self._running.set()

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def wait_while_paused(self) -> None:
        while not self._running.wait(0.1):
            pass


class _Cycler:
    """Endless shuffled passes over ``range(n)``."""

    def __init__(self, n: int, rng: np.random.Generator) -> None:
        self.n, self.rng = n, rng
        self.order: list[int] = []

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if not self.order:
                self.order = [int(i) for i in self.rng.permutation(self.n)]
            out.append(int(self.order.pop()))
        return out


def learning_rate(config: TrainConfig, iteration: int) -> float:
    """Learning rate at 0-based ``iteration`` for the configured schedule."""
    if config.lr_schedule == "poly":
        return config.lr * (1.0 - iteration / config.iterations) ** 0.9
    if config.lr_schedule == "step":
        return config.lr * 0.1 ** (iteration // config.lr_step)
    return config.lr


def _make_batch(samples: list, config: TrainConfig, gen: torch.Generator, device: torch.device):
    from .augment import prepare_batch_2d, prepare_batch_3d

    if config.ndim == 2:
        return prepare_batch_2d(samples, tuple(config.patch_size), gen, device, image_interp=config.image_interp)
    return prepare_batch_3d(samples, tuple(config.patch_size), gen, device)


def _rng_state(gen: torch.Generator, np_rng: np.random.Generator, cyclers: Sequence[_Cycler]) -> dict[str, Any]:
    return {
        "torch": gen.get_state(),
        "torch_global": torch.get_rng_state(),
        "numpy": json.dumps(np_rng.bit_generator.state),
        "cyclers": json.dumps([c.order for c in cyclers]),
    }


def _restore_rng(state: dict[str, Any], gen: torch.Generator, np_rng: np.random.Generator, cyclers: Sequence[_Cycler]) -> None:
    gen.set_state(state["torch"])
    torch.set_rng_state(state["torch_global"])
    np_rng.bit_generator.state = json.loads(state["numpy"])
    for c, order in zip(cyclers, json.loads(state["cyclers"])):
        c.order = [int(i) for i in order if int(i) < c.n]  # the data may have changed ("train on")


@dataclass
class _StepResult:
    losses: dict[str, torch.Tensor]
    preview: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def m3hl_losses(
    config: TrainConfig,
    student: nn.Module,
    teacher: nn.Module,
    img_l: torch.Tensor,
    lab_l: torch.Tensor,
    img_u: torch.Tensor,
    gen: torch.Generator,
    autocast: Any,
) -> _StepResult:
    """Loss terms of one M³HL step (see the module docstring).

    Args:
        img_l: (2n, C, *S) labeled images, lab_l: (2n, *S) int64 labels,
        img_u: (2n, C, *S) unlabeled images.
    """
    n = img_l.shape[0] // 2
    la, lb = img_l[:n], img_l[n:]
    ya, yb = lab_l[:n], lab_l[n:]
    ua, ub = img_u[:n], img_u[n:]
    tap = config.low_tap

    teacher.train(config.teacher_mode == "train")
    with torch.no_grad(), autocast():
        t_out = teacher(img_u)
    plab = pseudo_labels(t_out.logits.float(), lcc=config.pseudo_lcc)
    pa, pb = plab[:n], plab[n:]

    spatial = tuple(img_l.shape[2:])
    m = block_masks(n, spatial, config.block_size, config.mask_ratio, generator=gen, device=img_l.device)
    mix_u = mix(ua, la, m)
    mix_l = mix(lb, ub, m)
    tgt_u = mix(pa, ya, m)  # pseudo where M = 1
    tgt_l = mix(yb, pb, m)  # pseudo where M = 0

    losses: dict[str, torch.Tensor] = {}
    student.train()
    if config.use_mix:
        with autocast():
            s_out = student(torch.cat([mix_u, mix_l]))
        logits_u, logits_l = s_out.logits[:n], s_out.logits[n:]
        losses["mix"] = mix_loss(logits_u, tgt_u, m, config.alpha, 1.0) + mix_loss(logits_l, tgt_l, m, 1.0, config.alpha)
        total = config.mix_weight * losses["mix"]
        s_feats = s_out.features
        f_mix = (s_feats[tap][:n], s_feats[tap][n:]), (s_feats["high"][:n], s_feats["high"][n:])
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
        total = total + config.lam * (losses["low"] + losses["high"])
    losses["total"] = total
    preview = (torch.stack([mix_u[0, 0], mix_l[0, 0]]), torch.stack([tgt_u[0], tgt_l[0]]), torch.stack([m[0], 1 - m[0]]))
    return _StepResult(losses, preview)


def supervised_losses(config: TrainConfig, student: nn.Module, img_l: torch.Tensor, lab_l: torch.Tensor, autocast: Any) -> _StepResult:
    """CE + Dice on the labeled images only (the supervised baseline)."""
    student.train()
    with autocast():
        out = student(img_l)
    loss = seg_loss(out.logits, lab_l)
    return _StepResult({"sup": loss, "total": loss})


def _validate(model: nn.Module, volumes: Sequence, config: TrainConfig, device: torch.device) -> tuple[float, dict[str, float]]:
    from .inference import predict_volume_2d, predict_volume_3d
    from .metrics import dice

    scores = np.zeros((len(volumes), config.num_classes - 1))
    for i, (_, image, label) in enumerate(volumes):
        if config.ndim == 2:
            pred = predict_volume_2d(model, image, patch=tuple(config.patch_size), device=device,
                                     resize_input=config.image_interp)
        else:
            pred = predict_volume_3d(model, image, patch=tuple(config.patch_size), device=device, num_classes=config.num_classes)
        for c in range(1, config.num_classes):
            scores[i, c - 1] = dice(pred == c, label == c)
    per_class = {config.class_names[c]: float(scores[:, c - 1].mean()) for c in range(1, config.num_classes)}
    return float(scores.mean()), per_class


def train(
    config: TrainConfig,
    data: Any,
    out_dir: str | Path | None = None,
    *,
    resume_from: str | Path | None = None,
    init_from: str | Path | None = None,
    control: TrainControl | None = None,
    val_volumes: Sequence[tuple[str, np.ndarray, np.ndarray]] | None = None,
    preview_volume: np.ndarray | None = None,
    preview_token: object = None,
    preview_every_s: float | None = None,
    mix_preview_every_s: float | None = None,
) -> Iterator[ev.Event]:
    """Train a student (and its EMA teacher) and yield events.

    Args:
        config: the run's settings (``config.validate()`` is called).
        data: a ``TrainData`` (labeled / unlabeled sample sets, class names).
        out_dir: where ``last.pt``, ``best.pt`` go; None saves nothing.
        resume_from: a checkpoint to continue (weights, teacher, optimiser,
            iteration and random state).
        init_from: a checkpoint or model file whose student weights start the
            training (fine-tuning); iteration starts at 0.
        control: pause / resume / stop from another thread.
        val_volumes: (name, image (D,H,W), label (D,H,W)) for validation every
            ``config.val_every`` iterations; the best student is ``best.pt``.
        preview_volume: (D, H, W) image whose teacher prediction is yielded as
            ``VolumePreview`` every ``preview_every_s`` seconds and at the end.
        mix_preview_every_s: period of ``MixPreview`` events (None: never).
    """
    config.validate()
    tune_malloc()
    control = control or TrainControl()
    if network_ndim(config.arch) != config.ndim:
        raise M3HLInputError(f"architecture {config.arch} does not fit a {config.ndim}D patch size {config.patch_size}")
    if data.num_classes != config.num_classes:
        raise M3HLInputError(
            f"the data have {data.num_classes} classes ({', '.join(data.class_names)}) but the preset has "
            f"{config.num_classes}; set num_classes/class_names to match"
        )
    if len(data.labeled) == 0:
        raise M3HLInputError("no labeled sample: paint at least one slice, or pass a labeled data set")
    device = resolve_device(config.device)
    use_amp = config.amp and device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else torch.autocast("cpu", enabled=False)

    torch.manual_seed(config.seed)
    student = build_network(config.arch, config.in_channels, config.num_classes).to(device)
    teacher = build_network(config.arch, config.in_channels, config.num_classes).to(device)
    optimizer = torch.optim.SGD(student.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    np_rng = np.random.default_rng(config.seed)
    unlabeled = data.unlabeled if len(data.unlabeled) else data.labeled
    cyc_l, cyc_u = _Cycler(len(data.labeled), np_rng), _Cycler(len(unlabeled), np_rng)
    start = 0
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from)
        check_compatible(ckpt, config.arch, config.num_classes, config.in_channels, source=str(resume_from))
        student.load_state_dict(ckpt["student"])
        teacher.load_state_dict(ckpt.get("teacher", ckpt["student"]))
        init_teacher(teacher, student, "independent")
        if "optimizer" in ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
        if "rng" in ckpt:
            _restore_rng(ckpt["rng"], gen, np_rng, (cyc_l, cyc_u))
        start = int(ckpt["iteration"])
    else:
        if init_from is not None:
            ckpt = load_checkpoint(init_from)
            check_compatible(ckpt, config.arch, config.num_classes, config.in_channels, source=str(init_from))
            student.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["student"].items()})
        init_teacher(teacher, student, "copy" if init_from is not None else config.teacher_init)
    for g in optimizer.param_groups:
        g["lr"] = learning_rate(config, start)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    def save(kind: str, iteration: int, model_only: bool = False) -> str | None:
        if out is None:
            return None
        payload = make_payload(
            config, student, teacher, None if model_only else optimizer, iteration,
            None if model_only else _rng_state(gen, np_rng, (cyc_l, cyc_u)), class_names_data=list(data.class_names),
        )
        return str(save_checkpoint(out / f"{kind}.pt", payload))

    def volume_preview(iteration: int) -> ev.VolumePreview:
        from .inference import predict_volume_2d

        labels = predict_volume_2d(teacher, preview_volume, patch=tuple(config.patch_size), device=device,
                                   resize_input=config.image_interp)
        return ev.VolumePreview(iteration, labels, preview_token)

    yield ev.TrainStarted(config.iterations, start, str(device), len(data.labeled), len(data.unlabeled), config.mode)
    half = config.batch_size // 2
    t0 = time.perf_counter()
    # the first previews follow the first step (then one per period), so a user sees them at once
    last_vol = t0 - (preview_every_s or 0.0)
    last_mix = t0 - (mix_preview_every_s or 0.0)
    recent: deque[tuple[float, int]] = deque(maxlen=20)
    best = -1.0
    best_path: str | None = None
    it = start
    metrics: dict[str, float] = {}
    while it < config.iterations:
        control.wait_while_paused()
        if control.stop_requested:
            break
        step_t = time.perf_counter()
        lr = learning_rate(config, it)
        for g in optimizer.param_groups:
            g["lr"] = lr
        img_l, lab_l = _make_batch([data.labeled[i] for i in cyc_l.take(half)], config, gen, device)
        if config.mode == "supervised":
            res = supervised_losses(config, student, img_l, lab_l, autocast)
            n_images = half
        else:
            img_u, _ = _make_batch([(unlabeled[i][0], None) for i in cyc_u.take(half)], config, gen, device)
            res = m3hl_losses(config, student, teacher, img_l, lab_l, img_u, gen, autocast)
            n_images = 2 * half
        optimizer.zero_grad(set_to_none=True)
        res.losses["total"].backward()
        optimizer.step()
        ema_update(teacher, student, ema_decay_at(it, config.ema_decay, config.ema_warmup))
        it += 1
        losses = {k: float(v.detach()) for k, v in res.losses.items()}
        if not math.isfinite(losses["total"]):
            path = save("diverged", it, model_only=True)
            raise FloatingPointError(
                f"training diverged at iteration {it} (loss {losses['total']}); lower the learning rate. "
                f"The last good checkpoint is {out / 'last.pt' if out else 'not saved'}; the diverged weights are {path}"
            )
        now = time.perf_counter()
        recent.append((now - step_t, n_images))
        ips = sum(k for _, k in recent) / max(sum(t for t, _ in recent), 1e-9)
        per_step = sum(t for t, _ in recent) / len(recent)
        yield ev.Progress(it, config.iterations, losses, lr, ips, now - t0, per_step * (config.iterations - it))
        if mix_preview_every_s is not None and res.preview is not None and now - last_mix >= mix_preview_every_s:
            last_mix = now
            imgs, tgts, masks = (t.detach().float().cpu().numpy() for t in res.preview)
            yield ev.MixPreview(it, imgs.astype(np.float32), tgts.astype(np.uint8), masks.astype(np.uint8))
        if preview_volume is not None and preview_every_s is not None and now - last_vol >= preview_every_s:
            yield volume_preview(it)
            last_vol = time.perf_counter()
        if val_volumes and config.val_every > 0 and (it % config.val_every == 0 or it == config.iterations):
            mean, per_class = _validate(student, val_volumes, config, device)
            is_best = mean > best
            if is_best:
                best = mean
                metrics = {"val_mean_dice": mean, **{f"val_dice_{k}": v for k, v in per_class.items()}, "iteration": it}
                best_path = save("best", it, model_only=True)
            yield ev.Validation(it, mean, per_class, is_best)
        if out is not None and config.checkpoint_every > 0 and it % config.checkpoint_every == 0 and it < config.iterations:
            yield ev.CheckpointSaved(it, save("last", it), "last")
    stopped = it < config.iterations
    final = save("last", it)
    if final:
        yield ev.CheckpointSaved(it, final, "final")
    if preview_volume is not None:
        yield volume_preview(it)
    yield ev.TrainFinished(it, final, best_path, stopped, metrics)


def trained_models(config: TrainConfig, checkpoint: str | Path, device: str = "cpu") -> tuple[nn.Module, nn.Module]:
    """(student, teacher) of a checkpoint, in eval mode on ``device``."""
    from .checkpoint import model_from_checkpoint

    ckpt = load_checkpoint(checkpoint)
    return model_from_checkpoint(ckpt, "student", device), model_from_checkpoint(ckpt, "teacher", device)
