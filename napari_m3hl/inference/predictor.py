"""One object that predicts with a trained network: :class:`Predictor`.

"Predict with a checkpoint" involves a handful of decisions: 2D slice-wise or
3D sliding window, the network input size, how inputs are resized to it (the
checkpoint's ``image_interp``: a model trained on nearest-resized slices must
see nearest-resized slices), student or EMA teacher, and what happens when a
file has no teacher. A ``Predictor`` makes them once, from the checkpoint (or
from a live network and its training config), so every caller that scores or
segments a volume does it the same way.

Volumes are ``(D, H, W)`` float32 for 2D networks (slices along axis 0) and
in the network's training axis order for 3D networks; labels come back in
the same shape, uint8.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from napari_m3hl.errors import M3HLInputError

WHICH = ("student", "teacher")


@dataclass
class Predictor:
    """A network in eval mode plus everything needed to apply it to a volume.

    Attributes:
        model: the network, on ``device``.
        patch: network input size, pixels (2 values) or voxels (3 values).
        num_classes: output classes including background.
        class_names: one name per class.
        image_interp: ``"bilinear"`` or ``"nearest"``: how 2D slices are
            resized to ``patch`` (as in training).
        which: ``"student"`` or ``"teacher"``.
        device: where the network runs.
        precision: 2D inference precision (``"auto"``, ``"fp32"``, ``"bf16"``;
            see :func:`inference.predict_volume_2d`).
        channels_last: 2D inference memory format.
        batch_size: slices per forward pass (2D).
        stride: sliding-window step, voxels (3D; ``None``: the default of
            :func:`inference.predict_volume_3d`).
        clean: keep only each class's largest connected component, over the
            whole volume (full connectivity: 26 neighbours,
            :func:`napari_m3hl.method.components.largest_component_per_class`),
            in the labels :meth:`predict` returns (:meth:`finish`). The
            default for every segmentation a user gets (``m3hl predict`` and
            ``evaluate``, the widget, the few-slice loop); off for a live
            network (:meth:`from_network`: training's validation and previews)
            and for the papers' 2D protocol (``--no-clean``). Probabilities
            are never changed.
        tta: flip test-time augmentation (:class:`napari_m3hl.inference.tta.FlipAverage`:
            four passes, the class probabilities of the input and its in-plane
            mirror images averaged). Off by default; measured in docs/benchmarks.md.
        intensity: how :meth:`scale` maps a raw image to [0, 1] (``"percentile"``
            or ``"minmax"``), as the network's training scaled its images.
        start_blend: weight of the start model's probabilities blended into
            the student's (a few-slice fine-tune's checkpoint; 0: the network alone).
    """

    model: nn.Module
    patch: tuple[int, ...]
    num_classes: int
    class_names: tuple[str, ...]
    image_interp: str = "bilinear"
    which: str = "student"
    device: torch.device = torch.device("cpu")
    precision: str = "auto"
    channels_last: bool = True
    batch_size: int = 16
    stride: tuple[int, ...] | None = None
    clean: bool = True
    tta: bool = False
    intensity: str = "percentile"
    start_blend: float = 0.0

    @property
    def ndim(self) -> int:
        return len(self.patch)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path | dict[str, Any],
        which: str = "student",
        device: str | torch.device = "cpu",
        fallback_to_student: bool = False,
        batch_size: int = 16,
        blend: bool = True,
        clean: bool = True,
        tta: bool = False,
    ) -> "Predictor":
        """Load a checkpoint or model file (a path, or an already loaded dict).

        ``which="teacher"`` on a file without a teacher raises
        :class:`M3HLInputError`, unless ``fallback_to_student`` (then the
        student is used and ``self.which`` says so). The student of a
        few-slice fine-tune's checkpoint segments blended with its start model
        (:mod:`napari_m3hl.inference.blend`) unless ``blend=False``.
        ``clean`` and ``tta``: see the class attributes.
        """
        from napari_m3hl.inference.blend import ProbabilityBlend, start_blend
        from napari_m3hl.io.checkpoint import image_interp, load_checkpoint, model_from_checkpoint

        if which not in WHICH:
            raise M3HLInputError(f"which must be 'student' or 'teacher', got {which!r}")
        ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
        if which == "teacher" and "teacher" not in ckpt:
            if not fallback_to_student:
                src = "" if isinstance(checkpoint, dict) else f" {checkpoint}"
                raise M3HLInputError(
                    f"the model file{src} holds no EMA teacher (only a student); use the student "
                    "(--which student) or a training checkpoint such as last.pt"
                )
            which = "student"
        dev = torch.device(device)
        model = model_from_checkpoint(ckpt, which, dev)
        w = start_blend(ckpt) if which == "student" and blend else 0.0
        if w > 0:
            model = ProbabilityBlend([model_from_checkpoint(ckpt, "start", dev), model], [w, 1.0 - w]).eval()
        names = tuple(ckpt.get("class_names") or [f"class {c}" for c in range(int(ckpt["num_classes"]))])
        return cls(model, tuple(int(p) for p in ckpt["patch_size"]), int(ckpt["num_classes"]), names,
                   image_interp(ckpt), which, dev, batch_size=batch_size,
                   intensity=(ckpt.get("config") or {}).get("intensity", "percentile"), start_blend=w,
                   clean=clean, tta=tta)

    @classmethod
    def from_network(
        cls,
        model: nn.Module,
        config: Any,
        which: str = "student",
        device: str | torch.device | None = None,
        precision: str = "auto",
        channels_last: bool = True,
    ) -> "Predictor":
        """Wrap a live network (e.g. during training) with its ``TrainConfig``;
        ``device`` defaults to where the network's parameters are. Not cleaned
        (``clean=False``): training validates as the papers do."""
        dev = torch.device(device) if device is not None else next(model.parameters()).device
        return cls(model, tuple(int(p) for p in config.patch_size), int(config.num_classes),
                   tuple(config.class_names), config.image_interp, which, dev, precision, channels_last,
                   intensity=getattr(config, "intensity", "percentile"), clean=False)

    def scale(self, image: np.ndarray) -> np.ndarray:
        """A raw 2D-network input volume (NIfTI, a layer) scaled to [0, 1] as this
        network's training scaled its images (``self.intensity``)."""
        from napari_m3hl.io.intensity import scale_intensity

        return scale_intensity(image, self.intensity)

    def predict(self, volume: np.ndarray, return_probs: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Labels ``uint8`` of the volume's shape, cleaned when ``self.clean``
        (and probabilities ``(C, *shape)`` float32 when ``return_probs``)."""
        from napari_m3hl.inference.slices2d import predict_volume_2d
        from napari_m3hl.inference.tta import FlipAverage
        from napari_m3hl.inference.window3d import predict_volume_3d

        vol = np.asarray(volume)
        model = FlipAverage(self.model) if self.tta else self.model
        if self.ndim == 2:
            if vol.ndim != 3:
                raise M3HLInputError(f"a 2D network segments (D, H, W) volumes; got an array of shape {vol.shape}")
            out = predict_volume_2d(model, vol, patch=self.patch, device=self.device,
                                    batch_size=self.batch_size, return_probs=return_probs,
                                    resize_input=self.image_interp, precision=self.precision,
                                    channels_last=self.channels_last)
            if return_probs:
                return self.finish(out[0]), out[1]
            return self.finish(out)
        extra = {} if self.stride is None else {"stride": tuple(self.stride)}
        return predict_volume_3d(model, vol, patch=self.patch, device=self.device, num_classes=self.num_classes,
                                 keep_largest=self.clean, return_probs=return_probs, **extra)

    def finish(self, labels: np.ndarray) -> np.ndarray:
        """A label volume as this predictor hands labels out: with ``clean``, each
        class's largest 3D connected component kept (a new array), else ``labels``
        itself. For labels made outside :meth:`predict` from its probabilities
        (the few-slice loop's blend), so they are cleaned the same way."""
        from napari_m3hl.method.components import largest_component_per_class

        if not self.clean or self.num_classes < 2:
            return labels
        return largest_component_per_class(np.asarray(labels)[None], self.num_classes)[0]

    def score(
        self,
        volumes: Sequence[tuple[str, np.ndarray, np.ndarray]],
        spacing: Sequence[float] | None = None,
        empty_convention: str = "paper",
    ) -> tuple[dict[str, Any], dict[str, dict[str, dict[str, float]]]]:
        """Dice, Jaccard, HD95 and ASD of ``(name, image, label)`` volumes.

        Returns ``(summary, per_case)``: :func:`metrics.summarize` over the
        cases, and per case name the per-class metric dicts.
        """
        from napari_m3hl.metrics.labelmaps import evaluate_case, summarize

        cases, per_case = [], {}
        for name, image, label in volumes:
            pred = self.predict(image)
            m = evaluate_case(pred, label, self.num_classes, spacing=spacing, empty_convention=empty_convention)
            cases.append(m)
            per_case[name] = {self.class_names[c]: vars(v) for c, v in m.items()}
        return summarize(cases, list(self.class_names)), per_case
