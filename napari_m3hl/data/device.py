"""Training sets held on the training device (``TrainConfig.data_on_device``).

The host loader (:func:`napari_m3hl.method.augment.prepare_batch_2d` /
``prepare_batch_3d``) turns each step's samples from numpy arrays into
tensors, uploads and augments them while the step waits: about half of a
step on a GPU. Here the whole training set is uploaded once, when training
starts, and each batch is gathered and augmented on the device:

* :class:`DeviceSlices` (2D): every slice resized once to the patch size (as
  the host loader resizes each sample before augmenting), one
  ``(N, 1, h, w)`` float32 tensor and one ``(N, h, w)`` uint8 label tensor;
  a batch is an ``index_select`` and
  :func:`~napari_m3hl.method.augment.augment_2d_batched` (square patches; the
  per-group :func:`~napari_m3hl.method.augment.augment_2d` otherwise).
* :class:`DeviceVolumes` (3D, the LA crops): one tensor per case (their sizes
  differ); a batch is rot90 / flip / zero-pad / crop of each picked case on
  the device, then one stack.

Both draw their random numbers from the trainer's CPU generator with the same
draws, in the same order, as the host loader, so on the same device a batch
equals the host loader's for the same samples (tested on the CPU); nothing is
copied from the device to the host, and only the sample indices and the
random draws (a few hundred bytes) go the other way.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from napari_m3hl.method.augment import augment_2d, augment_2d_batched, draws_3d, resize_2d

__all__ = ["DATA_ON_DEVICE", "DeviceSlices", "DeviceVolumes", "device_sets", "use_device_data"]

log = logging.getLogger(__name__)

#: ``TrainConfig.data_on_device`` values: ``auto`` = on CUDA when the set takes at
#: most :data:`MAX_DEVICE_SHARE` of the free device memory, else the host loader.
DATA_ON_DEVICE = ("auto", "on", "off")
MAX_DEVICE_SHARE = 0.25


def _label_dtype(num_classes: int) -> torch.dtype:
    return torch.uint8 if num_classes <= 256 else torch.int64


class DeviceSlices:
    """A 2D slice set on ``device``, each slice resized once to ``size``.

    Args:
        samples: a slice set (``__len__``, ``__getitem__(i) -> (image (H, W),
            label (H, W) or None)``).
        size: ``(h, w)`` patch size in pixels.
        device: where the tensors live.
        labeled: keep the labels (False: images only, as the unlabeled set).
        image_interp: how images are resized (``bilinear`` or ``nearest``;
            labels always nearest), as the host loader.
        num_classes: label values are < this (uint8 storage up to 256 classes).

    Attributes:
        images: (N, 1, h, w) float32; labels: (N, h, w) uint8 (or None).
    """

    def __init__(self, samples, size: Sequence[int], device: torch.device | str, labeled: bool = True,
                 image_interp: str = "bilinear", num_classes: int = 256) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.device = torch.device(device)
        self.image_interp = image_interp
        n = len(samples)
        self.images = torch.empty((n, 1, *self.size), dtype=torch.float32, device=self.device)
        self.labels = torch.empty((n, *self.size), dtype=_label_dtype(num_classes), device=self.device) if labeled else None
        for i in range(n):
            img, lab = samples[i]
            img = np.asarray(img)
            if img.ndim != 2:
                raise ValueError(f"2D samples must be (H, W) arrays, got shape {img.shape} (sample {i})")
            t_img = torch.as_tensor(np.ascontiguousarray(img), dtype=torch.float32, device=self.device)[None, None]
            t_lab = None
            if labeled:
                if lab is None:
                    raise ValueError(f"sample {i} of a labeled set has no label")
                lab = np.asarray(lab)
                if lab.shape != img.shape:
                    raise ValueError(f"label shape {lab.shape} differs from image shape {img.shape} (sample {i})")
                t_lab = torch.as_tensor(lab.astype(np.int64), device=self.device)[None]
            t_img, t_lab = resize_2d(t_img, t_lab, self.size, image_interp)
            self.images[i] = t_img[0]
            if self.labels is not None:
                self.labels[i] = t_lab[0].to(self.labels.dtype)

    def __len__(self) -> int:
        return self.images.shape[0]

    @staticmethod
    def nbytes(n: int, size: Sequence[int], labeled: bool) -> int:
        """Device bytes of ``n`` slices of ``size`` (images float32, labels uint8)."""
        return n * math.prod(size) * (4 + (1 if labeled else 0))

    def batch(self, indices: Sequence[int], generator: Optional[torch.Generator] = None
              ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The augmented batch of samples ``indices``: ``image (B, 1, h, w)``
        float32 and ``label (B, h, w)`` int64 (None for an unlabeled set), on
        the set's device; equal to ``prepare_batch_2d`` of the same samples
        with the same generator state."""
        idx = torch.as_tensor(list(indices), dtype=torch.long).to(self.device, non_blocking=True)
        img = self.images.index_select(0, idx)
        lab = self.labels.index_select(0, idx).long() if self.labels is not None else None
        if self.size[0] == self.size[1]:
            return augment_2d_batched(img, lab, generator=generator)
        return augment_2d(img, lab, size=self.size, generator=generator, image_interp=self.image_interp)


class DeviceVolumes:
    """A 3D case set on ``device``: one image tensor (float32) and one label
    tensor (uint8) per case, in the order stored (LA: ``(X, Y, Z)``).

    ``batch(indices, generator)`` does what
    :func:`~napari_m3hl.method.augment.prepare_batch_3d` does (rot90 by k in
    the first two axes, flip along axis 0 or 1, centred zero padding up to
    ``patch``, a random crop of ``patch``), on the device.
    """

    def __init__(self, samples, patch: Sequence[int], device: torch.device | str, labeled: bool = True,
                 num_classes: int = 256) -> None:
        self.patch = tuple(int(p) for p in patch)
        if len(self.patch) != 3:
            raise ValueError(f"patch must have 3 sizes, got {self.patch}")
        self.device = torch.device(device)
        self.images: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] | None = [] if labeled else None
        for i in range(len(samples)):
            img, lab = samples[i]
            img = np.asarray(img)
            if img.ndim != 3:
                raise ValueError(f"3D samples must be 3D arrays, got shape {img.shape} (sample {i})")
            self.images.append(torch.as_tensor(np.ascontiguousarray(img, dtype=np.float32), device=self.device))
            if self.labels is not None:
                if lab is None or np.shape(lab) != img.shape:
                    raise ValueError(f"sample {i} of a labeled set needs a label of shape {img.shape}")
                self.labels.append(torch.as_tensor(np.asarray(lab).astype(np.int64), device=self.device)
                                   .to(_label_dtype(num_classes)))

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: Sequence[int], generator: Optional[torch.Generator] = None
              ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``images (B, 1, *patch)`` float32 and ``labels (B, *patch)`` int64
        (None for an unlabeled set); equal to ``prepare_batch_3d`` of the same
        cases with the same generator state."""
        indices = [int(i) for i in indices]
        b = len(indices)
        ks, axes, offs = draws_3d(b, generator)
        imgs, labs = [], []
        for j, i in enumerate(indices):
            arrays = [self.images[i]] + ([self.labels[i]] if self.labels is not None else [])
            arrays = [torch.flip(torch.rot90(a, int(ks[j]), dims=(0, 1)), dims=(int(axes[j]),)) for a in arrays]
            shape = arrays[0].shape
            pads = [max(p - s, 0) for p, s in zip(self.patch, shape)]
            if any(pads):
                widths = [w for pd in reversed(pads) for w in (pd // 2, pd - pd // 2)]  # F.pad: last axis first
                arrays = [F.pad(a, widths, mode="constant", value=0) for a in arrays]
                shape = arrays[0].shape
            starts = [int(math.floor(float(offs[j, d]) * (shape[d] - self.patch[d] + 1))) for d in range(3)]
            starts = [min(st, shape[d] - self.patch[d]) for d, st in enumerate(starts)]
            sl = tuple(slice(st, st + p) for st, p in zip(starts, self.patch))
            imgs.append(arrays[0][sl])
            if self.labels is not None:
                labs.append(arrays[1][sl])
        image = torch.stack(imgs)[:, None].contiguous()
        label = torch.stack(labs).long() if self.labels is not None else None
        return image, label


def use_device_data(mode: str, device: torch.device, nbytes: int) -> tuple[bool, str]:
    """Whether to hold the training set on ``device`` (``mode``: auto | on | off)
    and why, for a set of ``nbytes`` device bytes. ``auto``: on CUDA when the
    set takes at most :data:`MAX_DEVICE_SHARE` of the free device memory; on
    other devices the host loader (on the CPU both compute the same batches,
    and the host loader's per-group augmentation does less work)."""
    if mode not in DATA_ON_DEVICE:
        raise ValueError(f"data_on_device must be one of {DATA_ON_DEVICE}, got {mode!r}")
    if mode == "off":
        return False, "data_on_device=off"
    if mode == "on":
        return True, "data_on_device=on"
    if device.type != "cuda":
        return False, f"data_on_device=auto keeps the host loader on {device.type}"
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes > MAX_DEVICE_SHARE * free:
        return False, (f"data_on_device=auto: the training set ({nbytes / 2**30:.1f} GiB) would take more than "
                       f"{MAX_DEVICE_SHARE:.0%} of the free device memory ({free / 2**30:.1f} GiB); host loader")
    return True, f"data_on_device=auto: the training set ({nbytes / 2**20:.0f} MiB) is held on {device}"


def device_sets(labeled, unlabeled, config, device: torch.device
                ) -> tuple[DeviceSlices | DeviceVolumes, DeviceSlices | DeviceVolumes] | None:
    """The labeled and unlabeled sets on ``device`` when ``config.data_on_device``
    says so (see :func:`use_device_data`), else None (the host loader). Logs the choice."""
    n_l, n_u = len(labeled), len(unlabeled)
    if config.ndim == 2:
        nbytes = DeviceSlices.nbytes(n_l, config.patch_size, True) + DeviceSlices.nbytes(n_u, config.patch_size, False)
    else:  # the cases' own sizes: estimated from the first one
        first = np.shape(labeled[0][0])
        nbytes = (n_l * 5 + n_u * 4) * math.prod(first)
    use, why = use_device_data(config.data_on_device, device, nbytes)
    log.info(why)
    if not use:
        return None
    if config.ndim == 2:
        kw = dict(size=config.patch_size, device=device, image_interp=config.image_interp, num_classes=config.num_classes)
        return DeviceSlices(labeled, labeled=True, **kw), DeviceSlices(unlabeled, labeled=False, **kw)
    kw = dict(patch=config.patch_size, device=device, num_classes=config.num_classes)
    return DeviceVolumes(labeled, labeled=True, **kw), DeviceVolumes(unlabeled, labeled=False, **kw)
