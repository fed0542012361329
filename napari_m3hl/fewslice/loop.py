"""The few-slice loop: paint a few slices, fine-tune a start model.

One code path for ``m3hl train --data IMG --labels PAINTED [--data … --labels …]
[--unlabeled …]``, the napari widget's Train (with a start model), the demo
and ``benchmarks/fewslice.py``:

1. :func:`prepare_volumes` turns a start model file, any number of
   (image ``(D, H, W)``, painted labels ``(D, H, W)``, nonzero on the painted
   slices only) pairs and any number of unlabeled images ``(D, H, W)`` into a
   :class:`FewSliceJob`: the fine-tune's :class:`TrainConfig` (the start
   model's own input size, resizing and class layout, inherited from its
   checkpoint, never rescaled; few-slice settings from
   :class:`FewSliceOptions`), its ``TrainData`` (labeled: the painted slices
   of every labeled volume; unlabeled: their unpainted slices and every slice
   of the unlabeled volumes) and the start model's own segmentation of every
   volume. :func:`prepare` is the one-volume case.
2. :func:`run` trains (yielding the trainer's events plus a :class:`Check`
   every ``check_every`` iterations and, in ``m3hl`` mode, the teacher's
   :class:`PseudoLabels` after it), stops early when the segmentation of the
   unpainted slices stops changing, and ends with a :class:`FewSliceResult`:
   each volume's fine-tuned segmentation, the start model's, and the
   safeguard's verdict (:mod:`napari_m3hl.fewslice.safeguard`).

Two modes (``FewSliceOptions.mode``):

* ``supervised``: CE + Dice on the painted slices only.
* ``m3hl``: the paper's step (:func:`napari_m3hl.method.step.m3hl_losses`) on
  the start model's input size, with the few-slice defaults measured for a
  strong start: the teacher is the start model, kept frozen
  (``ema_decay=1.0``; below 1 it follows the student as an EMA) and labels a
  batch of unlabeled slices; painted and unlabeled slices are mixed both ways
  through one block mask (Eq. 2, the block the start model was trained with
  scaled to its input, or the paper's quarter of each axis); the mixed images
  are scored by CE weighted ``M + α(1−M)`` (Eq. 3 without its Dice term,
  ``mix_dice="none"``; ``"regions"`` is the paper's code), the painted slices
  unmixed by CE + Dice beside them (``sup_weight=1``), plus ``λ`` times the
  low- and high-level feature terms (Eq. 4, 5).

The segmentation shown (and predicted by the fine-tune's checkpoint) is a
weighted average of the start model's and the fine-tuned student's class
probabilities (``start_blend``; :mod:`napari_m3hl.inference.blend`): with a
strong start model the fine-tuned network alone was no better than the start
on average and worse by more than a point on a third of the volumes, while
the blend beat both and stayed within a point of the start everywhere.
The start model's share is chosen per fine-tune from its Dice on the painted
slices and, at each check, from how much the fine-tuned network's
segmentation changed since the previous check
(:mod:`napari_m3hl.fewslice.trust`): a start model that fits the scan poorly
keeps less of it, least when the fine-tuned network has settled.

The defaults of :class:`FewSliceOptions` follow ``benchmarks/fewslice.py``
and ``benchmarks/fewslice_m3hl_step.py`` (docs/benchmarks.md, "Few-slice
fine-tuning on one volume" and "M³HL in the few-slice loop"): supervised on
the painted slices, 75 iterations at lr 0.01 (as good as 100 over 3 seeds,
in three quarters of the time), the student segmenting,
blended with the start model at weight 0.6 (0.55 where it scores 85 or less
on the painted slices, 0.4 when the student also changed less than 4 % at
its last check; linear up to 92), min–max intensity scaling (as
the ACDC training data). The M³HL mode is the measured second: with the
paper's step (Dice pooled inside each block region) the student collapsed in
the first steps from a strong start, whatever the teacher; without that Dice
term and with the painted slices unmixed beside the mix it no longer
collapses, but with the start model as its teacher it stays close to it, so
the blend with the start model gained less than after a supervised
fine-tune, and it learned the start model's errors on scans it fits badly.
Teaching it the supervised fine-tune's own pseudo-labels instead (the warm
start) removed those failures and most of the gap, not all of it. Its M³HL
steps at a tenth of the learning rate (``m3hl_lr_scale``) gain on scans
unlike the training data but leave some volumes more than a point below the
start model, so the mode keeps the full rate.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from napari_m3hl.config import TrainConfig
from napari_m3hl.errors import M3HLInputError
from napari_m3hl.fewslice.safeguard import Verdict, check_finetune
from napari_m3hl.fewslice.trust import BlendChoice, choose_blend, settle_blend
from napari_m3hl.metrics.quality import mean_dice
from napari_m3hl.labels import labeled_slices

#: The paper's mask block is a quarter of the input on each axis (64×64 on 256×256 for ACDC, 28×28×20 on
#: 112×112×80 for LA); a start model without a block size of its own gets that share of its input size.
PAPER_BLOCK_SHARE = 0.25


@dataclass
class FewSliceOptions:
    """Few-slice fine-tuning settings (the measured defaults; see the module docstring).

    Attributes:
        iterations: SGD steps at most (early stop may end sooner).
        lr: constant learning rate.
        batch_size: images per step (half painted slices, half unlabeled ones in
            ``m3hl`` mode; the painted half only in ``supervised`` mode).
        mode: ``"supervised"`` (painted slices only) or ``"m3hl"`` (M³HL with the
            unpainted slices and the unlabeled volumes; the teacher starts as the
            start model; see the module docstring).
        l2_to_start: weight of the L2 penalty toward the start weights.
        freeze: ``""``, ``"encoder"``, ``"bn"`` (BatchNorm statistics) or ``"encoder,bn"``.
        segment_with: ``"teacher"`` (EMA of the student) or ``"student"``.
        ema_decay: EMA decay of the teacher; 1.0 with ``teacher_bn="ema"`` keeps the
            teacher frozen as the start model (weights and BatchNorm statistics).
        teacher_bn: the teacher's BatchNorm statistics in ``m3hl`` mode: ``"ema"``
            (averaged from the student's like its weights, starting from the start
            model's) or ``"copy"`` (the student's, as they are:
            :func:`napari_m3hl.method.teacher.ema_update`).
        warm_frac: ``m3hl`` mode: the share of ``iterations`` (rounded, at most
            all but one: :attr:`warm_iterations`) trained supervised on the
            painted slices first; the teacher then restarts as a copy of that
            fine-tuned student (frozen with ``ema_decay=1.0``) and the M³HL step
            runs for the rest (0: the start model is the teacher from the first
            step).
        m3hl_lr_scale: ``m3hl`` mode after the warm start: the M³HL iterations'
            learning rate as a multiple of ``lr`` (1: the same rate; 0.1
            measured as the alternative, docs/benchmarks.md).
        sup_weight: ``m3hl`` mode: weight of CE + Dice of the painted slices
            unmixed, beside the mixed images' loss (0: the paper's step;
            :attr:`napari_m3hl.config.TrainConfig.sup_weight`).
        mix_dice: ``m3hl`` mode: where the mixed images' Dice is pooled,
            ``"regions"`` (the paper's code), ``"whole"`` or ``"none"`` (CE
            only; :func:`napari_m3hl.method.losses.mix_loss`).
        check_every: iterations between checks of the unpainted slices' segmentation.
        early_stop: stop when a check changes less than ``stop_change`` (1 − mean
            Dice between successive segmentations of the unpainted slices).
        stop_change: see ``early_stop``.
        intensity: ``"minmax"`` (the ACDC training data's scaling) or
            ``"percentile"`` (0.5–99.5 % clipped) scaling of the image to [0, 1].
        aug_scale, aug_gamma: zoom and intensity gamma added to the papers'
            augmentation of the training slices
            (:func:`napari_m3hl.method.augment.augment_scale_gamma`; 0 = off).
        start_blend: weight ``w`` of the start model's class probabilities in the
            segmentation, ``w·p_start + (1 − w)·p_student``, when the start model
            segments the painted slices at ``trust_high`` Dice or better (0: the
            fine-tuned student alone, always). Needs ``segment_with="student"``;
            the fine-tune's checkpoint keeps the start weights and the weight
            used, so ``m3hl predict`` segments the same way
            (:mod:`napari_m3hl.inference.blend`).
        start_blend_untrusted: ``w`` when the start model scores ``trust_low``
            or less on the painted slices (linear in between;
            :func:`napari_m3hl.fewslice.trust.choose_blend`); equal to
            ``start_blend`` for a fixed weight.
        start_blend_stable: ``w`` for a start model scoring ``trust_low`` or less
            when the fine-tuned student's segmentation of the unpainted slices
            changed by less than ``stable_change`` (1 − Dice) since the previous
            check (:func:`napari_m3hl.fewslice.trust.settle_blend`). For a fixed
            weight set ``start_blend_untrusted`` and this to ``start_blend``.
        stable_change: see ``start_blend_stable`` (0..1).
        trust_low, trust_high: the start model's mean Dice (0..1) over the painted
            classes on the painted slices between which ``w`` goes from
            ``start_blend_untrusted`` (or ``start_blend_stable``) to ``start_blend``.
        clean: keep each class's largest 3D connected component in the
            segmentations shown (the start model's and each check's), as
            :class:`napari_m3hl.inference.predictor.Predictor` does by default.
        seed: random seed.
        device: ``auto``, ``cpu``, ``cuda``, ``mps``.
    """

    iterations: int = 75
    lr: float = 0.01
    batch_size: int = 8
    mode: str = "supervised"
    l2_to_start: float = 0.0
    freeze: str = ""
    segment_with: str = "student"
    ema_decay: float = 1.0
    teacher_bn: str = "ema"
    warm_frac: float = 0.53
    sup_weight: float = 1.0
    mix_dice: str = "none"
    check_every: int = 25
    early_stop: bool = False
    stop_change: float = 0.005
    intensity: str = "minmax"
    aug_scale: float = 0.0
    aug_gamma: float = 0.0
    m3hl_lr_scale: float = 1.0
    start_blend: float = 0.6
    start_blend_untrusted: float = 0.55
    start_blend_stable: float = 0.4
    stable_change: float = 0.04
    trust_low: float = 0.85
    trust_high: float = 0.92
    clean: bool = True
    seed: int = 1337
    device: str = "auto"

    @property
    def warm_iterations(self) -> int:
        """Supervised iterations before the M³HL step: ``warm_frac`` of
        ``iterations``, rounded, leaving at least one M³HL step (0 in
        supervised mode)."""
        if self.mode != "m3hl":
            return 0
        return max(0, min(int(round(self.warm_frac * self.iterations)), self.iterations - 1))

    def summary(self) -> str:
        """One line of the settings, for help texts and logs."""
        net = "the EMA teacher" if self.segment_with == "teacher" else "the student"
        extra = (f", L2 to start {self.l2_to_start:g}" if self.l2_to_start else "") + \
            (f", frozen {self.freeze}" if self.freeze else "") + (", early stop" if self.early_stop else "")
        if self.mode == "m3hl":
            frozen = self.ema_decay >= 1.0 and self.teacher_bn == "ema"
            warm = self.warm_iterations
            first = f"supervised for {warm} iterations, then that network" if warm else "the start model"
            extra += f", {first} as a frozen teacher" if frozen else \
                (f", supervised for {warm} iterations first" if warm else "") + \
                f", EMA teacher {self.ema_decay:g} (BatchNorm statistics: {self.teacher_bn})"
            if warm and self.m3hl_lr_scale != 1.0:
                extra += f", the M³HL iterations at {self.m3hl_lr_scale:g}× that learning rate"
            extra += f", mixed images' Dice: {self.mix_dice}" + \
                (f", painted slices unmixed at weight {self.sup_weight:g}" if self.sup_weight else "")
        if self.start_blend > 0:
            fixed = self.start_blend_untrusted == self.start_blend_stable == self.start_blend
            share = f"{self.start_blend:g}" if fixed else \
                (f"{self.start_blend_untrusted:g}–{self.start_blend:g} of its probabilities, as it scores "
                 f"{100 * self.trust_low:g}–{100 * self.trust_high:g} Dice on the painted slices; down to "
                 f"{self.start_blend_stable:g} when the fine-tuned network's segmentation changes less than "
                 f"{self.stable_change:g} (1 − Dice) between checks")
            net = f"{net} blended with the start model ({share})"
        return (f"{self.iterations} iterations at lr {self.lr:g}, batch {self.batch_size}, {self.mode}{extra}, "
                f"segmenting with {net}" + ("" if self.clean else ", not cleaned"))


@dataclass
class Check:
    """Event of :func:`run`: the segmentation at ``iteration``.

    ``labels``: (D, H, W) uint8, the first volume's segmentation as the user is
    shown it (the segmenting network, blended with the start model when
    ``job.blend.weight > 0``); ``networks``: the first volume's per network,
    alone (``"student"``, ``"teacher"``); ``volumes``: the shown segmentation of
    every volume of the job, in its order (``volumes[0] is labels``);
    ``instability``: 1 − mean Dice between the unpainted slices' segmentation now
    and at the previous check, averaged over the volumes (NaN at the first);
    ``stopping``: early stop; ``blend``: the start model's share in ``labels``
    (:func:`napari_m3hl.fewslice.trust.settle_blend`).
    """

    iteration: int
    labels: np.ndarray
    networks: dict[str, np.ndarray]
    instability: float
    stopping: bool
    volumes: list[np.ndarray] = field(default_factory=list)
    blend: BlendChoice = field(default_factory=lambda: BlendChoice(0.0, None))


@dataclass
class PseudoLabels:
    """Event of :func:`run` in ``m3hl`` mode, after each :class:`Check`: what the
    teacher teaches at ``iteration``.

    ``labels``: one (D, H, W) uint8 per volume of the job, the teacher's
    pseudo-labels of its unpainted slices as the M³HL step makes them
    (:func:`napari_m3hl.method.teacher.pseudo_labels`: argmax, then the largest
    component per class and slice when ``config.pseudo_lcc``), from the
    teacher's prediction of the whole volume at its own resolution (training
    labels resized patches at the model's input size); 0 on the painted
    slices, which are taught from the paint. ``painted_dice``: per volume, the
    mean Dice over the foreground classes of the teacher's pseudo-labels on
    the painted slices against the paint (0..1; NaN for an unlabeled volume).
    """

    iteration: int
    labels: list[np.ndarray]
    painted_dice: list[float]


@dataclass
class FewSliceVolume:
    """One volume of a fine-tune. ``image``: (D, H, W) float32 scaled as the
    start model expects; ``painted``: (D, H, W) uint8, or None for an
    unlabeled volume; ``base``: the start model's segmentation (D, H, W)
    uint8; ``base_probs``: its class probabilities (C, D, H, W) float32, for
    the blend."""

    name: str
    image: np.ndarray
    painted: np.ndarray | None
    base: np.ndarray
    base_probs: np.ndarray | None = None

    @property
    def painted_slices(self) -> np.ndarray:
        """Indices of the slices with any nonzero label (none for an unlabeled volume)."""
        return np.zeros(0, np.int64) if self.painted is None else labeled_slices(self.painted)


@dataclass
class FewSliceJob:
    """What :func:`run` needs: the config, the training data, the start file
    and the volumes (labeled ones first; ``volumes[0]`` is labeled), and the
    start model's share of the segmentation (``blend``). ``image``,
    ``painted``, ``painted_slices``, ``base`` and ``base_probs`` are the first
    volume's."""

    config: TrainConfig
    data: Any
    start: Path
    volumes: list[FewSliceVolume]
    options: FewSliceOptions = field(default_factory=FewSliceOptions)
    blend: BlendChoice = field(default_factory=lambda: BlendChoice(0.0, None))

    @property
    def image(self) -> np.ndarray:
        return self.volumes[0].image

    @property
    def painted(self) -> np.ndarray:
        return self.volumes[0].painted

    @property
    def painted_slices(self) -> np.ndarray:
        return self.volumes[0].painted_slices

    @property
    def base(self) -> np.ndarray:
        return self.volumes[0].base

    @property
    def base_probs(self) -> np.ndarray | None:
        return self.volumes[0].base_probs


@dataclass
class VolumeResult:
    """One volume's end of :func:`run`: ``labels`` the fine-tuned segmentation
    (D, H, W) uint8 as shown, ``network`` the fine-tuned network's alone,
    ``base`` the start model's, ``verdict`` the safeguard's (None for an
    unlabeled volume: nothing painted to judge by)."""

    name: str
    labels: np.ndarray
    network: np.ndarray
    base: np.ndarray
    verdict: Verdict | None


@dataclass
class FewSliceResult:
    """End of :func:`run`. ``labels``: the first volume's fine-tuned
    segmentation (D, H, W) uint8, as shown and as ``checkpoint`` predicts it
    (blended with the start model when ``blend.weight > 0``; the painted
    slices are not merged in, see :func:`napari_m3hl.fewslice.safeguard.merge_painted`);
    ``network``: the fine-tuned network's alone; ``base``: the start model's;
    ``verdict``: the safeguard's; ``volumes``: the same for every volume of
    the job, in its order; ``checkpoint``: the fine-tune's last checkpoint
    (None without ``out_dir``); ``iterations`` run; ``seconds`` from the start
    of training to the final segmentation; ``blend``: the start model's share
    of the segmentation and what it was chosen from."""

    labels: np.ndarray
    base: np.ndarray
    verdict: Verdict
    checkpoint: str | None
    iterations: int
    seconds: float
    stopped_early: bool
    network: np.ndarray | None = None
    volumes: list[VolumeResult] = field(default_factory=list)
    blend: BlendChoice = field(default_factory=lambda: BlendChoice(0.0, None))


def scale_intensity(image: np.ndarray, how: str = "minmax", name: str = "image") -> np.ndarray:
    """(D, H, W) float32 in [0, 1]: ``minmax`` (as the ACDC training volumes)
    or ``percentile`` (:func:`napari_m3hl.io.intensity.normalize_intensity`);
    ``name`` names the volume in the error about NaN or infinite voxels."""
    from napari_m3hl.io.checks import validate_image
    from napari_m3hl.io.intensity import scale_intensity as _scale

    img = np.asarray(image, dtype=np.float32)
    validate_image(img, name)  # names the bad voxels (NaN, inf) before any scaling
    return _scale(img, how)


def scaled_block(config: dict[str, Any], patch: Sequence[int]) -> tuple[int, ...]:
    """The mask block at the start model's input size ``patch``: the block of
    its training config scaled by ``patch`` / its training patch, else
    :data:`PAPER_BLOCK_SHARE` of each axis (at least 1 voxel)."""
    block = tuple(config.get("block_size") or ())
    trained = tuple(config.get("patch_size") or ())
    if len(block) == len(trained) == len(patch):
        return tuple(max(1, int(round(b * p / t))) for b, p, t in zip(block, patch, trained))
    return tuple(max(1, int(round(p * PAPER_BLOCK_SHARE))) for p in patch)


def fewslice_config(ckpt: dict[str, Any], options: FewSliceOptions) -> TrainConfig:
    """The fine-tune's config: the start checkpoint's network, input size
    (``ckpt["patch_size"]``), resizing (``image_interp``), classes and mask
    block (:func:`scaled_block`), with the few-slice schedule of ``options``.
    The teacher labels in eval mode with the BatchNorm statistics of
    ``options.teacher_bn``."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    base = {k: v for k, v in (ckpt.get("config") or {}).items() if k in names}
    patch = tuple(int(p) for p in ckpt["patch_size"])
    names_c = tuple(ckpt.get("class_names") or base.get("class_names") or
                    [f"class {c}" for c in range(int(ckpt["num_classes"]))])
    cfg = TrainConfig.from_dict(base).replace(
        arch=ckpt["arch"], in_channels=int(ckpt["in_channels"]), num_classes=int(ckpt["num_classes"]),
        class_names=names_c,
        patch_size=patch, block_size=scaled_block(base, patch), image_interp=base.get("image_interp", "bilinear"),
        iterations=options.iterations, lr=options.lr, batch_size=options.batch_size, mode=options.mode,
        lr_schedule="constant", l2_to_start=options.l2_to_start, freeze=options.freeze,
        ema_decay=options.ema_decay, ema_warmup=False, warm_start=options.warm_iterations, warm_frac=0.0,
        alpha_rampup=0, unsup_rampup=0,
        sup_weight=options.sup_weight, mix_dice=options.mix_dice,
        aug_scale=options.aug_scale, aug_gamma=options.aug_gamma, m3hl_lr_scale=options.m3hl_lr_scale,
        intensity=options.intensity,  # recorded, so `m3hl predict` and the widget scale as the fine-tune did
        teacher_init="copy", teacher_mode="eval", teacher_bn=options.teacher_bn,
        pl_eval_every=0, val_every=0, checkpoint_every=options.check_every, seed=options.seed, device=options.device,
        preset="fewslice", variant="",
    )
    cfg.validate()
    return cfg


def _check_options(options: FewSliceOptions) -> None:
    if options.mode not in ("supervised", "m3hl"):
        raise M3HLInputError(f"mode must be 'supervised' or 'm3hl', got {options.mode!r}")
    if options.teacher_bn not in ("ema", "copy"):
        raise M3HLInputError(f"teacher_bn must be 'ema' or 'copy', got {options.teacher_bn!r}")
    if not 0.0 <= options.warm_frac < 1.0:
        raise M3HLInputError(f"warm_frac (the share of the iterations trained supervised before the M³HL step) must "
                             f"lie in [0, 1); got {options.warm_frac}")
    if options.segment_with not in ("teacher", "student"):
        raise M3HLInputError(f"segment_with must be 'teacher' or 'student', got {options.segment_with!r}")
    if not 0.0 <= options.start_blend <= 1.0:
        raise M3HLInputError(f"start_blend (--start-blend) is the start model's share of the segmentation and must "
                             f"lie in [0, 1]; got {options.start_blend}")
    if not 0.0 <= options.start_blend_untrusted <= 1.0:
        raise M3HLInputError(f"start_blend_untrusted (--start-blend-untrusted) is the start model's share of the "
                             f"segmentation when it segments the painted slices poorly and must lie in [0, 1]; got "
                             f"{options.start_blend_untrusted}")
    if not 0.0 <= options.start_blend_stable <= 1.0:
        raise M3HLInputError(f"start_blend_stable (--start-blend-stable) is the start model's share of the "
                             f"segmentation when it segments the painted slices poorly and the fine-tuned network "
                             f"has settled; it must lie in [0, 1]; got {options.start_blend_stable}")
    if not 0.0 <= options.stable_change <= 1.0:
        raise M3HLInputError(f"stable_change is a share of the segmentation (0..1); got {options.stable_change}")
    if not 0.0 <= options.trust_low <= options.trust_high <= 1.0:
        raise M3HLInputError(f"trust_low and trust_high are Dice scores (0..1) with trust_low <= trust_high; got "
                             f"{options.trust_low} and {options.trust_high}")
    if options.start_blend > 0 and options.segment_with != "student":
        raise M3HLInputError(f"start_blend blends the student only; got segment_with={options.segment_with!r} "
                             "(set start_blend=0 to segment with the teacher)")


def prepare(start: str | Path, image: np.ndarray, painted: np.ndarray,
            options: FewSliceOptions | None = None) -> FewSliceJob:
    """Build the fine-tune of ``start`` on one ``image`` (D, H, W) with the labels
    ``painted`` (D, H, W; nonzero on the painted slices): :func:`prepare_volumes`
    with one pair and no unlabeled volume."""
    return prepare_volumes(start, [(image, painted)], (), options, names=["volume"])


def prepare_volumes(start: str | Path, labeled: Sequence[tuple[np.ndarray, np.ndarray]],
                    unlabeled: Sequence[np.ndarray] = (), options: FewSliceOptions | None = None,
                    names: Sequence[str] | None = None) -> FewSliceJob:
    """Build the fine-tune of ``start`` on the ``labeled`` (image, painted labels)
    pairs, each two (D, H, W) volumes of one shape (nonzero on the painted
    slices; volumes may differ in size), and the ``unlabeled`` (D, H, W)
    images, with the start model's segmentation of every volume. ``names``
    (one per pair, then one per unlabeled image) name the volumes in errors
    and results. Raises :class:`M3HLInputError` naming the problem."""
    from napari_m3hl.data.volumes import PartlyLabeledVolume
    from napari_m3hl.inference.predictor import Predictor
    from napari_m3hl.io.checkpoint import load_checkpoint
    from napari_m3hl.runtime import resolve_device

    options = options or FewSliceOptions()
    _check_options(options)
    labeled, unlabeled = list(labeled), list(unlabeled)
    if not labeled:
        raise M3HLInputError("the few-slice loop needs at least one image with painted labels")
    names = list(names) if names is not None else \
        [f"volume {i}" for i in range(len(labeled))] + [f"unlabeled {j}" for j in range(len(unlabeled))]
    if len(names) != len(labeled) + len(unlabeled):
        raise M3HLInputError(f"{len(names)} names for {len(labeled)} labeled and {len(unlabeled)} unlabeled volumes")
    ckpt = load_checkpoint(start)
    if len(ckpt["patch_size"]) != 2:
        raise M3HLInputError(f"start model {start} is a 3D network; the few-slice loop fine-tunes 2D (slice-wise) models")
    cfg = fewslice_config(ckpt, options)
    images, paints = [], []
    for (image, painted), name in zip(labeled, names):
        img, lab = np.asarray(image), np.asarray(painted)
        if img.ndim != 3 or lab.shape != img.shape:
            raise M3HLInputError(f"{name}: image {img.shape} and painted labels {lab.shape} must be two (D, H, W) "
                                 "volumes of one shape")
        if lab.size and (lab.min() < 0 or lab.max() >= cfg.num_classes):
            raise M3HLInputError(f"{name}: painted labels hold values {int(lab.min())}..{int(lab.max())}, but {start} "
                                 f"has {cfg.num_classes} classes ({', '.join(cfg.class_names)}: 0..{cfg.num_classes - 1})")
        images.append(scale_intensity(img, options.intensity, name))
        paints.append(lab.astype(np.uint8))
    extra = []
    for image, name in zip(unlabeled, names[len(labeled):]):
        img = np.asarray(image)
        if img.ndim != 3:
            raise M3HLInputError(f"{name}: an unlabeled image must be one (D, H, W) volume, got shape {img.shape}")
        extra.append(scale_intensity(img, options.intensity, name))
    plv = PartlyLabeledVolume.from_volumes(images, paints, extra, num_classes=cfg.num_classes, normalize=False,
                                           names=names[:len(labeled)])
    data = plv.train_data(cfg.class_names)
    base = Predictor.from_checkpoint(blend_partner(ckpt), "student", resolve_device(options.device),
                                     blend=False, clean=options.clean)
    volumes = []
    for img, lab, name in zip(images + extra, paints + [None] * len(extra), names):
        base_labels, base_probs = base.predict(img, return_probs=True)
        volumes.append(FewSliceVolume(name, img, lab, base_labels, base_probs))
    blend = choose_blend([v.base for v in volumes], [v.painted for v in volumes], cfg.class_names,
                         options.start_blend, options.start_blend_untrusted, options.trust_low, options.trust_high)
    return FewSliceJob(cfg, data, Path(start), volumes, options, blend)


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


def teacher_pseudo_labels(probs: np.ndarray, lcc: bool) -> np.ndarray:
    """(D, H, W) uint8: the pseudo-labels of a volume from the teacher's class
    probabilities (C, D, H, W), slice by slice as the M³HL step makes them
    (:func:`napari_m3hl.method.teacher.pseudo_labels`; the argmax of the
    probabilities is the argmax of the logits)."""
    import torch

    from napari_m3hl.method.teacher import pseudo_labels

    slices = torch.from_numpy(np.ascontiguousarray(np.moveaxis(probs, 0, 1)))  # (D, C, H, W)
    return pseudo_labels(slices, lcc=lcc, on_device=False).numpy().astype(np.uint8)


def finish_checkpoint(path: str | Path, start: str | Path | None, weight: float, early_stop: bool) -> None:
    """Rewrite a fine-tune's final checkpoint (atomically): with ``start``, add
    the start model's weights and the blend weight, so
    :class:`napari_m3hl.inference.predictor.Predictor` segments with the same
    blend as the loop showed; with ``early_stop`` (the run ended by its early
    stop rule, the way it is meant to end), mark it ``completed``."""
    from napari_m3hl.io.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(path)
    if start is not None:
        ckpt["start"] = blend_partner(load_checkpoint(start))["student"]
        ckpt["start_blend"] = float(weight)
    if early_stop:
        ckpt["completed"] = True
    ckpt.pop("weights_sha256", None)
    save_checkpoint(path, ckpt)


@dataclass
class _Segmented:
    """Every volume at one checkpoint: shown (blended) labels, each network's alone, the teacher's probabilities."""

    shown: list[np.ndarray]
    networks: list[dict[str, np.ndarray]]
    teacher_probs: list[np.ndarray]
    blend: BlendChoice = field(default_factory=lambda: BlendChoice(0.0, None))


def run(job: FewSliceJob, out_dir: str | Path | None = None, control: Any = None,
        mix_preview_every_s: float | None = None) -> Iterator[Any]:
    """Fine-tune and yield the trainer's events (``MixPreview`` every
    ``mix_preview_every_s`` seconds in ``m3hl`` mode), a :class:`Check` every
    ``options.check_every`` iterations followed in ``m3hl`` mode by the
    teacher's :class:`PseudoLabels`, and last a :class:`FewSliceResult`."""
    from napari_m3hl.inference.predictor import Predictor
    from napari_m3hl.io.checkpoint import load_checkpoint
    from napari_m3hl.runtime import resolve_device
    from napari_m3hl.training import events as ev
    from napari_m3hl.training.trainer import TrainControl, train

    opts, cfg = job.options, job.config
    m3hl = cfg.mode == "m3hl"
    control = control or TrainControl()
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="m3hl-fewslice-")
        out_dir = tmp.name
    unpainted = [np.setdiff1d(np.arange(v.image.shape[0]), v.painted_slices) for v in job.volumes]
    t0 = time.perf_counter()
    prev: list[np.ndarray] | None = None
    seg: _Segmented | None = None
    stopped_early = False
    final_ckpt = None
    iterations = 0
    checked = -1

    device = resolve_device(cfg.device)  # the training device: the checks segment where the networks train
    depth = max(int(v.image.shape[0]) for v in job.volumes)

    # a frozen teacher (decay 1, its BatchNorm statistics kept) segments alike at every check: once is enough
    frozen_teacher = cfg.ema_decay >= 1.0 and cfg.teacher_bn == "ema" and cfg.warm_iterations == 0
    teacher_seen: list[tuple[np.ndarray, np.ndarray]] = []  # (labels, probs) per volume, from the first check
    previous_networks: list[dict[str, np.ndarray]] = []  # each volume's networks' labels at the previous check

    def segment(path: str) -> _Segmented:
        ckpt = load_checkpoint(path)
        # each network segments a volume in one batch of all its slices
        predictors = {which: Predictor.from_checkpoint(ckpt, which, device, batch_size=max(16, depth),
                                                       clean=opts.clean)
                      for which in ("teacher", "student") if which == "student" or not teacher_seen}
        out = _Segmented([], [], [])
        probs_of: list[dict[str, np.ndarray]] = []
        for k, v in enumerate(job.volumes):
            nets: dict[str, np.ndarray] = {}
            probs_k: dict[str, np.ndarray] = {}
            for which in ("teacher", "student"):
                if which in predictors:
                    lab, probs = predictors[which].predict(v.image, return_probs=True)
                    if which == "teacher" and frozen_teacher:
                        teacher_seen.append((lab, probs))
                else:
                    lab, probs = teacher_seen[k]
                nets[which], probs_k[which] = lab, probs
                if which == "teacher":
                    out.teacher_probs.append(probs)
            out.networks.append(nets)
            probs_of.append(probs_k)
        # the student's change since the previous check, on the labeled volumes' unpainted slices,
        # settles the start model's share (napari_m3hl.fewslice.trust.settle_blend)
        moves = [1.0 - mean_dice(nets["student"][u], before["student"][u], cfg.num_classes)
                 for nets, before, u, v in zip(out.networks, previous_networks or [], unpainted, job.volumes)
                 if u.size and v.painted is not None]
        out.blend = settle_blend(job.blend, float(np.mean(moves)) if moves else None, opts.start_blend,
                                 opts.start_blend_untrusted, opts.start_blend_stable, opts.stable_change,
                                 opts.trust_low, opts.trust_high)
        previous_networks[:] = out.networks
        cleaner = predictors["student"]  # cleans as the teacher's would: one `clean` setting
        for v, nets, probs_k in zip(job.volumes, out.networks, probs_of):
            which = opts.segment_with
            out.shown.append(cleaner.finish(blend_labels(v.base_probs, probs_k[which], out.blend.weight))
                             if out.blend.weight > 0 else nets[which])
        return out

    def pseudo(iteration: int, s: _Segmented) -> PseudoLabels:
        labels, scores = [], []
        for v, probs in zip(job.volumes, s.teacher_probs):
            pl = teacher_pseudo_labels(probs, cfg.pseudo_lcc)
            ps = v.painted_slices
            scores.append(mean_dice(pl[ps], v.painted[ps], cfg.num_classes) if ps.size else float("nan"))
            pl[ps] = 0
            labels.append(pl)
        return PseudoLabels(iteration, labels, scores)

    try:
        for e in train(cfg, job.data, out_dir, init_from=job.start, control=control,
                       mix_preview_every_s=mix_preview_every_s if m3hl else None):
            if isinstance(e, ev.CheckpointSaved) and e.kind in ("last", "final") and e.iteration != checked:
                checked = e.iteration
                seg = segment(e.path)
                moves = [1.0 - mean_dice(now[u], before[u], cfg.num_classes)
                         for now, before, u in zip(seg.shown, prev or [], unpainted) if u.size]
                instability = float(np.mean(moves)) if moves else float("nan")
                stopping = bool(opts.early_stop and e.kind == "last" and np.isfinite(instability)
                                and instability < opts.stop_change)
                prev = seg.shown
                yield Check(e.iteration, seg.shown[0], seg.networks[0], instability, stopping, list(seg.shown),
                            seg.blend)
                if m3hl and e.iteration > cfg.warm_iterations:  # pseudo-labels only once they are taught
                    yield pseudo(e.iteration, seg)
                if stopping:
                    stopped_early = True
                    control.stop()
            if isinstance(e, ev.TrainFinished):
                final_ckpt, iterations = e.checkpoint, e.iteration
                weight = seg.blend.weight if seg is not None else job.blend.weight
                if final_ckpt and (weight > 0 or stopped_early):
                    finish_checkpoint(final_ckpt, job.start if weight > 0 else None, weight, stopped_early)
            yield e
        results = []
        for v, shown, nets in zip(job.volumes, seg.shown, seg.networks):
            verdict = None if v.painted is None else \
                check_finetune(v.base, shown, v.painted, cfg.num_classes, tuple(cfg.class_names))
            results.append(VolumeResult(v.name, shown, nets[opts.segment_with], v.base, verdict))
        first = results[0]
        yield FewSliceResult(first.labels, first.base, first.verdict, None if tmp else final_ckpt, iterations,
                             time.perf_counter() - t0, stopped_early, first.network, results, seg.blend)
    finally:
        if tmp is not None:
            tmp.cleanup()
