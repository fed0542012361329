"""The few-slice loop on one volume: paint a few slices, fine-tune a start model.

One code path for ``m3hl train --data IMG --labels PAINTED``, the napari
widget's Train (with a start model), the demo and ``benchmarks/fewslice.py``:

1. :func:`prepare` turns a start model file, an image volume ``(D, H, W)`` and
   a painted label volume ``(D, H, W)`` (nonzero on the painted slices only)
   into a :class:`FewSliceJob`: the fine-tune's :class:`TrainConfig` (the start
   model's own input size, resizing and class layout, inherited from its
   checkpoint, never rescaled; few-slice settings from
   :class:`FewSliceOptions`), its ``TrainData`` and the start model's own
   segmentation of the volume.
2. :func:`run` trains (yielding the trainer's events plus a :class:`Check`
   every ``check_every`` iterations), stops early when the segmentation of
   the unpainted slices stops changing, and ends with a :class:`FewSliceResult`:
   the fine-tuned segmentation, the start model's, and the safeguard's
   verdict (:mod:`napari_m3hl.fewslice.safeguard`).

The segmentation shown (and predicted by the fine-tune's checkpoint) is a
weighted average of the start model's and the fine-tuned student's class
probabilities (``start_blend``; :mod:`napari_m3hl.inference.blend`): with a strong
start model the fine-tuned network alone was no better than the start on
average and worse by more than a point on a third of the volumes, while
the blend beat both and stayed within a point of the start everywhere.

The defaults of :class:`FewSliceOptions` follow ``benchmarks/fewslice.py``
(docs/benchmarks.md, "Few-slice fine-tuning on one volume"): supervised on
the painted slices (M³HL's EMA teacher collapsed there), 100 iterations at
lr 0.01, the student segmenting, blended with the start model at weight
0.6 (the EMA teacher, whose BatchNorm statistics are the student's, lags
behind), min–max intensity scaling (as the ACDC training data).
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from napari_m3hl.config import TrainConfig
from napari_m3hl.errors import M3HLInputError
from napari_m3hl.labels import labeled_slices
from napari_m3hl.fewslice.safeguard import Verdict, check_finetune

@dataclass
class FewSliceOptions:
    """Few-slice fine-tuning settings (the measured defaults; see the module docstring).

    Attributes:
        iterations: SGD steps at most (early stop may end sooner).
        lr: constant learning rate.
        batch_size: images per step (half painted slices, half unpainted in
            ``m3hl`` mode; the painted half only in ``supervised`` mode).
        mode: ``"supervised"`` (painted slices only) or ``"m3hl"`` (with the
            volume's unpainted slices; the teacher starts as the start model).
        l2_to_start: weight of the L2 penalty toward the start weights.
        freeze: ``""``, ``"encoder"``, ``"bn"`` (BatchNorm statistics) or ``"encoder,bn"``.
        segment_with: ``"teacher"`` (EMA of the student) or ``"student"``.
        ema_decay: EMA decay of the teacher.
        check_every: iterations between checks of the unpainted slices' segmentation.
        early_stop: stop when a check changes less than ``stop_change`` (1 − mean
            Dice between successive segmentations of the unpainted slices).
        stop_change: see ``early_stop``.
        intensity: ``"minmax"`` (the ACDC training data's scaling) or
            ``"percentile"`` (0.5–99.5 % clipped) scaling of the image to [0, 1].
        start_blend: weight of the start model's class probabilities in the
            segmentation, ``start_blend·p_start + (1 − start_blend)·p_student``
            (0: the fine-tuned student alone). Needs ``segment_with="student"``;
            the fine-tune's checkpoint keeps the start weights and this weight,
            so ``m3hl predict`` segments the same way (:mod:`napari_m3hl.inference.blend`).
        seed: random seed.
        device: ``auto``, ``cpu``, ``cuda``, ``mps``.
    """

    iterations: int = 100
    lr: float = 0.01
    batch_size: int = 8
    mode: str = "supervised"
    l2_to_start: float = 0.0
    freeze: str = ""
    segment_with: str = "student"
    ema_decay: float = 0.99
    check_every: int = 25
    early_stop: bool = False
    stop_change: float = 0.005
    intensity: str = "minmax"
    start_blend: float = 0.6
    seed: int = 1337
    device: str = "auto"

    def summary(self) -> str:
        """One line of the settings, for help texts and logs."""
        net = "the EMA teacher" if self.segment_with == "teacher" else "the student"
        extra = (f", L2 to start {self.l2_to_start:g}" if self.l2_to_start else "") + \
            (f", frozen {self.freeze}" if self.freeze else "") + (", early stop" if self.early_stop else "")
        if self.start_blend > 0:
            net = f"{net} blended with the start model ({self.start_blend:g} of its probabilities)"
        return (f"{self.iterations} iterations at lr {self.lr:g}, batch {self.batch_size}, {self.mode}{extra}, "
                f"segmenting with {net}")


@dataclass
class Check:
    """Event of :func:`run`: the segmentation of the volume at ``iteration``.

    ``labels``: (D, H, W) uint8, the segmentation the user is shown (the
    segmenting network, blended with the start model when
    ``options.start_blend > 0``); ``networks``: each network's own, alone
    (``"student"``, ``"teacher"``); ``change``: 1 − mean Dice between the
    unpainted slices' segmentation now and at the previous check (NaN at the
    first); ``stopping``: early stop.
    """

    iteration: int
    labels: np.ndarray
    networks: dict[str, np.ndarray]
    change: float
    stopping: bool


@dataclass
class FewSliceJob:
    """What :func:`run` needs. ``image``: (D, H, W) float32 scaled as the
    start model expects; ``painted``: (D, H, W) uint8; ``painted_slices``:
    indices of the slices with any nonzero label; ``base``: the start model's
    segmentation (D, H, W) uint8; ``base_probs``: its class probabilities
    (C, D, H, W) float32, for the blend."""

    config: TrainConfig
    data: Any
    start: Path
    image: np.ndarray
    painted: np.ndarray
    painted_slices: np.ndarray
    base: np.ndarray
    options: FewSliceOptions = field(default_factory=FewSliceOptions)
    base_probs: np.ndarray | None = None


@dataclass
class FewSliceResult:
    """End of :func:`run`. ``labels``: the fine-tuned segmentation (D, H, W)
    uint8, as shown and as ``checkpoint`` predicts it (blended with the start
    model when ``options.start_blend > 0``; the painted slices are not merged
    in, see :func:`napari_m3hl.fewslice.safeguard.merge_painted`); ``network``: the
    fine-tuned network's alone; ``base``: the start model's; ``verdict``: the
    safeguard's; ``checkpoint``: the fine-tune's last checkpoint (None without
    ``out_dir``); ``iterations`` run; ``seconds`` from the start of training to
    the final segmentation."""

    labels: np.ndarray
    base: np.ndarray
    verdict: Verdict
    checkpoint: str | None
    iterations: int
    seconds: float
    stopped_early: bool
    network: np.ndarray | None = None


def scale_intensity(image: np.ndarray, how: str = "minmax") -> np.ndarray:
    """(D, H, W) float32 in [0, 1]: ``minmax`` (as the ACDC training volumes)
    or ``percentile`` (:func:`napari_m3hl.io.nifti.normalize_intensity`)."""
    from napari_m3hl.io.intensity import scale_intensity as _scale
    from napari_m3hl.io.checks import validate_image

    img = np.asarray(image, dtype=np.float32)
    validate_image(img, "image")  # names the bad voxels (NaN, inf) before any scaling
    return _scale(img, how)


def fewslice_config(ckpt: dict[str, Any], options: FewSliceOptions) -> TrainConfig:
    """The fine-tune's config: the start checkpoint's network, input size
    (``ckpt["patch_size"]``), resizing (``image_interp``), classes and mask
    block size, with the few-slice schedule of ``options``."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    base = {k: v for k, v in (ckpt.get("config") or {}).items() if k in names}
    patch = tuple(int(p) for p in ckpt["patch_size"])
    names_c = tuple(ckpt.get("class_names") or base.get("class_names") or
                    [f"class {c}" for c in range(int(ckpt["num_classes"]))])
    block = tuple(base.get("block_size") or ())
    if len(block) != len(patch):
        block = tuple(max(1, p // 4) for p in patch)
    cfg = TrainConfig.from_dict(base).replace(
        arch=ckpt["arch"], in_channels=int(ckpt["in_channels"]), num_classes=int(ckpt["num_classes"]),
        class_names=names_c,
        patch_size=patch, block_size=block, image_interp=base.get("image_interp", "bilinear"),
        iterations=options.iterations, lr=options.lr, batch_size=options.batch_size, mode=options.mode,
        lr_schedule="constant", l2_to_start=options.l2_to_start, freeze=options.freeze,
        ema_decay=options.ema_decay, ema_warmup=False, warm_start=0, warm_frac=0.0, alpha_rampup=0,
        intensity=options.intensity,  # recorded, so `m3hl predict` and the widget scale as the fine-tune did
        teacher_init="copy", teacher_mode="eval", teacher_bn="copy", pl_eval_every=0,
        val_every=0, checkpoint_every=options.check_every, seed=options.seed, device=options.device,
        preset="fewslice", variant="",
    )
    cfg.validate()
    return cfg


def prepare(start: str | Path, image: np.ndarray, painted: np.ndarray,
            options: FewSliceOptions | None = None) -> FewSliceJob:
    """Build the fine-tune of ``start`` on ``image`` (D, H, W) with the labels
    ``painted`` (D, H, W; nonzero on the painted slices), and the start model's
    segmentation of the volume. Raises :class:`M3HLInputError` naming the problem."""
    from napari_m3hl.io.checkpoint import load_checkpoint
    from napari_m3hl.data.volumes import PartlyLabeledVolume
    from napari_m3hl.inference.predictor import Predictor
    from napari_m3hl.runtime import resolve_device

    options = options or FewSliceOptions()
    if options.segment_with not in ("teacher", "student"):
        raise M3HLInputError(f"segment_with must be 'teacher' or 'student', got {options.segment_with!r}")
    if not 0.0 <= options.start_blend <= 1.0:
        raise M3HLInputError(f"start_blend (--start-blend) is the start model's share of the segmentation and must "
                             f"lie in [0, 1]; got {options.start_blend}")
    if options.start_blend > 0 and options.segment_with != "student":
        raise M3HLInputError(f"start_blend blends the student only; got segment_with={options.segment_with!r} "
                             "(set start_blend=0 to segment with the teacher)")
    ckpt = load_checkpoint(start)
    if len(ckpt["patch_size"]) != 2:
        raise M3HLInputError(f"start model {start} is a 3D network; the few-slice loop fine-tunes 2D (slice-wise) models")
    cfg = fewslice_config(ckpt, options)
    img = np.asarray(image)
    lab = np.asarray(painted)
    if img.ndim != 3 or lab.shape != img.shape:
        raise M3HLInputError(f"image {img.shape} and painted labels {lab.shape} must be two (D, H, W) volumes of one shape")
    if lab.size and (lab.min() < 0 or lab.max() >= cfg.num_classes):
        raise M3HLInputError(f"painted labels hold values {int(lab.min())}..{int(lab.max())}, but {start} has "
                             f"{cfg.num_classes} classes ({', '.join(cfg.class_names)}: 0..{cfg.num_classes - 1})")
    scaled = scale_intensity(img, options.intensity)
    plv = PartlyLabeledVolume.from_volumes([scaled], [lab], num_classes=cfg.num_classes, normalize=False,
                                           names=["volume"])
    data = plv.train_data(cfg.class_names)
    base = Predictor.from_checkpoint(blend_partner(ckpt), "student", resolve_device(options.device),
                                     blend=False)
    base_labels, base_probs = base.predict(scaled, return_probs=True)
    return FewSliceJob(cfg, data, Path(start), scaled, lab.astype(np.uint8), labeled_slices(lab), base_labels, options,
                       base_probs)


def _mean_dice(a: np.ndarray, b: np.ndarray, num_classes: int) -> float:
    from napari_m3hl.metrics.binary import dice

    return float(np.mean([dice(a == c, b == c) for c in range(1, num_classes)]))


def blend_partner(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The start model a fine-tune blends with, as a checkpoint dict whose
    ``student`` is its weights: the start file's student, or, when the start
    is itself a fine-tune (Train on, a second ``m3hl train --init last.pt``),
    that fine-tune's own start model, so a chain of fine-tunes keeps
    blending with the model the user started from."""
    if "start" not in ckpt:
        return ckpt
    return {k: v for k, v in ckpt.items() if k not in ("start", "start_blend", "teacher")} | {"student": ckpt["start"]}


def blend_labels(base_probs: np.ndarray | None, probs: np.ndarray, weight: float) -> np.ndarray:
    """Labels (D, H, W) uint8 of ``weight·base_probs + (1 − weight)·probs`` (both (C, D, H, W))."""
    if weight <= 0 or base_probs is None:
        return probs.argmax(0).astype(np.uint8)
    return (weight * base_probs + (1.0 - weight) * probs).argmax(0).astype(np.uint8)


def attach_start(path: str | Path, start: str | Path, weight: float) -> None:
    """Add the start model's weights and the blend weight to a fine-tune's
    checkpoint (rewritten atomically), so :class:`napari_m3hl.inference.predictor.Predictor`
    segments with the same blend as the loop showed."""
    from napari_m3hl.io.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(path)
    ckpt["start"] = blend_partner(load_checkpoint(start))["student"]
    ckpt["start_blend"] = float(weight)
    ckpt.pop("weights_sha256", None)
    save_checkpoint(path, ckpt)


def run(job: FewSliceJob, out_dir: str | Path | None = None, control: Any = None) -> Iterator[Any]:
    """Fine-tune and yield the trainer's events, a :class:`Check` every
    ``options.check_every`` iterations, and last a :class:`FewSliceResult`."""
    from napari_m3hl.io.checkpoint import load_checkpoint
    from napari_m3hl.inference.predictor import Predictor
    from napari_m3hl.runtime import resolve_device
    from napari_m3hl.training.trainer import TrainControl, train
    from napari_m3hl.training import events as ev

    opts, cfg = job.options, job.config
    control = control or TrainControl()
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="m3hl-fewslice-")
        out_dir = tmp.name
    unpainted = np.setdiff1d(np.arange(job.image.shape[0]), job.painted_slices)
    t0 = time.perf_counter()
    prev: np.ndarray | None = None
    shown: np.ndarray | None = None
    nets: dict[str, np.ndarray] = {}
    stopped_early = False
    final_ckpt = None
    iterations = 0
    checked = -1

    device = resolve_device(cfg.device)  # the training device: the checks segment where the networks train
    depth = int(job.image.shape[0])

    def segment(path: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        ckpt = load_checkpoint(path)
        labels, out = None, {}
        for which in ("teacher", "student"):  # each network segments the volume in one batch of all its slices
            lab, probs = Predictor.from_checkpoint(ckpt, which, device, batch_size=max(16, depth)).predict(
                job.image, return_probs=True)
            out[which] = lab
            if which == opts.segment_with:
                labels = blend_labels(job.base_probs, probs, opts.start_blend) if opts.start_blend > 0 else lab
        return labels, out

    try:
        for e in train(cfg, job.data, out_dir, init_from=job.start, control=control):
            if isinstance(e, ev.CheckpointSaved) and e.kind in ("last", "final") and e.iteration != checked:
                checked = e.iteration
                shown, nets = segment(e.path)
                change = float("nan") if prev is None or not unpainted.size else \
                    1.0 - _mean_dice(shown[unpainted], prev[unpainted], cfg.num_classes)
                stopping = bool(opts.early_stop and e.kind == "last" and np.isfinite(change)
                                and change < opts.stop_change)
                prev = shown
                yield Check(e.iteration, shown, nets, change, stopping)
                if stopping:
                    stopped_early = True
                    control.stop()
            if isinstance(e, ev.TrainFinished):
                final_ckpt, iterations = e.checkpoint, e.iteration
                if final_ckpt and opts.start_blend > 0:
                    attach_start(final_ckpt, job.start, opts.start_blend)
            yield e
        verdict = check_finetune(job.base, shown, job.painted, cfg.num_classes, tuple(cfg.class_names))
        yield FewSliceResult(shown, job.base, verdict, None if tmp else final_ckpt, iterations,
                             time.perf_counter() - t0, stopped_early, nets[opts.segment_with])
    finally:
        if tmp is not None:
            tmp.cleanup()
