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
   verdict (:mod:`napari_m3hl.safeguard`).

The defaults of :class:`FewSliceOptions` follow ``benchmarks/fewslice.py``
(docs/benchmarks.md, "Few-slice fine-tuning on one volume"): supervised on
the painted slices (M³HL's EMA teacher collapsed there), 100 iterations at
lr 0.01, the student segmenting (with BatchNorm following the painted slices
the EMA teacher lags behind it), min–max intensity scaling (as the ACDC
training data; 82.3 vs 81.0 start-model Dice with percentile scaling).
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .config import TrainConfig
from .errors import M3HLInputError
from .labels import labeled_slices
from .safeguard import Verdict, check_finetune

#: For ``m3hl train --help`` (the integrator copies it there and into the user guide).
HELP = (
    "With --data IMAGE --labels PAINTED and --init MODEL, train fine-tunes MODEL on the painted slices with the "
    "few-slice defaults (napari_m3hl.fewslice.FewSliceOptions: {summary}); the network keeps MODEL's own input "
    "size and resizing. The preset's 30,000-iteration schedule is for data sets, not one volume."
)


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
    seed: int = 1337
    device: str = "auto"

    def summary(self) -> str:
        """One line of the settings, for help texts and logs."""
        net = "the EMA teacher" if self.segment_with == "teacher" else "the student"
        extra = (f", L2 to start {self.l2_to_start:g}" if self.l2_to_start else "") + \
            (f", frozen {self.freeze}" if self.freeze else "") + (", early stop" if self.early_stop else "")
        return (f"{self.iterations} iterations at lr {self.lr:g}, batch {self.batch_size}, {self.mode}{extra}, "
                f"segmenting with {net}")


@dataclass
class Check:
    """Event of :func:`run`: the segmentation of the volume at ``iteration``.

    ``labels``: (D, H, W) uint8 of the segmenting network; ``other``: the other
    network's; ``change``: 1 − mean Dice between the unpainted slices' segmentation
    now and at the previous check (NaN at the first); ``stopping``: early stop.
    """

    iteration: int
    labels: np.ndarray
    other: np.ndarray
    change: float
    stopping: bool


@dataclass
class FewSliceJob:
    """What :func:`run` needs. ``image``: (D, H, W) float32 scaled as the
    start model expects; ``painted``: (D, H, W) uint8; ``painted_slices``:
    indices of the slices with any nonzero label; ``base``: the start model's
    segmentation (D, H, W) uint8."""

    config: TrainConfig
    data: Any
    start: Path
    image: np.ndarray
    painted: np.ndarray
    painted_slices: np.ndarray
    base: np.ndarray
    options: FewSliceOptions = field(default_factory=FewSliceOptions)


@dataclass
class FewSliceResult:
    """End of :func:`run`. ``labels``: the fine-tuned segmentation (D, H, W)
    uint8 (network output only; see :func:`napari_m3hl.safeguard.merge_painted`);
    ``base``: the start model's; ``verdict``: the safeguard's; ``checkpoint``:
    the fine-tune's last checkpoint (None without ``out_dir``); ``iterations``
    run; ``seconds`` from the start of training to the final segmentation."""

    labels: np.ndarray
    base: np.ndarray
    verdict: Verdict
    checkpoint: str | None
    iterations: int
    seconds: float
    stopped_early: bool


def scale_intensity(image: np.ndarray, how: str = "minmax") -> np.ndarray:
    """(D, H, W) float32 in [0, 1]: ``minmax`` (as the ACDC training volumes)
    or ``percentile`` (:func:`napari_m3hl.io.normalize_intensity`)."""
    from .intensity import scale_intensity as _scale
    from .io import validate_image

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
    from .checkpoint import load_checkpoint
    from .data import PartlyLabeledVolume
    from .predictor import Predictor

    options = options or FewSliceOptions()
    if options.segment_with not in ("teacher", "student"):
        raise M3HLInputError(f"segment_with must be 'teacher' or 'student', got {options.segment_with!r}")
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
    base = Predictor.from_checkpoint(ckpt, "student", "cpu" if options.device == "auto" else options.device)
    base_labels = base.predict(scaled)
    return FewSliceJob(cfg, data, Path(start), scaled, lab.astype(np.uint8), labeled_slices(lab), base_labels, options)


def _mean_dice(a: np.ndarray, b: np.ndarray, num_classes: int) -> float:
    from .metrics import dice

    return float(np.mean([dice(a == c, b == c) for c in range(1, num_classes)]))


def run(job: FewSliceJob, out_dir: str | Path | None = None, control: Any = None) -> Iterator[Any]:
    """Fine-tune and yield the trainer's events, a :class:`Check` every
    ``options.check_every`` iterations, and last a :class:`FewSliceResult`."""
    from .checkpoint import load_checkpoint
    from .predictor import Predictor
    from .trainer import TrainControl, train
    from . import events as ev

    opts, cfg = job.options, job.config
    control = control or TrainControl()
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="m3hl-fewslice-")
        out_dir = tmp.name
    unpainted = np.setdiff1d(np.arange(job.image.shape[0]), job.painted_slices)
    other = "student" if opts.segment_with == "teacher" else "teacher"
    t0 = time.perf_counter()
    prev: np.ndarray | None = None
    last: dict[str, np.ndarray] = {}
    stopped_early = False
    final_ckpt = None
    iterations = 0
    checked = -1

    def segment(path: str) -> dict[str, np.ndarray]:
        ckpt = load_checkpoint(path)
        out = {}
        for which in ("teacher", "student"):
            out[which] = Predictor.from_checkpoint(ckpt, which, "cpu").predict(job.image)
        return out

    try:
        for e in train(cfg, job.data, out_dir, init_from=job.start, control=control):
            if isinstance(e, ev.CheckpointSaved) and e.kind in ("last", "final") and e.iteration != checked:
                checked = e.iteration
                last = segment(e.path)
                seg = last[opts.segment_with]
                change = float("nan") if prev is None or not unpainted.size else \
                    1.0 - _mean_dice(seg[unpainted], prev[unpainted], cfg.num_classes)
                stopping = bool(opts.early_stop and e.kind == "last" and np.isfinite(change)
                                and change < opts.stop_change)
                prev = seg
                yield Check(e.iteration, seg, last[other], change, stopping)
                if stopping:
                    stopped_early = True
                    control.stop()
            if isinstance(e, ev.TrainFinished):
                final_ckpt, iterations = e.checkpoint, e.iteration
            yield e
        labels = last[opts.segment_with]
        verdict = check_finetune(job.base, labels, job.painted, cfg.num_classes, tuple(cfg.class_names))
        yield FewSliceResult(labels, job.base, verdict, None if tmp else final_ckpt, iterations,
                             time.perf_counter() - t0, stopped_early)
    finally:
        if tmp is not None:
            tmp.cleanup()
