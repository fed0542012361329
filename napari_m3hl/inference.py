"""Whole-volume prediction: slice-wise 2D and 3D sliding window.

Model interface: ``model(x)`` returns an object with a ``.logits`` tensor
(:class:`napari_m3hl.networks.NetOutput`), shaped ``(B, C, H, W)`` for 2D
nets and ``(B, C, D, H, W)`` for 3D nets. A plain tensor is accepted too.

The model must already be on the device it is run on; these functions switch
it to ``eval()`` for the duration of the call and restore every submodule's
previous ``training`` flag afterwards (also on error).

Reference protocol (``reference-protocol.md``):

* ACDC (2D): each slice is resized to 256², predicted, argmax taken at
  256², and the *label* resized back nearest-neighbour
  (``scipy.ndimage.zoom(order=0)``) -> ``resize_back="nearest_label"``, the
  default here. The authors' test script also resized the *input* slice with
  ``zoom(order=0)`` -> ``resize_input="nearest"``; the default here is
  bilinear input resizing. One deliberate difference: zoom runs with
  ``mode="nearest"``; the scripts' default ``mode="constant"`` zeroes the
  last row/column for some image sizes (a float-rounding artefact).
* LA (3D): sliding window 112×112×80, stride 18/18/4, softmax averaged over
  overlaps, foreground probability > 0.5, largest connected component.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .components import largest_component, largest_component_per_class  # noqa: F401 - largest_component re-exported
from .errors import M3HLInputError

__all__ = [
    "largest_component",
    "predict_volume_2d",
    "predict_volume_3d",
    "sliding_window_starts",
]

ResizeBack = Literal["nearest_label", "bilinear_probs"]
ResizeInput = Literal["bilinear", "nearest"]


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode; restore each submodule's training flag after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in modes:
            m.training = flag


def _logits(out: Any) -> torch.Tensor:
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


def _resolve_device(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
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


def _autocast(dev: torch.device, amp: bool, precision: str = "fp32"):
    """fp16 autocast for ``amp`` on CUDA (the older switch), else the
    autocast of ``precision`` (``runtime.resolve_precision``), else none."""
    if amp and dev.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    from .runtime import resolve_precision

    dtype = resolve_precision(precision, dev)
    return torch.autocast(device_type=dev.type, dtype=dtype) if dtype is not None else nullcontext()


def _to_channels_last(model: torch.nn.Module) -> None:
    """Convert a 2D model's 4-D parameters and buffers to channels_last in
    place (values unchanged; a no-op when they already are)."""
    if any(p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters()):
        model.to(memory_format=torch.channels_last)


def _check_volume(volume: Any, name: str = "volume") -> np.ndarray:
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


def _check_tuple(value: Any, n: int, name: str) -> tuple[int, ...]:
    try:
        t = tuple(int(x) for x in value)
    except TypeError as exc:
        raise M3HLInputError(f"`{name}` must be a sequence of {n} positive integers, got {value!r}.") from exc
    if len(t) != n or any(x < 1 for x in t):
        raise M3HLInputError(f"`{name}` must be {n} positive integers, got {value!r}.")
    return t


def _zoom_to(arr: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
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


# --------------------------------------------------------------------------- #
# 2D
# --------------------------------------------------------------------------- #
def predict_volume_2d(
    model: torch.nn.Module,
    volume: np.ndarray,
    patch: Sequence[int] = (256, 256),
    device: str | torch.device | None = None,
    batch_size: int = 16,
    return_probs: bool = False,
    resize_back: ResizeBack = "nearest_label",
    resize_input: ResizeInput = "bilinear",
    amp: bool = False,
    precision: str = "auto",
    channels_last: bool = True,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Predict a volume slice by slice with a 2D network.

    Slices go through the network ``batch_size`` at a time (one pass for a
    typical short-axis volume), resized as one batch.

    Args:
        model: 2D network; ``model(x)`` with ``x`` ``(B, 1, ph, pw)`` float32
            returns ``.logits`` ``(B, C, ph, pw)``. It must already be on
            ``device``; it runs in eval mode under ``torch.inference_mode`` and
            its training flags are restored afterwards.
        volume: float32 ``(D, H, W)``, intensities normalised as in training;
            D = through-plane slices.
        patch: ``(ph, pw)`` network input size in pixels.
        device: where to run; ``None`` = the model's device.
        batch_size: slices per forward pass (default 16: one pass for most
            cardiac volumes).
        return_probs: also return the class probabilities.
        resize_back: how the prediction returns to ``(H, W)``:

            ``"nearest_label"`` (default; the papers' protocol): softmax and
            argmax at patch size, then the label map is resized to (H, W)
            nearest-neighbour with ``scipy.ndimage.zoom(order=0)``. Returned
            probabilities are resized the same way (nearest), so
            ``labels == probs.argmax(0)`` up to ties.
            ``"bilinear_probs"``: the softmax probabilities are resized to
            (H, W) bilinearly (``F.interpolate(align_corners=False)``), then
            argmax. Smoother borders; not the published protocol.
        resize_input: how each slice is resized to ``patch``: ``"bilinear"``
            (default; ``F.interpolate(mode="bilinear", align_corners=False)``)
            or ``"nearest"`` (``scipy.ndimage.zoom(order=0)``, as the authors'
            test script).
        amp: float16 autocast when running on CUDA (ignored on CPU).
        precision: ``"auto"`` (bf16 autocast on CUDA and on CPUs that compute
            bf16 natively, else fp32), ``"fp32"`` or ``"bf16"``; see
            docs/benchmarks.md ("Inference speed") for its agreement with fp32.
        channels_last: run the network in NHWC: the model's weights are
            converted to channels_last IN PLACE (once; values unchanged) and
            the input batches too. Faster on CPUs.

    Returns:
        ``labels`` uint8 ``(D, H, W)``; with ``return_probs`` the tuple
        ``(labels, probs)``, probs float32 ``(C, D, H, W)`` summing to 1 over C.
    """
    vol = _check_volume(volume)
    ph, pw = _check_tuple(patch, 2, "patch")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise M3HLInputError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    if resize_back not in ("nearest_label", "bilinear_probs"):
        raise M3HLInputError(
            f"`resize_back` must be 'nearest_label' or 'bilinear_probs', got {resize_back!r}."
        )
    if resize_input not in ("bilinear", "nearest"):
        raise M3HLInputError(f"`resize_input` must be 'bilinear' or 'nearest', got {resize_input!r}.")
    dev = _resolve_device(model, device)
    depth, h, w = vol.shape
    same_size = (h, w) == (ph, pw)

    labels = np.zeros((depth, h, w), dtype=np.uint8)
    probs_out: np.ndarray | None = None

    if channels_last:
        _to_channels_last(model)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with _eval_mode(model), torch.inference_mode():
        for start in range(0, depth, int(batch_size)):
            chunk = vol[start : start + int(batch_size)]  # (b, H, W)
            if not same_size and resize_input == "nearest":
                chunk = _zoom_to(chunk, (ph, pw), 0)
            x = torch.from_numpy(np.array(chunk, dtype=np.float32))[:, None].to(dev)
            if not same_size and resize_input == "bilinear":
                x = F.interpolate(x, size=(ph, pw), mode="bilinear", align_corners=False)
            x = x.contiguous(memory_format=fmt)
            with _autocast(dev, amp, precision):
                logits = _logits(model(x))
            if logits.ndim != 4 or logits.shape[0] != x.shape[0] or logits.shape[2:] != (ph, pw):
                raise M3HLInputError(
                    f"the model returned logits of shape {tuple(logits.shape)} for input "
                    f"{tuple(x.shape)}; a 2D network must return (B, C, {ph}, {pw}). Is it a 3D model?"
                )
            n_cls = logits.shape[1]
            if n_cls > 256:
                raise M3HLInputError(f"the model has {n_cls} classes; labels are uint8 (at most 256).")
            prob = torch.softmax(logits.float(), dim=1)  # (b, C, ph, pw)
            if probs_out is None and return_probs:
                probs_out = np.zeros((n_cls, depth, h, w), dtype=np.float32)

            if resize_back == "bilinear_probs":
                if not same_size:
                    prob = F.interpolate(prob, size=(h, w), mode="bilinear", align_corners=False)
                lab = prob.argmax(dim=1).to(torch.uint8).cpu().numpy()
                p_np = prob.cpu().numpy() if return_probs else None
            else:
                lab_small = prob.argmax(dim=1).to(torch.uint8).cpu().numpy()  # (b, ph, pw)
                lab = _zoom_to(lab_small, (h, w), 0) if not same_size else lab_small
                p_np = None
                if return_probs:
                    p_small = prob.cpu().numpy()
                    p_np = _zoom_to(p_small, (h, w), 0) if not same_size else p_small
            stop = start + lab.shape[0]
            labels[start:stop] = lab
            if return_probs and probs_out is not None and p_np is not None:
                probs_out[:, start:stop] = np.moveaxis(p_np, 1, 0)

    if return_probs:
        assert probs_out is not None
        return labels, probs_out
    return labels


# --------------------------------------------------------------------------- #
# 3D
# --------------------------------------------------------------------------- #
def sliding_window_starts(size: int, patch: int, stride: int) -> list[int]:
    """Window start offsets along one axis (the reference's scheme).

    ``n = ceil((size - patch) / stride) + 1`` windows starting at
    ``min(i * stride, size - patch)``; ``size >= patch`` is required (pad
    first) and ``stride <= patch`` (otherwise windows leave gaps). Duplicates
    are removed. The windows cover ``0 .. size-1``.
    """
    if size < patch:
        raise ValueError(f"size {size} < patch {patch}: pad first")
    if not 1 <= stride <= patch:
        raise ValueError(f"stride {stride} must lie in 1..patch ({patch}) so that windows cover the volume")
    n = math.ceil((size - patch) / stride) + 1
    starts: list[int] = []
    for i in range(n):
        s = min(i * stride, size - patch)
        if not starts or starts[-1] != s:
            starts.append(s)
    return starts


def predict_volume_3d(
    model: torch.nn.Module,
    volume: np.ndarray,
    patch: Sequence[int] = (112, 112, 80),
    stride: Sequence[int] = (18, 18, 4),
    device: str | torch.device | None = None,
    num_classes: int | None = None,
    keep_largest: bool = False,
    return_probs: bool = False,
    batch_size: int = 1,
    amp: bool = False,
    precision: str = "fp32",
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Sliding-window prediction of a volume with a 3D network.

    The volume is zero-padded (symmetrically, extra voxel at the end) on any
    axis smaller than the patch; windows start at ``min(i*stride, size-patch)``
    for ``i = 0 .. ceil((size-patch)/stride)`` on each axis, so the whole
    volume is covered; the softmax of each window is summed into a score map
    and divided by the per-voxel window count; the padding is cropped away.

    Args:
        model: 3D network; ``model(x)`` with ``x`` ``(B, 1, *patch)`` returns
            ``.logits`` ``(B, C, *patch)``. ``C == 1`` is read as a sigmoid
            foreground logit. Must already be on ``device``; run in eval mode,
            training flags restored afterwards.
        volume: float32 3-D array in the axis order the network was trained on
            (LA h5 data: ``(X, Y, Z)`` with ``patch=(112, 112, 80)``).
        patch: window size per axis, voxels.
        stride: window step per axis, voxels.
        device: where to run; ``None`` = the model's device.
        num_classes: expected number of output channels (checked if given).
        keep_largest: keep only the largest connected component (full
            connectivity, as the reference's ``skimage.measure.label``) of
            each foreground class; removed voxels become background.
        return_probs: also return the averaged probabilities.
        batch_size: windows per forward pass.
        amp: float16 autocast on CUDA.
        precision: autocast as in :func:`predict_volume_2d`; default fp32
            (bf16 has not been measured for the 3D nets).

    The windows' probabilities are summed on the model's device; only the
    final average comes back to the host.

    Returns:
        ``labels`` uint8 of the volume's shape. Binary models (C = 2 or 1):
        foreground where its probability > 0.5; otherwise argmax. With
        ``return_probs``: ``(labels, probs)``, probs float32
        ``(max(C, 2), *volume.shape)``.
    """
    vol = _check_volume(volume)
    patch_t = _check_tuple(patch, 3, "patch")
    stride_t = _check_tuple(stride, 3, "stride")
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1
    ):
        raise M3HLInputError(f"`num_classes` must be a positive integer or None, got {num_classes!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise M3HLInputError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    if any(s > p for s, p in zip(stride_t, patch_t)):
        raise M3HLInputError(
            f"`stride` {stride_t} is larger than `patch` {patch_t} on some axis; windows would "
            "leave gaps. Use a stride <= patch (reference: (18, 18, 4) for (112, 112, 80))."
        )
    dev = _resolve_device(model, device)

    shape = vol.shape
    pads = [(max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2) for s, p in zip(shape, patch_t)]
    padded = np.pad(vol, pads, mode="constant", constant_values=0) if any(sum(p) for p in pads) else vol
    pshape = padded.shape
    starts = [sliding_window_starts(pshape[a], patch_t[a], stride_t[a]) for a in range(3)]
    windows = [(x, y, z) for x in starts[0] for y in starts[1] for z in starts[2]]

    score: torch.Tensor | None = None  # (C, *pshape) summed probabilities, on the device
    count = torch.zeros(pshape, dtype=torch.float32, device=dev)
    vol_t = torch.from_numpy(np.ascontiguousarray(padded)).to(dev)
    px, py, pz = patch_t

    with _eval_mode(model), torch.inference_mode():
        for b0 in range(0, len(windows), int(batch_size)):
            group = windows[b0 : b0 + int(batch_size)]
            x = torch.stack([vol_t[a : a + px, b : b + py, c : c + pz] for a, b, c in group])[:, None]
            x = x.to(dtype=torch.float32)
            with _autocast(dev, amp, precision):
                logits = _logits(model(x))
            if logits.ndim != 5 or logits.shape[0] != len(group) or tuple(logits.shape[2:]) != patch_t:
                raise M3HLInputError(
                    f"the model returned logits of shape {tuple(logits.shape)} for input "
                    f"{tuple(x.shape)}; a 3D network must return (B, C, {px}, {py}, {pz})."
                )
            c_out = logits.shape[1]
            if num_classes is not None and c_out != num_classes:
                raise M3HLInputError(
                    f"`num_classes` is {num_classes} but the model outputs {c_out} channels; "
                    "pass the checkpoint's num_classes."
                )
            logits = logits.float()
            if c_out == 1:
                fg = torch.sigmoid(logits)
                prob = torch.cat([1.0 - fg, fg], dim=1)
            else:
                prob = torch.softmax(logits, dim=1)
            if score is None:
                score = torch.zeros((prob.shape[1],) + tuple(pshape), dtype=torch.float32, device=dev)
            for k, (a, b, c) in enumerate(group):
                score[:, a : a + px, b : b + py, c : c + pz] += prob[k]
                count[a : a + px, b : b + py, c : c + pz] += 1.0
        assert score is not None
        crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(pads, shape))
        probs = (score / count[None])[(slice(None),) + crop].cpu().numpy()

    n_cls = probs.shape[0]
    if n_cls > 256:
        raise M3HLInputError(f"the model has {n_cls} classes; labels are uint8 (at most 256).")
    if n_cls == 2:
        labels = (probs[1] > 0.5).astype(np.uint8)
    else:
        labels = probs.argmax(axis=0).astype(np.uint8)
    if keep_largest:
        labels = largest_component_per_class(labels[None], n_cls)[0]
    if return_probs:
        return labels, np.ascontiguousarray(probs, dtype=np.float32)
    return labels
