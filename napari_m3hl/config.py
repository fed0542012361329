"""Training configuration and the presets in ``models/*.yaml``.

A preset holds the shared settings of one setting of the paper (ACDC 2D,
LA 3D) and a ``variants`` table for where the paper and the authors' code
differ (see docs/method.md). ``load_preset(name, variant, **overrides)``
returns a :class:`TrainConfig`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from napari_m3hl.errors import M3HLInputError
from napari_m3hl.labels import ACDC_CLASSES

def _models_dir() -> Path:
    """Presets and shipped weights: the repository's ``models/`` folder (source
    or editable install) or ``napari_m3hl/models`` inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for cand in (here / "models", here.parent / "models"):
        if (cand / "acdc_unet2d.yaml").is_file():
            return cand
    return here.parent / "models"


MODELS_DIR = _models_dir()

MODES = ("m3hl", "supervised")


@dataclass
class TrainConfig:
    """Everything that defines a training run. Sizes in pixels/voxels."""

    arch: str = "unet2d"
    in_channels: int = 1
    num_classes: int = 4
    class_names: tuple[str, ...] = ACDC_CLASSES
    patch_size: tuple[int, ...] = (256, 256)
    batch_size: int = 24  # labeled + unlabeled; each half splits into a/b
    iterations: int = 30000
    # optimiser
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: str = "constant"  # constant | poly | step
    lr_step: int = 2500  # for "step": ×0.1 every lr_step iterations
    # M³HL
    mode: str = "m3hl"  # m3hl | supervised
    block_size: tuple[int, ...] = (64, 64)
    mask_ratio: float = 0.5
    alpha: float = 0.5  # weight of pseudo-labelled regions in L_mix
    lam: float = 0.5  # λ, weight of L_HL
    mix_weight: float = 1.0  # weight of L_mix (0.5 in the reference code)
    use_mix: bool = True  # L_mix (False: supervised loss on the labeled images instead)
    use_hl: bool = True  # L_HL
    mix_dice: str = "regions"  # L_mix's Dice: regions (pooled in M and in 1−M, the reference code) | whole (one Dice, pixels weighted) | none
    sup_weight: float = 0.0  # weight of CE + Dice on the labeled images unmixed, beside L_mix (0: the paper's step)
    low_tap: str = "low_enc"  # low_enc (paper) | low_dec (reference code)
    # teacher
    ema_decay: float = 0.99
    ema_warmup: bool = False
    teacher_init: str = "copy"  # copy | independent
    teacher_mode: str = "eval"  # eval | train (dropout + batch-stat BN when labelling)
    teacher_bn: str = "own"  # eval-mode teacher's BatchNorm: own (batch stats when labelling, own running stats) | copy (the student's) | ema (averaged; reference code)
    pseudo_lcc: bool = True
    # recipe for short budgets (0 = off, the paper's recipe)
    warm_start: int = 0  # supervised-only iterations first; the teacher then restarts as a copy of the student
    warm_frac: float = 0.0  # the same as a fraction of `iterations` (used when warm_start is 0; the `fast` variant)
    m3hl_lr_scale: float = 1.0  # after a warm start, the M³HL iterations' learning rate as a multiple of the schedule's
    alpha_rampup: int = 0  # α ramps linearly from 0 over this many M³HL iterations
    unsup_rampup: int = 0  # L_mix and L_HL ramp linearly from 0 over this many M³HL iterations, sup_weight's term at full weight (fine-tuning; 0 = off)
    # diagnostics
    pl_eval_every: int = 0  # score pseudo-labels against the hidden labels of unlabeled data every N iterations
    pl_eval_samples: int = 64  # unlabeled samples (fixed, seeded) in that score
    # fine-tuning from a start model (0 / "" = off)
    l2_to_start: float = 0.0  # weight of sum((θ - θ_start)²) added to the loss (L2-SP)
    freeze: str = ""  # "encoder" (encoder weights) and/or "bn" (BatchNorm running stats) stay at their start values, e.g. "encoder,bn"
    # data
    image_interp: str = "bilinear"  # bilinear | nearest (reference code)
    aug_scale: float = 0.0  # 2D: zoom log-uniform in [1/(1+s), 1+s] after the papers' augmentation (0 = off, the papers')
    aug_gamma: float = 0.0  # 2D: intensity gamma log-uniform in [1/(1+g), 1+g] after it (0 = off, the papers')
    intensity: str = "percentile"  # how raw images (NIfTI, layers) are scaled to [0, 1] for this network: percentile | minmax
    # run
    seed: int = 1337
    device: str = "auto"
    # speed (docs/benchmarks.md, "Training step speed"); none of these changes the method
    amp: bool = True  # False forces fp32 whatever `precision` says (older presets and checkpoints)
    precision: str = "auto"  # auto | fp32 | bf16 autocast; auto = bf16 on CUDA and on CPUs with native bf16
    channels_last: bool = True  # NHWC memory format for 2D networks and batches
    compile: bool = False  # torch.compile the networks' forward (pays off on GPUs; first step compiles)
    readback_every: int = 0  # steps between loss read-backs to the host; 0 = every step on CPU, 25 on GPU
    val_every: int = 200
    checkpoint_every: int = 1000
    preset: str = ""
    variant: str = ""
    # GPU pace (issue 22; docs/benchmarks.md, "GPU path"); neither changes the method
    data_on_device: str = "auto"  # auto | on | off: the training set held and augmented on the device (auto: on CUDA when it fits)
    capture: str = "off"  # off | auto | cuda-graph | compile: the whole step captured (CUDA only; elsewhere the eager step, logged)

    @property
    def ndim(self) -> int:
        return len(self.patch_size)

    @property
    def warm_iterations(self) -> int:
        """Supervised-only iterations before the M³HL phase: ``warm_start``,
        else ``warm_frac`` of ``iterations`` (0 in supervised mode)."""
        if self.mode != "m3hl":
            return 0
        return int(self.warm_start) if self.warm_start > 0 else int(round(self.warm_frac * self.iterations))

    def validate(self) -> None:
        """Raise :class:`M3HLInputError` naming the bad setting."""
        _check_types(self)
        from napari_m3hl.method.networks import ARCHITECTURES, network_ndim

        if self.arch not in ARCHITECTURES:
            raise M3HLInputError(f"arch must be one of {sorted(ARCHITECTURES)}, got {self.arch!r}")
        if self.mode not in MODES:
            raise M3HLInputError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.in_channels < 1 or self.num_classes < 2:
            raise M3HLInputError(f"in_channels must be >= 1 and num_classes >= 2, got {self.in_channels}, {self.num_classes}")
        if self.batch_size < 4 or self.batch_size % 4:
            raise M3HLInputError(
                f"batch size must be a multiple of 4 (labeled a/b + unlabeled a/b halves), got {self.batch_size}"
            )
        if self.iterations < 1:
            raise M3HLInputError(f"iterations must be at least 1, got {self.iterations}")
        if len(self.patch_size) != network_ndim(self.arch) or min(self.patch_size) < 1:
            raise M3HLInputError(
                f"patch size {self.patch_size} must be {network_ndim(self.arch)} positive sizes for a {self.arch}, "
                "e.g. --patch-size 256,256 (2D) or 112,112,80 (3D)"
            )
        if len(self.block_size) != len(self.patch_size):
            raise M3HLInputError(
                f"block size {self.block_size} and patch size {self.patch_size} need the same number of axes"
            )
        if min(self.block_size) < 1:
            raise M3HLInputError(f"block size {self.block_size} must be positive, e.g. a quarter of the patch size")
        if any(b > p for b, p in zip(self.block_size, self.patch_size)):
            raise M3HLInputError(
                f"block size {self.block_size} is larger than the patch size {self.patch_size}: the mask would "
                f"have a single block and nothing would be mixed; use smaller blocks, e.g. "
                f"{derive_block(self.patch_size)} (a 4x4 grid, the paper's)"
            )
        if not 0.0 <= self.mask_ratio <= 1.0:
            raise M3HLInputError(f"mask ratio must lie in [0, 1], got {self.mask_ratio}")
        n_blocks = math.prod(math.ceil(p / b) for p, b in zip(self.patch_size, self.block_size))
        k = int(round(self.mask_ratio * n_blocks))
        if self.mode == "m3hl" and 0.0 < self.mask_ratio < 1.0 and k in (0, n_blocks):
            raise M3HLInputError(
                f"with patch {self.patch_size}, block {self.block_size} and mask ratio {self.mask_ratio} the mask has "
                f"{n_blocks} block(s) and would take {'nothing' if k == 0 else 'everything'} from the labeled "
                f"image; use smaller blocks, e.g. {derive_block(self.patch_size)}"
            )
        for name in ("lr", "alpha", "lam", "mix_weight", "sup_weight", "momentum", "weight_decay", "ema_decay"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise M3HLInputError(f"{name} must be a finite number >= 0, got {v}")
        if self.lr <= 0:
            raise M3HLInputError(f"lr (learning rate) must be > 0, got {self.lr}")
        if self.ema_decay > 1:
            raise M3HLInputError(f"ema_decay must lie in [0, 1], got {self.ema_decay}")
        if self.lr_step < 1 or self.val_every < 0 or self.checkpoint_every < 0:
            raise M3HLInputError("lr_step must be >= 1, val_every and checkpoint_every >= 0")
        if self.mix_dice not in ("regions", "whole", "none"):
            raise M3HLInputError(f"mix_dice must be 'regions', 'whole' or 'none', got {self.mix_dice!r}")
        if self.low_tap not in ("low_enc", "low_dec"):
            raise M3HLInputError(f"low_tap must be 'low_enc' or 'low_dec', got {self.low_tap!r}")
        if self.lr_schedule not in ("constant", "poly", "step"):
            raise M3HLInputError(f"lr_schedule must be constant, poly or step, got {self.lr_schedule!r}")
        if self.teacher_mode not in ("eval", "train") or self.teacher_init not in ("copy", "independent"):
            raise M3HLInputError("teacher_mode must be eval|train and teacher_init copy|independent")
        for name in ("warm_start", "alpha_rampup", "unsup_rampup", "pl_eval_every", "pl_eval_samples"):
            if int(getattr(self, name)) < 0:
                raise M3HLInputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.warm_frac < 1.0:
            raise M3HLInputError(f"warm_frac must lie in [0, 1), got {self.warm_frac}")
        if not self.m3hl_lr_scale > 0:
            raise M3HLInputError(f"m3hl_lr_scale (the M³HL iterations' learning rate after a warm start, as a "
                                 f"multiple of the schedule's) must be > 0, got {self.m3hl_lr_scale}")
        if self.aug_scale < 0 or self.aug_gamma < 0:
            raise M3HLInputError(f"aug_scale and aug_gamma are ranges (0 = off) and must be >= 0, got "
                                 f"{self.aug_scale}, {self.aug_gamma}")
        if self.l2_to_start < 0 or not set(filter(None, self.freeze.split(","))) <= {"encoder", "bn"}:
            raise M3HLInputError(f"l2_to_start must be >= 0 and freeze a comma list of 'encoder', 'bn'; "
                                 f"got {self.l2_to_start}, {self.freeze!r}")
        if self.teacher_bn not in ("copy", "ema", "own"):
            raise M3HLInputError(f"teacher_bn must be 'copy', 'ema' or 'own', got {self.teacher_bn!r}")
        if self.image_interp not in ("bilinear", "nearest"):
            raise M3HLInputError(f"image_interp must be 'bilinear' or 'nearest', got {self.image_interp!r}")
        if self.intensity not in ("percentile", "minmax"):
            raise M3HLInputError(f"intensity must be 'percentile' or 'minmax', got {self.intensity!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise M3HLInputError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.data_on_device not in ("auto", "on", "off"):
            raise M3HLInputError(f"data_on_device must be auto, on or off, got {self.data_on_device!r}")
        if self.capture not in ("off", "auto", "cuda-graph", "compile"):
            raise M3HLInputError(f"capture must be off, auto, cuda-graph or compile, got {self.capture!r}")
        if self.readback_every < 0:
            raise M3HLInputError(f"readback_every must be 0 (automatic) or positive, got {self.readback_every}")
        if len(self.class_names) != self.num_classes:
            raise M3HLInputError(
                f"{len(self.class_names)} class names given for {self.num_classes} classes"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (lists for tuples), safe for JSON, YAML and checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise M3HLInputError(f"unknown training settings: {', '.join(unknown)}")
        kw = {}
        for k, v in d.items():
            default = names[k].default
            if isinstance(default, tuple) and isinstance(v, (list, tuple)):
                v = tuple(v)
            if k in _ON_OFF and isinstance(v, bool):  # YAML (presets, --set) reads on / off as booleans
                v = "on" if v else "off"
            kw[k] = v
        return cls(**kw)

    def replace(self, **changes: Any) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})


#: Text settings whose values include ``on`` / ``off``, which YAML reads as booleans.
_ON_OFF = ("data_on_device", "capture")


def derive_block(patch_size: tuple[int, ...]) -> tuple[int, ...]:
    """The mask block for a patch: the paper's 4 blocks per axis (256 -> 64, 112 -> 28, 80 -> 20)."""
    return tuple(max(1, math.ceil(int(p) / 4)) for p in patch_size)


def _type_name(default: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a text"}.get(type(default), type(default).__name__)


def _check_types(cfg: "TrainConfig") -> None:
    """Each setting has the type of its default (an int where an int is due, ...)."""
    for f in dataclasses.fields(cfg):
        default, v = f.default, getattr(cfg, f.name)
        if default is None or default is dataclasses.MISSING:
            continue
        if isinstance(default, bool):
            ok = isinstance(v, bool)
        elif isinstance(default, int):
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif isinstance(default, float):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            if ok:
                object.__setattr__(cfg, f.name, float(v))
        elif isinstance(default, str):
            ok = isinstance(v, str)
        elif isinstance(default, tuple):
            kind = type(default[0]) if default else object
            kinds = (int, float) if kind is float else (kind,)
            ok = isinstance(v, tuple) and (len(v) > 0 or not default) and all(
                isinstance(x, kinds) and not isinstance(x, bool) for x in v)
            if ok:
                continue
            raise M3HLInputError(
                f"setting {f.name} must be a list of {'integers' if kind is int else 'names'}, e.g. "
                f"{list(default)}, got {v!r}"
            )
        else:
            continue
        if not ok:
            raise M3HLInputError(f"setting {f.name} must be {_type_name(default)}, got {v!r}")


def list_presets() -> list[str]:
    """Names of the presets in ``models/`` (files ``<name>.yaml`` with a ``variants`` table)."""
    out = []
    for p in sorted(MODELS_DIR.glob("*.yaml")):
        try:
            if "variants" in (yaml.safe_load(p.read_text()) or {}):
                out.append(p.stem)
        except yaml.YAMLError:
            continue
    return out


def _preset_path(name_or_path: str | Path) -> Path:
    """A preset name in ``models/`` (then the current folder) or a YAML path; ``.yaml`` may be left off."""
    p = Path(name_or_path)
    if p.suffix.lower() in (".yaml", ".yml") or p.is_file():
        return p
    cands = [MODELS_DIR / f"{p.name}.yaml", Path(f"{p.name}.yaml")] if len(p.parts) == 1 else [p.with_name(p.name + ".yaml")]
    return next((c for c in cands if c.is_file()), cands[0])


def read_preset(name_or_path: str | Path) -> dict[str, Any]:
    """The raw preset dict of a name in ``models/`` or a YAML path.

    Refused with :class:`M3HLInputError` naming the file: a missing file,
    broken YAML, and a file that is not a mapping with a ``variants`` table."""
    p = _preset_path(name_or_path)
    if not p.is_file():
        raise M3HLInputError(
            f"preset {str(name_or_path)!r} not found (looked for {p}); give a preset name "
            f"({', '.join(list_presets())}) or the path of a .yaml file"
        )
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise M3HLInputError(f"preset {p} is not valid YAML{at}; fix the file or copy one from models/") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise M3HLInputError(f"preset {p} cannot be read ({exc})") from None
    if not isinstance(data, dict):
        raise M3HLInputError(f"preset {p} must be a YAML mapping with 'settings' and 'variants', not {type(data).__name__}")
    if "variants" not in data:
        raise M3HLInputError(f"{p} is not a training preset (no 'variants' table)")
    if not isinstance(data["variants"], dict) or not data["variants"] or not all(
            isinstance(v, dict) or v is None for v in data["variants"].values()):
        raise M3HLInputError(f"preset {p}: 'variants' must map variant names to settings")
    if not isinstance(data.get("settings", {}) or {}, dict):
        raise M3HLInputError(f"preset {p}: 'settings' must be a mapping of training settings")
    return data


def load_preset(name_or_path: str | Path, variant: str | None = None, **overrides: Any) -> TrainConfig:
    """Build a config from a preset, one of its variants and explicit overrides.

    ``variant`` None takes the preset's ``default_variant``. Overrides whose
    value is None are ignored, so CLI options can be passed straight through.
    A patch size given without a block size (in the overrides, or in a preset
    without ``block_size``) gets the paper's 4x4 grid of blocks
    (:func:`derive_block`) instead of the preset's or the default block.
    """
    data = read_preset(name_or_path)
    variants: dict[str, dict] = data["variants"]
    variant = variant or data.get("default_variant") or next(iter(variants))
    if not isinstance(variant, str) or variant not in variants:
        raise M3HLInputError(f"preset {name_or_path!r} has no variant {variant!r}; choose one of {sorted(variants)}")
    settings = dict(data.get("settings") or {})
    settings.update(variants[variant] or {})
    given = {k: v for k, v in overrides.items() if v is not None}
    settings.update(given)
    patch = settings.get("patch_size")
    if isinstance(patch, (list, tuple)) and ("block_size" not in settings or ("patch_size" in given and "block_size" not in given)):
        settings["block_size"] = derive_block(patch)
    settings["preset"] = Path(str(name_or_path)).stem
    settings["variant"] = variant
    cfg = TrainConfig.from_dict(settings)
    cfg.validate()
    return cfg
