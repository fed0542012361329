"""Training configuration and the presets in ``models/*.yaml``.

A preset holds the shared settings of one setting of the paper (ACDC 2D,
LA 3D) and a ``variants`` table for where the paper and the authors' code
differ (see docs/method.md). ``load_preset(name, variant, **overrides)``
returns a :class:`TrainConfig`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import M3HLInputError

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
    class_names: tuple[str, ...] = ("background", "RV", "Myo", "LV")
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
    low_tap: str = "low_enc"  # low_enc (paper) | low_dec (reference code)
    # teacher
    ema_decay: float = 0.99
    ema_warmup: bool = False
    # recipe for short budgets (issue 10; 0 = off, the paper's recipe)
    warm_start: int = 0  # supervised-only iterations first; the teacher then restarts as a copy of the student
    alpha_rampup: int = 0  # α ramps linearly from 0 over this many M³HL iterations
    # diagnostics
    pl_eval_every: int = 0  # score pseudo-labels against the hidden labels of unlabeled data every N iterations
    pl_eval_samples: int = 64  # unlabeled samples (fixed, seeded) in that score
    # fine-tuning from a start model (issue 16; 0 / "" = off)
    l2_to_start: float = 0.0  # weight of sum((θ - θ_start)²) added to the loss (L2-SP)
    freeze: str = ""  # "encoder" (encoder weights) and/or "bn" (BatchNorm running stats) stay at their start values, e.g. "encoder,bn"
    teacher_init: str = "copy"  # copy | independent
    teacher_mode: str = "eval"  # eval | train (dropout + batch-stat BN when labelling)
    teacher_bn: str = "copy"  # BatchNorm running stats: copy the student's | ema (state_dict-wide EMA, reference code)
    pseudo_lcc: bool = True
    # data
    image_interp: str = "bilinear"  # bilinear | nearest (reference code)
    # run
    seed: int = 1337
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA
    val_every: int = 200
    checkpoint_every: int = 1000
    preset: str = ""
    variant: str = ""

    @property
    def ndim(self) -> int:
        return len(self.patch_size)

    def validate(self) -> None:
        """Raise :class:`M3HLInputError` naming the bad setting."""
        if self.mode not in MODES:
            raise M3HLInputError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.batch_size < 4 or self.batch_size % 4:
            raise M3HLInputError(
                f"batch size must be a multiple of 4 (labeled a/b + unlabeled a/b halves), got {self.batch_size}"
            )
        if self.iterations < 1:
            raise M3HLInputError(f"iterations must be at least 1, got {self.iterations}")
        if len(self.block_size) != len(self.patch_size):
            raise M3HLInputError(
                f"block size {self.block_size} and patch size {self.patch_size} need the same number of axes"
            )
        if not 0.0 <= self.mask_ratio <= 1.0:
            raise M3HLInputError(f"mask ratio must lie in [0, 1], got {self.mask_ratio}")
        if self.low_tap not in ("low_enc", "low_dec"):
            raise M3HLInputError(f"low_tap must be 'low_enc' or 'low_dec', got {self.low_tap!r}")
        if self.lr_schedule not in ("constant", "poly", "step"):
            raise M3HLInputError(f"lr_schedule must be constant, poly or step, got {self.lr_schedule!r}")
        if self.teacher_mode not in ("eval", "train") or self.teacher_init not in ("copy", "independent"):
            raise M3HLInputError("teacher_mode must be eval|train and teacher_init copy|independent")
        for name in ("warm_start", "alpha_rampup", "pl_eval_every", "pl_eval_samples"):
            if int(getattr(self, name)) < 0:
                raise M3HLInputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.l2_to_start < 0 or not set(filter(None, self.freeze.split(","))) <= {"encoder", "bn"}:
            raise M3HLInputError(f"l2_to_start must be >= 0 and freeze a comma list of 'encoder', 'bn'; "
                                 f"got {self.l2_to_start}, {self.freeze!r}")
        if self.teacher_bn not in ("copy", "ema"):
            raise M3HLInputError(f"teacher_bn must be 'copy' or 'ema', got {self.teacher_bn!r}")
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
            kw[k] = tuple(v) if isinstance(default, tuple) and v is not None else v
        return cls(**kw)

    def replace(self, **changes: Any) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})


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


def read_preset(name_or_path: str | Path) -> dict[str, Any]:
    """The raw preset dict of a name in ``models/`` or a YAML path."""
    p = Path(name_or_path)
    if not p.suffix:
        p = MODELS_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        raise M3HLInputError(
            f"preset {name_or_path!r} not found (looked for {p}); available: {', '.join(list_presets())}"
        )
    data = yaml.safe_load(p.read_text()) or {}
    if "variants" not in data:
        raise M3HLInputError(f"{p} is not a training preset (no 'variants' table)")
    return data


def load_preset(name_or_path: str | Path, variant: str | None = None, **overrides: Any) -> TrainConfig:
    """Build a config from a preset, one of its variants and explicit overrides.

    ``variant`` None takes the preset's ``default_variant``. Overrides whose
    value is None are ignored, so CLI options can be passed straight through.
    """
    data = read_preset(name_or_path)
    variants: dict[str, dict] = data["variants"]
    variant = variant or data.get("default_variant") or next(iter(variants))
    if variant not in variants:
        raise M3HLInputError(f"preset {name_or_path!r} has no variant {variant!r}; choose one of {sorted(variants)}")
    settings = dict(data.get("settings", {}))
    settings.update(variants[variant] or {})
    settings.update({k: v for k, v in overrides.items() if v is not None})
    settings["preset"] = Path(str(name_or_path)).stem
    settings["variant"] = variant
    cfg = TrainConfig.from_dict(settings)
    cfg.validate()
    return cfg
