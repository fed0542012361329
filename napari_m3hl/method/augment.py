"""Tensor data augmentation (torch, any device).

2D protocol (SSL4MIS / BCP / M³HL reference, per sample):

* with p = 0.5: ``rot90`` by k ∈ {0, 1, 2, 3} quarter turns, then a flip
  along a random in-plane axis;
* otherwise with p = 0.5: a rotation by an angle in [-20°, 20°) (zero
  padding; bilinear for the image, nearest for the label);
* otherwise unchanged;
* then resize to ``size`` (bilinear image by default, ``image_interp="nearest"``
  as in the reference code; labels always nearest).

3D protocol (LA): random ``rot90`` in the first two axes, a random flip along
one of the first two axes, then a random crop of ``patch`` (zero padding when
the volume is smaller).

Random numbers come from the optional ``torch.Generator`` (drawn on its
device, then moved to the CPU), so a seeded generator gives identical batches.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["augment_2d", "augment_2d_batched", "augment_scale_gamma", "draws_3d", "prepare_batch_2d", "prepare_batch_3d",
           "resize_2d"]

Device = Union[str, torch.device]
Sample = tuple[np.ndarray, Optional[np.ndarray]]

_IMAGE_INTERPS = ("bilinear", "nearest")


def _rand(n: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    dev = generator.device if generator is not None else "cpu"
    return torch.rand(n, generator=generator, device=dev).cpu()


def _randint(high: int, n: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    dev = generator.device if generator is not None else "cpu"
    return torch.randint(0, high, (n,), generator=generator, device=dev).cpu()


def _check_interp(image_interp: str) -> None:
    if image_interp not in _IMAGE_INTERPS:
        raise ValueError(f"image_interp must be one of {_IMAGE_INTERPS}, got {image_interp!r}")


def resize_2d(
    image: torch.Tensor,
    label: Optional[torch.Tensor],
    size: tuple[int, int],
    image_interp: str = "bilinear",
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Resize ``image (B, C, H, W)`` and ``label (B, H, W)`` to ``size (h, w)``.

    Image: bilinear (``align_corners=False``) or nearest; label: nearest.
    Returns the inputs unchanged when they already have ``size``.
    """
    _check_interp(image_interp)
    size = (int(size[0]), int(size[1]))
    if tuple(image.shape[-2:]) != size:
        if image_interp == "bilinear":
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        else:
            image = F.interpolate(image, size=size, mode="nearest")
    if label is not None and tuple(label.shape[-2:]) != size:
        label = F.interpolate(label[:, None].float(), size=size, mode="nearest")[:, 0].to(label.dtype)
    return image, label


def _rotate(image: torch.Tensor, label: Optional[torch.Tensor], angles_deg: torch.Tensor):
    """Rotate each sample about the image centre (zero padding).

    ``image (b, C, H, W)``, ``label (b, H, W)`` or None, ``angles_deg (b,)``.
    The affine accounts for non-square images, so it is a true rotation in
    pixel space.
    """
    b, _, h, w = image.shape
    a = angles_deg.to(torch.float64) * math.pi / 180.0
    cos, sin = torch.cos(a), torch.sin(a)
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin * (h - 1) / max(w - 1, 1)
    theta[:, 1, 0] = sin * (w - 1) / max(h - 1, 1)
    theta[:, 1, 1] = cos
    theta = theta.to(dtype=torch.float32).to(image.device, non_blocking=True)  # not waiting for queued device work
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=True)
    image = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    if label is not None:
        lab = F.grid_sample(label[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=True)
        label = lab[:, 0].round().to(label.dtype)
    return image, label


def augment_2d(
    image: torch.Tensor,
    label: Optional[torch.Tensor] = None,
    size: tuple[int, int] = (256, 256),
    generator: Optional[torch.Generator] = None,
    image_interp: str = "bilinear",
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Random 2D augmentation of a batch (see module docstring).

    Parameters
    ----------
    image:
        float tensor ``(B, C, H, W)`` (usually C = 1) on any device (numpy
        slices of different sizes go through :func:`prepare_batch_2d`).
    label:
        integer tensor ``(B, H, W)`` or None.
    size:
        Output ``(h, w)`` in pixels.

    Returns ``(image (B, C, h, w) float32, label (B, h, w) int64 or None)`` on
    the input's device.
    """
    _check_interp(image_interp)
    if image.ndim != 4:
        raise ValueError(f"image must be (B, C, H, W), got shape {tuple(image.shape)}")
    image = image.float()
    if label is not None:
        label = label.to(image.device).long()
        if label.shape != (image.shape[0], *image.shape[2:]):
            raise ValueError(f"label shape {tuple(label.shape)} does not match image {tuple(image.shape)}")
    b = image.shape[0]
    size = (int(size[0]), int(size[1]))
    out_img = image.new_empty((b, image.shape[1], *size))
    out_lab = label.new_empty((b, *size)) if label is not None else None

    u1, u2 = _rand(b, generator), _rand(b, generator)
    ks, axes = _randint(4, b, generator), _randint(2, b, generator)
    angles = _rand(b, generator) * 40.0 - 20.0
    rotflip = u1 < 0.5
    rotate = ~rotflip & (u2 < 0.5)
    plain = ~rotflip & ~rotate

    def _store(idx: torch.Tensor, img: torch.Tensor, lab: Optional[torch.Tensor]) -> None:
        img, lab = resize_2d(img, lab, size, image_interp)
        dev_idx = idx.to(image.device)
        out_img[dev_idx] = img
        if out_lab is not None and lab is not None:
            out_lab[dev_idx] = lab

    for k in range(4):
        for axis in range(2):
            sel = torch.nonzero(rotflip & (ks == k) & (axes == axis)).flatten()
            if sel.numel() == 0:
                continue
            dsel = sel.to(image.device)
            img = torch.flip(torch.rot90(image[dsel], k, dims=(2, 3)), dims=(2 + axis,))
            lab = None
            if label is not None:
                lab = torch.flip(torch.rot90(label[dsel], k, dims=(1, 2)), dims=(1 + axis,))
            _store(sel, img, lab)
    sel = torch.nonzero(rotate).flatten()
    if sel.numel():
        dsel = sel.to(image.device)
        img, lab = _rotate(image[dsel], label[dsel] if label is not None else None, angles[sel])
        _store(sel, img, lab)
    sel = torch.nonzero(plain).flatten()
    if sel.numel():
        dsel = sel.to(image.device)
        _store(sel, image[dsel], label[dsel] if label is not None else None)
    return out_img, out_lab


def augment_scale_gamma(
    image: torch.Tensor,
    label: Optional[torch.Tensor],
    scale: float = 0.0,
    gamma: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-sample zoom about the image centre and gamma of the intensities, for
    fine-tuning from very few slices (not in the papers' protocol; off at 0).

    Args:
        image: float ``(B, C, H, W)`` scaled to [0, 1]; label: integer ``(B, H, W)`` or None.
        scale: zoom factors log-uniform in ``[1/(1+scale), 1+scale]`` (> 1 enlarges the
            anatomy; zero padding outside; bilinear image, nearest label); 0: no zoom.
        gamma: exponents log-uniform in ``[1/(1+gamma), 1+gamma]`` applied to the image
            clipped to [0, 1]; 0: no gamma.
        generator: draws scale then gamma (only those enabled), ``b`` each.

    Returns ``(image, label)`` of the input shapes, on the input's device.
    """
    b, _, h, w = image.shape
    if scale > 0:
        span = math.log1p(scale)
        zoom = torch.exp((_rand(b, generator) * 2.0 - 1.0) * span).to(torch.float32)
        theta = torch.zeros(b, 2, 3, dtype=torch.float32)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / zoom
        grid = F.affine_grid(theta.to(image.device, non_blocking=True), [b, 1, h, w], align_corners=True)
        image = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        if label is not None:
            lab = F.grid_sample(label[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=True)
            label = lab[:, 0].round().to(label.dtype)
    if gamma > 0:
        span = math.log1p(gamma)
        g = torch.exp((_rand(b, generator) * 2.0 - 1.0) * span).to(image.device, torch.float32)
        image = image.clamp(0.0, 1.0) ** g.reshape(b, *([1] * (image.ndim - 1)))
    return image, label


@functools.lru_cache(maxsize=8)
def _dihedral_index(size: int, device: torch.device) -> torch.Tensor:
    """(8, size²) int64: for code ``2k + axis``, the flat source pixel of each
    output pixel of ``flip(rot90(x, k), axis)`` on a square ``size × size`` image
    (built once per size and device; callers only read it)."""
    base = torch.arange(size * size, device=device).reshape(size, size)
    return torch.stack([torch.flip(torch.rot90(base, k, dims=(0, 1)), dims=(axis,)).reshape(-1)
                        for k in range(4) for axis in range(2)])


def augment_2d_batched(
    image: torch.Tensor,
    label: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`augment_2d` of a batch already at its square output size, with
    no host synchronisation: the same random draws in the same order, so the
    same generator state gives the same batch, but every sample goes through
    every branch as one batched op (rot90/flip by an index gather, the small
    rotation by ``grid_sample``) and ``torch.where`` picks each sample's
    branch; no data-dependent host branching, at the price of computing the
    branches a sample does not take (cheap on a GPU; the CPU trainer keeps
    :func:`prepare_batch_2d`).

    Args:
        image: float ``(B, C, s, s)``; label: integer ``(B, s, s)`` or None.
        generator: CPU or device generator (the draws move to ``image``'s device).

    Returns ``(image (B, C, s, s) float32, label (B, s, s) int64 or None)``.
    """
    if image.ndim != 4 or image.shape[2] != image.shape[3]:
        raise ValueError(f"augment_2d_batched needs a square (B, C, s, s) batch, got shape {tuple(image.shape)}")
    image = image.float()
    if label is not None:
        label = label.to(image.device).long()
        if label.shape != (image.shape[0], *image.shape[2:]):
            raise ValueError(f"label shape {tuple(label.shape)} does not match image {tuple(image.shape)}")
    b, c, s, _ = image.shape
    u1, u2 = _rand(b, generator), _rand(b, generator)
    ks, axes = _randint(4, b, generator), _randint(2, b, generator)
    angles = _rand(b, generator) * 40.0 - 20.0
    dev = image.device
    rotflip = (u1 < 0.5).to(dev, non_blocking=True)
    rotate = (~(u1 < 0.5) & (u2 < 0.5)).to(dev, non_blocking=True)
    src = _dihedral_index(s, dev)[(2 * ks + axes).to(dev, non_blocking=True)]  # (B, s²)
    flipped = image.reshape(b, c, s * s).gather(2, src[:, None].expand(b, c, s * s)).reshape(b, c, s, s)
    turned, turned_lab = _rotate(image, label, angles)
    pick_rf, pick_rot = rotflip.reshape(b, 1, 1, 1), rotate.reshape(b, 1, 1, 1)
    out_img = torch.where(pick_rf, flipped, torch.where(pick_rot, turned, image))
    out_lab = None
    if label is not None:
        flipped_lab = label.reshape(b, s * s).gather(1, src).reshape(b, s, s)
        out_lab = torch.where(pick_rf[:, 0], flipped_lab, torch.where(pick_rot[:, 0], turned_lab, label))
    return out_img, out_lab


def prepare_batch_2d(
    samples: Sequence[Sample],
    size: tuple[int, int] = (256, 256),
    generator: Optional[torch.Generator] = None,
    device: Device = "cpu",
    image_interp: str = "bilinear",
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Stack slices of varying size into an augmented batch.

    ``samples``: list of ``(image (H, W), label (H, W) or None)`` numpy arrays,
    all labeled or all unlabeled. Each sample is moved to ``device`` and
    resized to ``size`` first, then :func:`augment_2d` runs batched.

    Returns ``images (B, 1, h, w)`` float32 and ``labels (B, h, w)`` int64, or
    ``None`` for labels when the samples are unlabeled.
    """
    _check_interp(image_interp)
    if len(samples) == 0:
        raise ValueError("prepare_batch_2d needs at least one sample")
    has_label = [lab is not None for _, lab in samples]
    if any(has_label) and not all(has_label):
        raise ValueError("prepare_batch_2d: mix of labeled and unlabeled samples; pass one kind per call")
    size = (int(size[0]), int(size[1]))
    imgs, labs = [], []
    for img, lab in samples:
        img = np.asarray(img)
        if img.ndim != 2:
            raise ValueError(f"2D samples must be (H, W) arrays, got shape {img.shape}")
        t_img = torch.as_tensor(np.ascontiguousarray(img), dtype=torch.float32, device=device)[None, None]
        t_lab = None
        if lab is not None:
            lab = np.asarray(lab)
            if lab.shape != img.shape:
                raise ValueError(f"label shape {lab.shape} differs from image shape {img.shape}")
            t_lab = torch.as_tensor(lab.astype(np.int64), device=device)[None]
        t_img, t_lab = resize_2d(t_img, t_lab, size, image_interp)
        imgs.append(t_img)
        labs.append(t_lab)
    image = torch.cat(imgs)
    label = torch.cat(labs) if all(has_label) else None
    return augment_2d(image, label, size=size, generator=generator, image_interp=image_interp)


def draws_3d(b: int, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random draws of a 3D batch of ``b`` samples, in the order
    :func:`prepare_batch_3d` (and :class:`napari_m3hl.data.device.DeviceVolumes`)
    makes them: quarter turns ``k`` (b,), flip axes (b,), crop offsets in
    [0, 1) (b, 3); CPU tensors."""
    ks, axes = _randint(4, b, generator), _randint(2, b, generator)
    return ks, axes, _rand(3 * b, generator).reshape(b, 3)


def prepare_batch_3d(
    samples: Sequence[Sample],
    patch: tuple[int, int, int] = (112, 112, 80),
    generator: Optional[torch.Generator] = None,
    device: Device = "cpu",
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Augment and crop 3D volumes into a batch.

    ``samples``: list of ``(image (X, Y, Z), label (X, Y, Z) or None)`` numpy
    arrays (LA order; any 3D order works, rot90/flip act on the first two
    axes), all labeled or all unlabeled. Per sample: rot90 by k ∈ 0..3 in axes
    (0, 1), flip along axis 0 or 1, zero-pad to at least ``patch`` (centred),
    random crop of ``patch``. Only the crop is copied to ``device``.

    Returns ``images (B, 1, *patch)`` float32 and ``labels (B, *patch)`` int64
    (or None).
    """
    if len(samples) == 0:
        raise ValueError("prepare_batch_3d needs at least one sample")
    has_label = [lab is not None for _, lab in samples]
    if any(has_label) and not all(has_label):
        raise ValueError("prepare_batch_3d: mix of labeled and unlabeled samples; pass one kind per call")
    patch = tuple(int(p) for p in patch)  # type: ignore[assignment]
    if len(patch) != 3:
        raise ValueError(f"patch must have 3 sizes, got {patch}")
    ks, axes, offs = draws_3d(len(samples), generator)
    imgs, labs = [], []
    for i, (img, lab) in enumerate(samples):
        img = np.asarray(img)
        if img.ndim != 3:
            raise ValueError(f"3D samples must be 3D arrays, got shape {img.shape}")
        if lab is not None and np.shape(lab) != img.shape:
            raise ValueError(f"label shape {np.shape(lab)} differs from image shape {img.shape}")
        arrays = [img] + ([np.asarray(lab)] if lab is not None else [])
        arrays = [np.flip(np.rot90(a, int(ks[i]), axes=(0, 1)), axis=int(axes[i])) for a in arrays]
        shape = arrays[0].shape
        pads = [max(p - s, 0) for p, s in zip(patch, shape)]
        if any(pads):
            widths = [(pd // 2, pd - pd // 2) for pd in pads]
            arrays = [np.pad(a, widths, mode="constant") for a in arrays]
            shape = arrays[0].shape
        starts = [int(math.floor(float(offs[i, j]) * (shape[j] - patch[j] + 1))) for j in range(3)]
        starts = [min(st, shape[j] - patch[j]) for j, st in enumerate(starts)]
        sl = tuple(slice(st, st + p) for st, p in zip(starts, patch))
        imgs.append(torch.as_tensor(np.ascontiguousarray(arrays[0][sl], dtype=np.float32), device=device))
        if lab is not None:
            labs.append(torch.as_tensor(np.ascontiguousarray(arrays[1][sl]).astype(np.int64), device=device))
    image = torch.stack(imgs)[:, None]
    label = torch.stack(labs) if all(has_label) else None
    return image, label
