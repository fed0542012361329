"""3D prediction: sliding window over a volume, probabilities summed on the
device (the LA protocol: 112×112×80 windows, stride 18/18/4, foreground
probability > 0.5, largest connected component; see :mod:`napari_m3hl.inference.slices2d`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from napari_m3hl.method.components import largest_component_per_class
from napari_m3hl.errors import M3HLInputError
from napari_m3hl.inference.common import (
    autocast_for, check_tuple, check_volume, eval_mode, logits_of, resolve_model_device,
)


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
    vol = check_volume(volume)
    patch_t = check_tuple(patch, 3, "patch")
    stride_t = check_tuple(stride, 3, "stride")
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
    dev = resolve_model_device(model, device)

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

    with eval_mode(model), torch.inference_mode():
        for b0 in range(0, len(windows), int(batch_size)):
            group = windows[b0 : b0 + int(batch_size)]
            x = torch.stack([vol_t[a : a + px, b : b + py, c : c + pz] for a, b, c in group])[:, None]
            x = x.to(dtype=torch.float32)
            with autocast_for(dev, precision):
                logits = logits_of(model(x))
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
