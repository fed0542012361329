"""The M³HL training loop as a generator of events.

``train(config, data, out_dir)`` yields :mod:`napari_m3hl.training.events` while it
trains; the CLI prints them and the napari widget draws them from a worker
thread. A :class:`TrainControl` pauses, resumes or stops the loop from
another thread; a stop always ends with a saved checkpoint.

The loop owns the networks, the optimiser, the data cyclers and random state,
checkpoints, validation, previews and the distributed glue; one step's
schedule, device setup and losses are in :mod:`napari_m3hl.method.step` (re-exported
here: ``alpha_at``, ``learning_rate``, ``StepSetup``, ``m3hl_losses``,
``supervised_losses``). The whole step runs on the training device
(augmentation, masks, pseudo-labels with their connected components, the
foreach EMA); ``config.compile`` runs the forward passes through ``torch.compile``.
With ``config.data_on_device`` the training set is held on the device and
each batch gathered and augmented there (:mod:`napari_m3hl.data.device`;
``auto``: on CUDA); with ``config.capture`` the whole step runs as one CUDA
graph (:mod:`napari_m3hl.training.capture`; off CUDA the eager step runs and
the log says why).
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from napari_m3hl.training import events as ev
from napari_m3hl.io.checkpoint import check_compatible, load_checkpoint, make_payload, save_checkpoint
from napari_m3hl.config import TrainConfig
from napari_m3hl.training.distributed import (
    DistContext, ShardedCycler, check_ranks_equal, gather_rng, rank_device, rank_rng_state, rank_seed, reduce_step,
    shard_cycler, sync_buffers, wrap_student,
)
from napari_m3hl.errors import M3HLInputError
from napari_m3hl.method.networks import build_network, network_ndim
from napari_m3hl.training.pl_quality import pick_reference, reference_batch, score_pseudo_labels
from napari_m3hl.runtime import resolve_device, tune_malloc
from napari_m3hl.method.step import (StepSetup, alpha_at, learning_rate, m3hl_losses, read_back, supervised_losses,
                                     unsup_weight_at)
from napari_m3hl.method.teacher import ema_decay_at, ema_update, init_teacher
from napari_m3hl.method.mixing import block_masks
from napari_m3hl.data.device import device_sets
from napari_m3hl.method.augment import augment_scale_gamma
from napari_m3hl.training.capture import (LCC_ROUNDS, GraphStep, ensure_momentum_buffers, graph_autocast,
                                          resolve_capture, step_function)

log = logging.getLogger(__name__)


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


def _make_batch(samples: list, config: TrainConfig, gen: torch.Generator, device: torch.device,
                memory_format: torch.memory_format = torch.contiguous_format):
    from napari_m3hl.method.augment import prepare_batch_2d, prepare_batch_3d

    if config.ndim == 2:
        img, lab = prepare_batch_2d(samples, tuple(config.patch_size), gen, device, image_interp=config.image_interp)
        return img.contiguous(memory_format=memory_format), lab
    return prepare_batch_3d(samples, tuple(config.patch_size), gen, device)


def _rng_state(gen: torch.Generator, np_rng: np.random.Generator, cyclers: Sequence[ShardedCycler]) -> dict[str, Any]:
    return {
        "torch": gen.get_state(),
        "torch_global": torch.get_rng_state(),
        "numpy": json.dumps(np_rng.bit_generator.state),
        "cyclers": json.dumps([c.order for c in cyclers]),
    }


def _restore_rng(state: dict[str, Any], gen: torch.Generator, np_rng: np.random.Generator, cyclers: Sequence[ShardedCycler]) -> None:
    gen.set_state(state["torch"])
    torch.set_rng_state(state["torch_global"])
    np_rng.bit_generator.state = json.loads(state["numpy"])
    for c, order in zip(cyclers, json.loads(state["cyclers"])):
        c.order = [int(i) for i in order if int(i) < c.n]  # the data may have changed ("train on")


def _validate(model: nn.Module, volumes: Sequence, config: TrainConfig, device: torch.device) -> tuple[float, dict[str, float]]:
    """Mean Dice (and per class) of ``model`` on the volumes; fp32 inference,
    so the best checkpoint is chosen by the same numbers whatever the precision.
    On a GPU each 2D volume goes through the network in one batch of all its slices."""
    import dataclasses

    from napari_m3hl.metrics.binary import dice
    from napari_m3hl.inference.predictor import Predictor

    predictor = Predictor.from_network(model, config, device=device, precision="fp32",
                                       channels_last=config.channels_last)
    if device.type == "cuda" and config.ndim == 2 and volumes:
        predictor = dataclasses.replace(predictor, batch_size=max(predictor.batch_size,
                                                                  max(int(v[1].shape[0]) for v in volumes)))
    scores = np.zeros((len(volumes), config.num_classes - 1))
    for i, (_, image, label) in enumerate(volumes):
        pred = predictor.predict(image)
        for c in range(1, config.num_classes):
            scores[i, c - 1] = dice(pred == c, label == c)
    per_class = {config.class_names[c]: float(scores[:, c - 1].mean()) for c in range(1, config.num_classes)}
    return float(scores.mean()), per_class


def _bn_frozen(module: nn.Module, _inputs: Any) -> None:
    module.training = False  # forward pre-hook: this BatchNorm layer always uses its running statistics


#: ``freeze=bn`` leaves a BatchNorm layer training normally when, in eval mode, it would
#: multiply a change of its input by more than this (max |γ|/√(σ²+ε) over channels):
#: SGD then diverges within ten steps. The shipped ACDC model's first BatchNorm (after
#: the first convolution, on raw intensities) has a channel with σ² = 2.5e-4, a gain of 58.
MAX_FROZEN_BN_GAIN = 20.0


def bn_gain(m: nn.Module) -> float:
    """Largest per-channel gain |γ|/√(running σ² + ε) of a BatchNorm layer in eval mode."""
    var = m.running_var.detach().float()
    w = m.weight.detach().float().abs() if m.weight is not None else torch.ones_like(var)
    return float((w / torch.sqrt(var + m.eps)).max())


def _finetune_hooks(config: TrainConfig, student: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]] | None:
    """Fine-tuning knobs, applied to the student as it starts:
    ``freeze`` holds ``encoder`` (no gradients into ``enc.*``) and/or ``bn``
    (every BatchNorm layer runs as in eval mode, in training too: it
    normalises with the start model's running statistics and never updates
    them; its affine weights still train; layers whose eval-mode gain
    exceeds :data:`MAX_FROZEN_BN_GAIN` keep training normally), comma-separated;
    ``l2_to_start > 0`` returns
    (parameter, start value) pairs for the L2-to-start penalty, else None."""
    frozen = set(filter(None, config.freeze.split(",")))
    if "encoder" in frozen:
        for name, p in student.named_parameters():
            if name.startswith("enc."):
                p.requires_grad_(False)
    if "bn" in frozen:  # BatchNorm normalises with the start model's statistics, in training too
        for m in student.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and bn_gain(m) <= MAX_FROZEN_BN_GAIN:
                m.register_forward_pre_hook(_bn_frozen)
    if config.l2_to_start <= 0:
        return None
    return [(p, p.detach().clone()) for p in student.parameters() if p.requires_grad]


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
    dist: DistContext | None = None,
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
        dist: this process's place in a torchrun job (:mod:`napari_m3hl.training.distributed`):
            DDP student, per-rank data shares and seeds, rank-0-only saves and
            validation. None: a plain single-process run.
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
    dist = dist or DistContext()
    requests = control  # a stop asked here (Ctrl-C, the widget) ...
    if dist.enabled:  # ... takes effect on every rank at the same step (reduce_step)
        control = TrainControl()
    device = rank_device(dist, resolve_device(config.device))
    setup = StepSetup.from_config(config, device)
    autocast = setup.autocast

    torch.manual_seed(config.seed)
    student = build_network(config.arch, config.in_channels, config.num_classes).to(device, memory_format=setup.memory_format)
    teacher = build_network(config.arch, config.in_channels, config.num_classes).to(device, memory_format=setup.memory_format)
    optimizer = torch.optim.SGD(student.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    net = wrap_student(student, dist, device)  # what runs forward/backward (DDP when distributed)
    if dist.rank:
        torch.manual_seed(rank_seed(config.seed, dist.rank))  # dropout differs per rank
    gen = torch.Generator().manual_seed(rank_seed(config.seed, dist.rank))
    np_rng = np.random.default_rng(config.seed)  # the sampler stream: the same on every rank
    unlabeled = data.unlabeled if len(data.unlabeled) else data.labeled
    cyc_l, cyc_u = shard_cycler(len(data.labeled), np_rng, dist), shard_cycler(len(unlabeled), np_rng, dist)
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
            _restore_rng(rank_rng_state(dist, ckpt["rng"], config.seed, int(ckpt["iteration"])), gen, np_rng, (cyc_l, cyc_u))
        start = int(ckpt["iteration"])
    else:
        if init_from is not None:
            ckpt = load_checkpoint(init_from)
            check_compatible(ckpt, config.arch, config.num_classes, config.in_channels, source=str(init_from))
            student.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["student"].items()})
        init_teacher(teacher, student, "copy" if init_from is not None else config.teacher_init)
    anchor = _finetune_hooks(config, student)
    for g in optimizer.param_groups:
        g["lr"] = learning_rate(config, start)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and dist.is_main:
        out.mkdir(parents=True, exist_ok=True)

    def save(kind: str, iteration: int, model_only: bool = False) -> str | None:
        if out is None:
            return None
        rng = None if model_only else gather_rng(dist, _rng_state(gen, np_rng, (cyc_l, cyc_u)))  # all ranks
        if not dist.is_main:
            return None
        payload = make_payload(
            config, student, teacher, None if model_only else optimizer, iteration, rng,
            class_names_data=list(data.class_names), completed=kind != "diverged" and iteration >= config.iterations,
            saved_as=kind,
            **({"diverged": True} if kind == "diverged" else {}),
        )
        return str(save_checkpoint(out / f"{kind}.pt", payload))

    def volume_preview(iteration: int) -> ev.VolumePreview:
        from napari_m3hl.inference.predictor import Predictor

        labels = Predictor.from_network(teacher, config, "teacher", device=device, precision=setup.precision,
                                        channels_last=config.channels_last).predict(preview_volume)
        return ev.VolumePreview(iteration, labels, preview_token)

    sets = device_sets(data.labeled, unlabeled, config, device)  # None: the host loader

    def batch(labeled: bool, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The augmented batch of labeled (image, label) or unlabeled (image, None) samples ``idx``."""
        if sets is not None:
            img, lab = sets[0 if labeled else 1].batch(idx, gen)
        else:
            samples = [data.labeled[i] for i in idx] if labeled else [(unlabeled[i][0], None) for i in idx]
            img, lab = _make_batch(samples, config, gen, device)
        if config.ndim == 2:
            if config.aug_scale > 0 or config.aug_gamma > 0:
                img, lab = augment_scale_gamma(img, lab, config.aug_scale, config.aug_gamma, gen)
            img = img.contiguous(memory_format=setup.memory_format)
        return img, lab

    capture, why = resolve_capture(config.capture, device, config.ndim, dist.enabled)
    if why:
        (log.info if config.capture == "auto" else log.warning)(why)
    graph: GraphStep | None = None
    graph_phase: tuple[bool, str] | None = None
    unconverged = torch.zeros((), dtype=torch.long, device=device)  # captured steps with unconverged components
    if capture == "cuda-graph":
        ensure_momentum_buffers(optimizer)
    # what runs the forward passes (compiled or not); state, EMA and checkpoints use the modules themselves
    if capture == "compile":
        run_student, run_teacher = (torch.compile(net, mode="reduce-overhead"),
                                    torch.compile(teacher, mode="reduce-overhead"))
    else:
        run_student, run_teacher = (torch.compile(net), torch.compile(teacher)) if config.compile else (net, teacher)
    yield ev.TrainStarted(config.iterations, start, str(device), len(data.labeled), len(data.unlabeled), config.mode)
    truth = getattr(data, "unlabeled_truth", None)
    pl_ref = None
    if config.pl_eval_every > 0 and config.mode == "m3hl" and config.ndim == 2 and truth is not None and len(truth):
        idx = pick_reference(len(truth), config.pl_eval_samples, config.seed)
        pl_ref = reference_batch([truth[i] for i in idx], config, device)
    half = config.batch_size // 2
    warm = config.warm_iterations
    t0 = time.perf_counter()
    # the first previews follow the first step (then one per period), so a user sees them at once
    last_vol = t0 - (preview_every_s or 0.0)
    last_mix = t0 - (mix_preview_every_s or 0.0)
    recent: deque[tuple[float, int, int]] = deque(maxlen=20)  # (seconds, images, steps) per read-back
    best = -1.0
    best_path: str | None = None
    it = start
    metrics: dict[str, float] = {}
    pending: list[tuple[int, dict[str, torch.Tensor]]] = []  # losses not yet read back to the host
    while it < config.iterations:
        control.wait_while_paused()
        if control.stop_requested:
            break
        if not pending:
            step_t = time.perf_counter()  # start of this read-back window
        lr = learning_rate(config, it)
        for g in optimizer.param_groups:
            g["lr"] = lr
        img_l, lab_l = batch(True, cyc_l.take(half))
        if config.mode == "m3hl" and it == warm > 0:
            init_teacher(teacher, student, "copy")  # the M³HL phase starts from the warm student
        m3 = not (config.mode == "supervised" or it < warm)
        # a teacher that never labels (supervised mode, warm start) takes the student's BatchNorm statistics,
        # unless it is frozen (decay 1): then weights and statistics both stay as they started
        bn = config.teacher_bn if (m3 or config.ema_decay >= 1.0) else "copy"
        decay = ema_decay_at(it, config.ema_decay, config.ema_warmup)
        n_images = 2 * half if m3 else half
        img_u = batch(False, cyc_u.take(half))[0] if m3 else None
        if capture == "cuda-graph":
            if graph_phase != (m3, bn):  # one graph per phase (warm start, M³HL); the last one is not run again
                graph_phase = (m3, bn)
                graph = GraphStep(step_function(config, student, teacher, optimizer, graph_autocast(setup), m3, bn,
                                                anchor), lambda: optimizer.zero_grad(set_to_none=True))
            # one non-blocking upload of the step's numbers (a blocking one would wait for the queued replays)
            lr_t, decay_t, alpha_t, unsup_t = torch.tensor([lr, decay, alpha_at(config, it), unsup_weight_at(config, it)]
                                                           ).to(device, non_blocking=True)
            x = {"img_l": img_l, "lab_l": lab_l, "lr": lr_t, "decay": decay_t}
            if m3:
                x.update(img_u=img_u, alpha=alpha_t, unsup=unsup_t,
                         mask=block_masks(half // 2, tuple(img_l.shape[2:]), config.block_size, config.mask_ratio,
                                          generator=gen, device=device))
            out = graph(x)
            if "lcc_converged" in out:
                unconverged += ~out.pop("lcc_converged")
            preview = tuple(out.pop(k) for k in ("preview_images", "preview_targets", "preview_masks")) \
                if "preview_images" in out else None
            step_losses = out
        else:
            if m3:
                res = m3hl_losses(config, run_student, run_teacher, img_l, lab_l, img_u, gen, autocast,
                                  alpha_at(config, it), unsup=unsup_weight_at(config, it))
            else:
                res = supervised_losses(config, run_student, img_l, lab_l, autocast)
            if anchor is not None:  # fine-tuning hook: L2 toward the start weights
                res.losses["l2_start"] = sum(((p - a) ** 2).sum() for p, a in anchor)
                res.losses["total"] = res.losses["total"] + config.l2_to_start * res.losses["l2_start"]
            optimizer.zero_grad(set_to_none=True)
            res.losses["total"].backward()
            optimizer.step()
            sync_buffers(dist, student, teacher)  # rank 0's BatchNorm statistics: the teacher stays identical
            ema_update(teacher, student, decay, bn)
            preview = res.preview
            step_losses = {k: v.detach() for k, v in res.losses.items()}
        it += 1
        pending.append((it, step_losses))
        due = (it % setup.readback_every == 0 or it == config.iterations or control.stop_requested
               or (val_volumes and config.val_every > 0 and it % config.val_every == 0)
               or (out is not None and config.checkpoint_every > 0 and it % config.checkpoint_every == 0)
               or (pl_ref is not None and it % config.pl_eval_every == 0))
        if not due:
            continue
        losses, bad = read_back(pending)
        n_steps = len(pending)
        if capture == "cuda-graph" and int(unconverged):
            log.warning("%d captured step(s) before iteration %d used pseudo-labels whose connected components had "
                        "not converged in %d rounds", int(unconverged), it, LCC_ROUNDS)
            unconverged.zero_()
        pending = []
        if dist.enabled:  # mean over ranks; a stop asked on any rank stops all at this step
            losses, stop_any = reduce_step(dist, {k: torch.tensor(v, device=device) for k, v in losses.items()},
                                           requests.stop_requested)
            if stop_any:
                control.stop()
            if bad is None and not math.isfinite(losses["total"]):
                bad = it  # another rank diverged
        if bad is not None:
            path = save("diverged", it, model_only=True)
            last = out / "last.pt" if out is not None else None
            raise FloatingPointError(
                f"training diverged at iteration {bad} (loss {losses['total']}); lower the learning rate. "
                f"The last good checkpoint is {last if last is not None and last.is_file() else 'not saved'}; "
                f"the diverged weights are {path}"
            )
        now = time.perf_counter()
        recent.append((now - step_t, n_images * n_steps, n_steps))
        window = sum(t for t, _, _ in recent)
        ips = sum(k for _, k, _ in recent) / max(window, 1e-9)
        per_step = window / sum(k for _, _, k in recent)
        yield ev.Progress(it, config.iterations, losses, lr, ips, now - t0, per_step * (config.iterations - it))
        if mix_preview_every_s is not None and preview is not None and now - last_mix >= mix_preview_every_s:
            last_mix = now
            imgs, tgts, masks = (t.detach().float().cpu().numpy() for t in preview)
            yield ev.MixPreview(it, imgs.astype(np.float32), tgts.astype(np.uint8), masks.astype(np.uint8))
        if preview_volume is not None and preview_every_s is not None and now - last_vol >= preview_every_s:
            yield volume_preview(it)
            last_vol = time.perf_counter()
        if val_volumes and dist.is_main and config.val_every > 0 and (it % config.val_every == 0 or it == config.iterations):
            mean, per_class = _validate(student, val_volumes, config, device)
            is_best = mean > best
            if is_best:
                best = mean
                metrics = {"val_mean_dice": mean, **{f"val_dice_{k}": v for k, v in per_class.items()}, "iteration": it}
                best_path = save("best", it, model_only=True)
            yield ev.Validation(it, mean, per_class, is_best)
        if pl_ref is not None and dist.is_main and (it % config.pl_eval_every == 0 or it == config.iterations):
            yield ev.PseudoLabelQuality(it, score_pseudo_labels(teacher, student, *pl_ref, config))
        if out is not None and config.checkpoint_every > 0 and it % config.checkpoint_every == 0 and it < config.iterations:
            yield ev.CheckpointSaved(it, save("last", it), "last")
    stopped = it < config.iterations
    if dist.enabled:  # verify: every rank holds the same student and teacher
        metrics = {**metrics, "rank_weight_max_diff": check_ranks_equal(dist, (student, teacher))}
    final = save("last", it)
    if final:
        yield ev.CheckpointSaved(it, final, "final")
    if preview_volume is not None:
        yield volume_preview(it)
    yield ev.TrainFinished(it, final, best_path, stopped, metrics)
