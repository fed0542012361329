"""What the 2D and 3D prediction paths share (:mod:`napari_m3hl.inference.slices2d`,
:mod:`napari_m3hl.inference.window3d`): eval mode with the training flags restored,
the device check, autocast, channels_last, the checks of the volume and size
arguments, and the papers' ``scipy.ndimage.zoom`` resize.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from napari_m3hl.errors import M3HLInputError


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode; restore each submodule's training flag after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in modes:
            m.training = flag


def logits_of(out: Any) -> torch.Tensor:
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"model output must have a `.logits` tensor (NetOutput) or be a tensor, got {type(out).__name__}"
        )
    return logits


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def resolve_model_device(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    model_dev = _model_device(model)
    if device is None:
        return model_dev
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise M3HLInputError(f"`device` {device!r} is not a torch device ({exc}).") from exc
    has_state = any(True for _ in model.parameters()) or any(True for _ in model.buffers())
    if has_state and dev.type != model_dev.type:
        raise M3HLInputError(
            f"`device` is {dev} but the model is on {model_dev}; move the model first "
            f"(model.to({str(dev)!r})) or pass device=None."
        )
    return dev


def autocast_for(dev: torch.device, precision: str = "fp32"):
    """The autocast of ``precision`` on ``dev`` (bf16 or none; see
    :func:`napari_m3hl.runtime.resolve_precision`), as the training step's."""
    from napari_m3hl.runtime import resolve_precision

    dtype = resolve_precision(precision, dev)
    return torch.autocast(device_type=dev.type, dtype=dtype) if dtype is not None else nullcontext()


def to_channels_last(model: torch.nn.Module) -> None:
    """Convert a 2D model's 4-D parameters and buffers to channels_last in
    place (values unchanged; a no-op when they already are)."""
    if any(p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters()):
        model.to(memory_format=torch.channels_last)


def check_volume(volume: Any, name: str = "volume") -> np.ndarray:
    if isinstance(volume, torch.Tensor):
        volume = volume.detach().cpu().numpy()
    try:
        v = np.asarray(volume)
    except Exception as exc:  # pragma: no cover
        raise M3HLInputError(f"`{name}` must be array-like ({exc}).") from exc
    if v.ndim != 3:
        hint = " (for a single 2D slice pass volume[None])" if v.ndim == 2 else ""
        raise M3HLInputError(
            f"`{name}` must be a 3-D array, got shape {v.shape}{hint}; for a 4-D (T, D, H, W) "
            "series predict each frame separately."
        )
    if v.size == 0:
        raise M3HLInputError(f"`{name}` is empty (shape {v.shape}).")
    if not (np.issubdtype(v.dtype, np.number) or v.dtype == bool):
        raise M3HLInputError(f"`{name}` must be numeric, got dtype {v.dtype}.")
    v = v.astype(np.float32, copy=False)
    if not np.all(np.isfinite(v)):
        raise M3HLInputError(
            f"`{name}` contains NaN or infinite values; clean or normalise the image first."
        )
    return np.ascontiguousarray(v)


def check_tuple(value: Any, n: int, name: str) -> tuple[int, ...]:
    try:
        t = tuple(int(x) for x in value)
    except TypeError as exc:
        raise M3HLInputError(f"`{name}` must be a sequence of {n} positive integers, got {value!r}.") from exc
    if len(t) != n or any(x < 1 for x in t):
        raise M3HLInputError(f"`{name}` must be {n} positive integers, got {value!r}.")
    return t


def zoom_to(arr: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """``scipy.ndimage.zoom`` of the last two axes to ``shape`` (the papers' resize).

    ``mode="nearest"`` instead of scipy's default ``"constant"``: with the
    default, float rounding of the last output coordinate makes scipy fill
    the last row/column with 0 for some sizes (e.g. 64 -> 50 rows). The
    authors' scripts use the default; the two agree everywhere else.
    """
    in_hw = arr.shape[-2:]
    if tuple(in_hw) == tuple(shape):
        return arr.copy()
    factors = (1.0,) * (arr.ndim - 2) + (shape[0] / in_hw[0], shape[1] / in_hw[1])
    out = ndimage.zoom(arr, factors, order=order, mode="nearest")
    if out.shape[-2:] != tuple(shape):  # pragma: no cover - rounding guard
        raise RuntimeError(f"zoom produced {out.shape}, expected {tuple(shape)}")
    return out
