"""Whole-volume prediction: slice-wise 2D here, the 3D sliding window in
:mod:`napari_m3hl.inference.window3d` (re-exported), shared checks in
:mod:`napari_m3hl.inference.common`. :class:`napari_m3hl.inference.predictor.Predictor`
chooses between them.

Model interface: ``model(x)`` returns an object with a ``.logits`` tensor
(:class:`napari_m3hl.method.networks.NetOutput`), shaped ``(B, C, H, W)`` for 2D
nets and ``(B, C, D, H, W)`` for 3D nets. A plain tensor is accepted too.

The model must already be on the device it is run on; these functions switch
it to ``eval()`` for the duration of the call and restore every submodule's
previous ``training`` flag afterwards (also on error).

Reference protocol (``shared/docs/reference-protocol.md``, beside the data):

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

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from napari_m3hl.errors import M3HLInputError
from napari_m3hl.inference.common import (
    autocast_for, check_tuple, check_volume, eval_mode, logits_of, resolve_model_device, to_channels_last, zoom_to,
)

__all__ = [
    "predict_volume_2d",
]

ResizeBack = Literal["nearest_label", "bilinear_probs"]
ResizeInput = Literal["bilinear", "nearest"]


def predict_volume_2d(
    model: torch.nn.Module,
    volume: np.ndarray,
    patch: Sequence[int] = (256, 256),
    device: str | torch.device | None = None,
    batch_size: int = 16,
    return_probs: bool = False,
    resize_back: ResizeBack = "nearest_label",
    resize_input: ResizeInput = "bilinear",
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
    vol = check_volume(volume)
    ph, pw = check_tuple(patch, 2, "patch")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise M3HLInputError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    if resize_back not in ("nearest_label", "bilinear_probs"):
        raise M3HLInputError(
            f"`resize_back` must be 'nearest_label' or 'bilinear_probs', got {resize_back!r}."
        )
    if resize_input not in ("bilinear", "nearest"):
        raise M3HLInputError(f"`resize_input` must be 'bilinear' or 'nearest', got {resize_input!r}.")
    dev = resolve_model_device(model, device)
    depth, h, w = vol.shape
    same_size = (h, w) == (ph, pw)

    labels = np.zeros((depth, h, w), dtype=np.uint8)
    probs_out: np.ndarray | None = None

    if channels_last:
        to_channels_last(model)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with eval_mode(model), torch.inference_mode():
        for start in range(0, depth, int(batch_size)):
            chunk = vol[start : start + int(batch_size)]  # (b, H, W)
            if not same_size and resize_input == "nearest":
                chunk = zoom_to(chunk, (ph, pw), 0)
            x = torch.from_numpy(np.array(chunk, dtype=np.float32))[:, None].to(dev)
            if not same_size and resize_input == "bilinear":
                x = F.interpolate(x, size=(ph, pw), mode="bilinear", align_corners=False)
            x = x.contiguous(memory_format=fmt)
            with autocast_for(dev, precision):
                logits = logits_of(model(x))
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
                lab = zoom_to(lab_small, (h, w), 0) if not same_size else lab_small
                p_np = None
                if return_probs:
                    p_small = prob.cpu().numpy()
                    p_np = zoom_to(p_small, (h, w), 0) if not same_size else p_small
            stop = start + lab.shape[0]
            labels[start:stop] = lab
            if return_probs and probs_out is not None and p_np is not None:
                probs_out[:, start:stop] = np.moveaxis(p_np, 1, 0)

    if return_probs:
        assert probs_out is not None
        return labels, probs_out
    return labels
