"""The run's overlay layers: the preview, the mix preview and targets, the disagreement map.

Everything here runs in the GUI thread. Each overlay lives in its own layer
under a fixed name (:mod:`napari_m3hl._napari.layers.control`) and is added once, then updated in place.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from napari_m3hl._napari.layers.control import (
    DISAGREEMENT, DISAGREEMENT_COLOR, MIX_PREVIEW, MIX_TARGETS, PSEUDO_LABELS, add_quietly, class_labels,
    upsert_labels,
)

if TYPE_CHECKING:  # pragma: no cover
    import napari
    from napari.layers import Image, Labels, Layer


MIX_GAP = 4  # pixels between the two mixed images


def upsert_image(viewer: "napari.Viewer", name: str, data: np.ndarray, **kwargs: Any) -> "Image":
    """Set ``data`` of the Image layer ``name`` in place, or add it once."""
    from napari.layers import Image

    layer = viewer.layers[name] if name in viewer.layers else None
    if isinstance(layer, Image):
        layer.data = data
        return layer
    if layer is not None:
        layer.name = f"{name} (user)"
    from napari.layers import Image as ImageLayer

    return add_quietly(viewer, ImageLayer(data, name=name, **kwargs))


def mix_montage(images: np.ndarray, targets: np.ndarray, gap: int = MIX_GAP) -> tuple[np.ndarray, np.ndarray]:
    """The two mixed images (2, h, w) and their targets side by side: (h, 2w + gap)."""
    h, w = images.shape[-2:]
    montage = np.zeros((h, 2 * w + gap), dtype=np.float32)
    tmontage = np.zeros((h, 2 * w + gap), dtype=np.uint8)
    for k in range(2):
        montage[:, k * (w + gap): k * (w + gap) + w] = images[k]
        tmontage[:, k * (w + gap): k * (w + gap) + w] = targets[k]
    return montage, tmontage


def mix_geometry(image: "Layer", patch: Sequence[int]) -> dict[str, tuple[float, float]]:
    """Scale/translate placing a (patch_h, 2 patch_w + gap) montage just right of
    ``image`` at the same physical size as one of its slices."""
    sy, sx = (float(s) for s in image.scale[-2:])
    ih, iw = image.data.shape[-2:]
    ph, pw = int(patch[0]), int(patch[1])
    ty, tx = (float(t) for t in image.translate[-2:])
    return {"scale": (ih * sy / ph, iw * sx / pw), "translate": (ty, tx + iw * sx * 1.05)}


def _place(layer: "Layer", geo: dict[str, Any]) -> None:
    if not np.allclose(layer.scale, geo["scale"]):
        layer.scale = geo["scale"]
    if not np.allclose(layer.translate, geo["translate"]):
        layer.translate = geo["translate"]


def show_mix(viewer: "napari.Viewer", image: "Layer", montage: np.ndarray, targets: np.ndarray,
             patch: Sequence[int], class_names: Sequence[str]) -> None:
    """Update (or add once) the mix preview image and its targets beside ``image``."""
    geo = mix_geometry(image, patch)
    layer = upsert_image(viewer, MIX_PREVIEW, montage, colormap="gray", contrast_limits=(0.0, 1.0), **geo)
    _place(layer, geo)
    tlayer = upsert_labels(viewer, MIX_TARGETS, targets, class_names, opacity=0.4, editable=False, **geo)
    _place(tlayer, geo)
    tlayer.editable = False


def prepare_preview(viewer: "napari.Viewer", image: "Layer", class_names: Sequence[str],
                    built: "Labels | None" = None, name: str = PSEUDO_LABELS) -> "Labels":
    """Add (once) or clear (zeros, in place) the read-only preview overlay
    ``name`` (the pseudo-labels, or a fine-tune's segmentation preview) on
    ``image``'s grid; ``built``: the layer from :func:`preview_layer`, to add
    if none fits yet.

    Adding a layer costs the GUI thread tens of milliseconds (napari's layer
    controls, vispy visuals; see :func:`napari_m3hl._napari.layers.control.add_quietly`); the widget
    builds the layer in one event-loop turn and adds it in the next
    (:func:`preview_steps`), so the updates during training are in-place
    data changes and no single turn pays for more than one piece.
    """
    layer = viewer.layers[name] if name in viewer.layers else None
    from napari.layers import Labels

    if isinstance(layer, Labels) and tuple(layer.data.shape) == tuple(image.data.shape):
        if layer.data.any():  # a previous run's preview: cleared
            layer.data = np.zeros(image.data.shape, np.uint8)
    elif built is not None and tuple(built.data.shape) == tuple(image.data.shape):
        if layer is not None:  # a foreign layer took our name: renamed out of the way
            layer.name = f"{name} (user)"
        layer = add_quietly(viewer, built)
    else:
        layer = upsert_labels(viewer, name, np.zeros(image.data.shape, np.uint8), class_names,
                              like=image, opacity=0.45, editable=False)
    layer.editable = False
    return layer


def preview_layer(image: "Layer", class_names: Sequence[str], name: str = PSEUDO_LABELS) -> "Labels":
    """The empty read-only preview layer ``name`` on ``image``'s grid, built but not added."""
    layer = class_labels(np.zeros(image.data.shape, np.uint8), name, class_names, like=image, opacity=0.45)
    layer.editable = False
    return layer


def preview_steps(viewer: "napari.Viewer", image: "Layer", class_names: Sequence[str],
                  name: str = PSEUDO_LABELS) -> list[Callable[[], None]]:
    """:func:`prepare_preview` of the layer ``name`` in two pieces for two
    event-loop turns: build the layer if none fits (~20 ms), then add it or
    clear the existing one."""
    built: list["Labels"] = []

    def build() -> None:
        layer = viewer.layers[name] if name in viewer.layers else None
        if layer is None or tuple(layer.data.shape) != tuple(image.data.shape):
            built.append(preview_layer(image, class_names, name))

    return [build, lambda: prepare_preview(viewer, image, class_names, built[0] if built else None, name)]


def prepare_mix(viewer: "napari.Viewer", image: "Layer", patch: Sequence[int], class_names: Sequence[str],
                targets: bool) -> None:
    """Add (once) or clear the mix preview image (``targets`` False) or its targets beside ``image``."""
    ph, pw = int(patch[0]), int(patch[1])
    geo = mix_geometry(image, patch)
    shape = (ph, 2 * pw + MIX_GAP)
    if targets:
        layer = upsert_labels(viewer, MIX_TARGETS, np.zeros(shape, np.uint8), class_names, opacity=0.4,
                              editable=False, **geo)
        layer.editable = False
    else:
        layer = upsert_image(viewer, MIX_PREVIEW, np.zeros(shape, np.float32), colormap="gray",
                             contrast_limits=(0.0, 1.0), **geo)
    _place(layer, geo)


def show_disagreement(viewer: "napari.Viewer", image: "Layer", data: np.ndarray) -> "Labels":
    """Update (or add once) the 'M³HL disagreement' overlay (1 = student and teacher differ)."""
    from napari.utils.colormaps import DirectLabelColormap

    layer = upsert_labels(viewer, DISAGREEMENT, data, ("agree", "disagree"), like=image, opacity=0.7, editable=False,
                          colormap=DirectLabelColormap(color_dict={0: (0, 0, 0, 0), 1: DISAGREEMENT_COLOR,
                                                                   None: DISAGREEMENT_COLOR}))
    layer.editable = False
    return layer
