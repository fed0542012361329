"""Checkpoints: save and load with ``torch.load(..., weights_only=True)``.

A checkpoint is a dict of tensors and plain Python values only:

``format``, ``arch``, ``in_channels``, ``num_classes``, ``class_names``,
``patch_size``, ``config`` (``TrainConfig.to_dict()``), ``iteration``,
``student`` / ``teacher`` (state dicts), and for resuming ``optimizer`` and
``rng`` (torch CPU generator states as uint8 tensors). A *model file* (the
shipped weights) has ``student`` only, optionally in half precision, and
``metrics``/``card`` extras.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import TrainConfig
from .errors import M3HLInputError
from .networks import build_network

FORMAT = "m3hl-checkpoint-1"


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write atomically (temporary file + rename), so a crash never leaves a
    half-written file in place of a finished checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint is an ordinary file
    try:
        torch.save({"format": FORMAT, **payload}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def make_payload(
    config: TrainConfig,
    student: nn.Module,
    teacher: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    iteration: int = 0,
    rng: dict[str, torch.Tensor] | None = None,
    half: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """Collect what a checkpoint holds (state dicts copied to the CPU)."""

    def cpu_state(m: nn.Module) -> dict[str, torch.Tensor]:
        return {
            k: (v.detach().to("cpu", copy=True).half() if half and v.is_floating_point() else v.detach().to("cpu", copy=True))
            for k, v in m.state_dict().items()
        }

    payload: dict[str, Any] = {
        "arch": config.arch,
        "in_channels": config.in_channels,
        "num_classes": config.num_classes,
        "class_names": list(config.class_names),
        "patch_size": list(config.patch_size),
        "config": config.to_dict(),
        "iteration": int(iteration),
        "student": cpu_state(student),
    }
    if teacher is not None:
        payload["teacher"] = cpu_state(teacher)
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    if rng is not None:
        payload["rng"] = rng
    payload.update(extra)
    return payload


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint or model file (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise M3HLInputError(f"checkpoint {path} does not exist; pass the path of a .pt file written by 'm3hl train'")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise M3HLInputError(f"checkpoint {path} could not be read ({exc.__class__.__name__}: {exc}); is it an M³HL checkpoint?") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "student" not in ckpt:
        raise M3HLInputError(f"{path} is not an M³HL checkpoint (format {FORMAT!r} expected)")
    return ckpt


def check_compatible(ckpt: dict[str, Any], arch: str, num_classes: int, in_channels: int = 1, source: str = "checkpoint") -> None:
    """Raise a clear error when a checkpoint does not fit the wanted network."""
    if ckpt["arch"] != arch:
        raise M3HLInputError(f"{source} is a {ckpt['arch']} model, but a {arch} model is needed; choose a matching preset or checkpoint")
    if ckpt["num_classes"] != num_classes:
        raise M3HLInputError(
            f"{source} predicts {ckpt['num_classes']} classes ({', '.join(ckpt['class_names'])}), "
            f"but the data have {num_classes}; start from scratch or use a checkpoint with the same classes"
        )
    if ckpt["in_channels"] != in_channels:
        raise M3HLInputError(f"{source} expects {ckpt['in_channels']} input channels, the data have {in_channels}")


def model_from_checkpoint(ckpt: dict[str, Any], which: str = "student", device: str | torch.device = "cpu") -> nn.Module:
    """Build the network of a checkpoint and load ``student`` or ``teacher`` weights (float32, eval mode)."""
    if which not in ckpt:
        which = "student"
    net = build_network(ckpt["arch"], ckpt["in_channels"], ckpt["num_classes"])
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in ckpt[which].items()}
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise M3HLInputError(f"checkpoint weights do not fit a {ckpt['arch']} network: {exc}") from exc
    return net.to(device).eval()


def image_interp(ckpt: dict[str, Any]) -> str:
    """How the checkpoint's training resized images to the patch (``"bilinear"``
    or ``"nearest"``); inference must resize its inputs the same way."""
    return ckpt.get("config", {}).get("image_interp", "bilinear")


def load_model(path: str | Path, which: str = "student", device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a network from a checkpoint file; returns (model, checkpoint dict)."""
    ckpt = load_checkpoint(path)
    return model_from_checkpoint(ckpt, which, device), ckpt
