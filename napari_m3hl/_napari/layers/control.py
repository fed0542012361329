"""Layer control: overlay names, class colours, in-place updates, data tokens.

Everything here runs in the GUI thread. Overlays live in their own layers
under fixed names and are updated in place (``layer.data = ...``) once they
exist, so user edits to *their* layers are never touched and a re-run reuses
the overlay layers (visibility, opacity and position chosen by the user stay).
The overlays themselves (preview, mix preview, disagreement) are drawn by :mod:`napari_m3hl._napari.layers.overlays`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import napari
    from napari.layers import Image, Labels, Layer

PSEUDO_LABELS = "M³HL pseudo-labels"
MIX_PREVIEW = "M³HL mix preview"
MIX_TARGETS = "M³HL mix targets"
SEGMENTATION = "M³HL segmentation"
PREVIEW = "M³HL segmentation preview"  # a fine-tune's segmentation at each check (not what anything is taught)
DISAGREEMENT = "M³HL disagreement"
OVERLAY_NAMES: tuple[str, ...] = (PSEUDO_LABELS, MIX_PREVIEW, MIX_TARGETS, SEGMENTATION, PREVIEW, DISAGREEMENT)
#: The segmentation of another volume of a fine-tune: ``f"{SEGMENTATION} · {image name}"``.
SEGMENTATION_OF = SEGMENTATION + " · "
#: Colour of the disagreement overlay (value 1): orange.
DISAGREEMENT_COLOR = (1.0, 0.55, 0.0, 1.0)

#: RGBA colour per ACDC class index: RV red, Myo green, LV blue.
CLASS_COLORS: dict[int, tuple[float, float, float, float]] = {
    0: (0.0, 0.0, 0.0, 0.0),
    1: (0.90, 0.10, 0.10, 1.0),
    2: (0.10, 0.80, 0.20, 1.0),
    3: (0.15, 0.35, 1.00, 1.0),
}
_EXTRA_COLORS = [(1.0, 0.8, 0.0, 1.0), (0.8, 0.2, 0.9, 1.0), (0.0, 0.8, 0.8, 1.0), (1.0, 0.5, 0.0, 1.0)]


def class_color_dict(num_classes: int) -> dict[int | None, tuple[float, ...]]:
    """Colour per class index 0..num_classes-1 (0 transparent), ``None``: unknown values."""
    colors: dict[int | None, tuple[float, ...]] = {}
    for c in range(num_classes):
        colors[c] = CLASS_COLORS.get(c, _EXTRA_COLORS[(c - 4) % len(_EXTRA_COLORS)])
    if num_classes == 2:  # single foreground class (e.g. left atrium): yellow
        colors[1] = _EXTRA_COLORS[0]
    colors[None] = (0.6, 0.6, 0.6, 1.0)
    return colors


def class_colormap(num_classes: int):
    """A napari ``DirectLabelColormap`` with the class colours."""
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict=class_color_dict(num_classes))


def class_features(class_names: Sequence[str]) -> dict[str, list]:
    """Labels ``features`` table: one row per class index, ``class`` column shown in the status bar."""
    return {"index": list(range(len(class_names))), "class": list(class_names)}


def is_overlay(layer: "Layer") -> bool:
    """True for the plugin's own overlay layers."""
    return layer.name in OVERLAY_NAMES or layer.name.startswith(SEGMENTATION_OF)


def geometry_kwargs(like: "Layer", ndim: int | None = None) -> dict[str, Any]:
    """``scale``/``translate`` (last ``ndim`` axes) and NIfTI metadata of ``like``."""
    nd = like.ndim if ndim is None else ndim
    meta = {k: like.metadata[k] for k in ("affine", "header", "source_path") if k in like.metadata}
    return {
        "scale": tuple(like.scale[-nd:]),
        "translate": tuple(like.translate[-nd:]),
        "metadata": meta,
    }


def class_labels(
    data: np.ndarray,
    name: str,
    class_names: Sequence[str],
    like: "Layer | None" = None,
    **kwargs: Any,
) -> "Labels":
    """A Labels layer (not yet in a viewer) with class colours/names and ``like``'s geometry."""
    from napari.layers import Labels

    kw: dict[str, Any] = geometry_kwargs(like, data.ndim) if like is not None else {}
    kw.update(kwargs)
    kw.setdefault("colormap", class_colormap(len(class_names)))
    return Labels(data, name=name, features=class_features(class_names), **kw)


def add_class_labels(
    viewer: "napari.Viewer",
    data: np.ndarray,
    name: str,
    class_names: Sequence[str],
    like: "Layer | None" = None,
    **kwargs: Any,
) -> "Labels":
    """Add a Labels layer with class colours/names and ``like``'s geometry (it becomes the selected layer)."""
    return viewer.add_layer(class_labels(data, name, class_names, like=like, **kwargs))


#: The paint tools' canvas overlays of a napari Labels layer (polygon outline,
#: brush circle). napari builds their vispy visuals when the layer is added,
#: about 85 ms of the GUI thread's time, unless they are hidden then.
PAINT_OVERLAYS = ("polygon", "brush_stroke")


def add_quietly(viewer: "napari.Viewer", layer: "Layer", paint_tools: bool = False) -> "Layer":
    """Add ``layer`` (built, not in a viewer) without selecting it, at the
    least cost to the GUI thread (measured in docs/benchmarks.md):

    * the selection stays on the user's layer (napari would select the new
      layer, and switching the layer controls there and back costs ~45 ms);
    * a Labels layer's paint-tool overlays are not built: never for a
      read-only overlay (``paint_tools`` False), and for an editable one
      (the segmentation) only when the user picks a tool (its ``mode``
      changes), one per event-loop turn then.
    """
    overlays = getattr(layer, "_overlays", {})
    hidden = [overlays[k] for k in PAINT_OVERLAYS if k in overlays and overlays[k].visible]
    for overlay in hidden:
        overlay.visible = False
    layers = getattr(viewer.layers, "__wrapped__", viewer.layers)  # plugins get a PublicOnlyProxy
    activate = getattr(layers, "_activate_on_insert", None)
    if activate is None:  # a napari without the flag: add, then give the selection back
        with keep_selection(viewer):
            viewer.layers.append(layer)
    else:
        layers._activate_on_insert = False
        try:
            layers.append(layer)
        finally:
            layers._activate_on_insert = activate
    if paint_tools and hidden:
        def on_mode(event: Any = None) -> None:
            layer.events.mode.disconnect(on_mode)
            _show_later(hidden)

        layer.events.mode.connect(on_mode)
    return layer


def _show_later(overlays: list) -> None:
    """Make ``overlays`` visible one per event-loop turn (napari then builds each visual)."""
    from qtpy.QtCore import QTimer

    def step() -> None:
        overlays.pop(0).visible = True
        if overlays:
            QTimer.singleShot(0, step)

    QTimer.singleShot(0, step)


def new_labels_layer(
    viewer: "napari.Viewer", image: "Image", class_names: Sequence[str], name: str | None = None
) -> "Labels":
    """An empty uint8 Labels layer on ``image``'s grid, ready to paint.

    Shape, scale, translate and the NIfTI affine/header of the image are
    copied, so the painted labels export with the image's geometry. The
    selected label is 1 (the first foreground class) and the brush paints
    one slice at a time.
    """
    data = np.zeros(image.data.shape, dtype=np.uint8)
    layer = add_class_labels(viewer, data, name or f"{image.name} labels", class_names, like=image)
    layer.selected_label = 1
    layer.n_edit_dimensions = 2
    return layer


def upsert_labels(
    viewer: "napari.Viewer",
    name: str,
    data: np.ndarray,
    class_names: Sequence[str],
    like: "Layer | None" = None,
    built: "Labels | None" = None,
    **kwargs: Any,
) -> "Labels":
    """Set ``data`` of the Labels layer ``name`` in place, or add it once
    (:func:`add_quietly`; ``editable=False`` for a read-only overlay;
    ``built``: the layer to add, made beforehand with :func:`class_labels`).

    An existing layer keeps its identity (and the user's display settings);
    only its data, and its geometry when ``like`` is given, are replaced.
    """
    from napari.layers import Labels

    layer = viewer.layers[name] if name in viewer.layers else None
    if isinstance(layer, Labels):
        if like is not None:
            geo = geometry_kwargs(like, data.ndim)
            if layer.ndim != data.ndim or tuple(layer.scale) != geo["scale"]:
                layer.scale = geo["scale"]
                layer.translate = geo["translate"]
            layer.metadata.update(geo["metadata"])
        layer.data = data
        return layer
    if layer is not None:  # a foreign layer took our name: rename it out of the way
        layer.name = f"{name} (user)"
    editable = bool(kwargs.pop("editable", True))
    if built is not None and built.name == name and tuple(built.data.shape) == tuple(data.shape):
        if built.data is not data:
            built.data = data
        new = built
    else:
        new = class_labels(data, name, class_names, like=like, **kwargs)
    new.editable = editable
    return add_quietly(viewer, new, paint_tools=editable)


def update_changed(layer: "Labels", values: np.ndarray, index: tuple[int, ...] = (), most: float = 0.25) -> int:
    """Write ``values`` into ``layer.data[index]`` of the read-only overlay
    ``layer`` where they differ, redrawing only that region (napari's partial
    refresh); returns the number of voxels changed. When more than ``most``
    of them change, the data are replaced instead; a hidden layer's array is
    written without a redraw (napari slices it when it is shown). Not for a
    layer the user edits: the change goes through the layer's undo history."""
    part = np.asarray(layer.data[index])
    if part.shape != values.shape:
        raise ValueError(f"values {values.shape} do not fit '{layer.name}'{list(index)} {part.shape}")
    changed = np.nonzero(part != values)
    n = int(changed[0].size)
    if n and not layer.visible:  # napari does not slice a hidden layer: write the array; shown, it re-slices
        full = tuple(np.full(n, i, dtype=np.intp) for i in index) + changed
        layer.data[full] = values[changed]
    elif n > most * part.size:
        data = np.array(layer.data, copy=True) if index else values.astype(layer.data.dtype)
        if index:
            data[index] = values
        layer.data = data
    elif n:
        full = tuple(np.full(n, i, dtype=np.intp) for i in index) + changed
        with layer.block_history():
            layer.data_setitem(full, values[changed].astype(layer.data.dtype))
    return n


@contextlib.contextmanager
def keep_selection(viewer: "napari.Viewer") -> Iterator[None]:
    """Add overlay layers without taking the selection from the layer the user works on."""
    active = viewer.layers.selection.active
    try:
        yield
    finally:
        if active is not None and layer_in(viewer, active):
            viewer.layers.selection.active = active


# --------------------------------------------------------------------- slices


def labeled_slices(labels: np.ndarray) -> np.ndarray:
    """Indices of the slices (axis -3) holding any nonzero label.

    For ``(T, Z, Y, X)`` labels the indices run over all ``T*Z`` slices in
    frame-major order (as :func:`frames` lists them).
    """
    lab = np.asarray(labels)
    if lab.ndim < 3:
        return np.flatnonzero(np.atleast_1d(lab.any()))
    flat = lab.reshape(-1, lab.shape[-2] * lab.shape[-1])
    return np.flatnonzero(flat.any(axis=1))


def slice_summary(labels: np.ndarray | None, image_shape: Sequence[int] | None = None) -> str:
    """One line such as ``"3 of 10 slices labeled: 2, 5, 8; 7 unlabeled"``."""
    if labels is None:
        if image_shape is None or len(image_shape) < 3:
            return "no image volume selected"
        n = int(np.prod(image_shape[:-2]))
        return f"0 of {n} slices labeled; choose or create a labels layer"
    lab = np.asarray(labels)
    if lab.ndim < 3:
        return "the labels layer is 2D; a volume of slices is needed"
    depth = lab.shape[-3]
    n = int(np.prod(lab.shape[:-2]))
    idx = labeled_slices(lab)
    if lab.ndim == 3:
        names = [str(int(i)) for i in idx]
    else:
        names = [f"t{int(i) // depth}:{int(i) % depth}" for i in idx]
    shown = ", ".join(names[:12]) + (", …" if len(names) > 12 else "")
    head = f"{len(idx)} of {n} slices labeled"
    return f"{head}: {shown}; {n - len(idx)} unlabeled" if len(idx) else f"{head}; paint at least one slice"


def frames(volume: np.ndarray) -> list[np.ndarray]:
    """The ``(D, H, W)`` volumes of a 3D array (itself) or a 4D ``(T, D, H, W)`` array (its frames)."""
    arr = np.asarray(volume)
    return [arr] if arr.ndim == 3 else [arr[t] for t in range(arr.shape[0])]


def slice_in_view(viewer: "napari.Viewer", layer: "Layer") -> tuple[int, ...]:
    """Data index of the slice of ``layer`` under the viewer's current point:
    ``(z,)`` for a (Z, Y, X) layer, ``(t, z)`` for (T, Z, Y, X)."""
    idx = layer.world_to_data(viewer.dims.point)
    lead = layer.ndim - 2
    return tuple(int(np.clip(round(float(idx[k])), 0, layer.data.shape[k] - 1)) for k in range(lead))


def go_to_slice(viewer: "napari.Viewer", layer: "Layer", index: Sequence[int]) -> None:
    """Move the viewer's sliders so that slice ``index`` (see :func:`slice_in_view`) of ``layer`` shows."""
    lead = layer.ndim - 2
    if len(index) != lead:
        raise ValueError(f"slice index {tuple(index)} does not fit layer '{layer.name}' of {layer.ndim} axes")
    offset = viewer.dims.ndim - layer.ndim
    for k, i in enumerate(index):
        world = float(layer.translate[k]) + float(i) * float(layer.scale[k])
        viewer.dims.set_point(offset + k, world)


def slice_key_text(index: Sequence[int]) -> str:
    """``"slice 7"`` or ``"t2 slice 7"`` for a slice index."""
    return f"slice {index[-1]}" if len(index) == 1 else f"t{index[0]} slice {index[-1]}"


def accept_slice(labels: "Labels", index: Sequence[int], values: np.ndarray) -> int:
    """Write ``values`` (H, W) into slice ``index`` of the user's ``labels`` as
    ONE undoable edit (napari's own history: Ctrl+Z undoes it). Returns the
    number of pixels changed (0: nothing to do, no history entry)."""
    values = np.asarray(values)
    target = np.asarray(labels.data[tuple(index)])
    if values.shape != target.shape:
        raise ValueError(f"slice of shape {values.shape} does not fit '{labels.name}' slice {target.shape}")
    changed = np.nonzero(target != values)
    if changed[0].size == 0:
        return 0
    full = tuple(np.full(changed[0].size, i, dtype=np.intp) for i in index) + changed
    with labels.block_history():
        labels.data_setitem(full, values[changed].astype(labels.data.dtype))
    return int(changed[0].size)


# --------------------------------------------------------------------- data tokens


def same_layer(a: "Layer | None", b: "Layer | None") -> bool:
    """Whether two references denote the same layer. Plugins get layers wrapped
    in napari's ``PublicOnlyProxy`` (a new proxy per access), so identity is
    compared through ``unique_id``."""
    if a is None or b is None:
        return a is b
    return a.unique_id == b.unique_id


def layer_in(viewer: "napari.Viewer", layer: "Layer | None") -> bool:
    """Whether ``layer`` is still in the viewer."""
    return layer is not None and any(lay.unique_id == layer.unique_id for lay in viewer.layers)


@dataclass
class LayerVersions:
    """Counts data changes of layers, to tell stale previews from current ones.

    :meth:`watch` connects to a layer's ``data`` event (and ``paint`` for
    Labels); each emission bumps that layer's counter. :meth:`token` is a
    tuple of layer identities and counters: a preview computed for a token
    is stale as soon as the token of the same layers differs.
    """

    counts: dict[Any, int] = field(default_factory=dict)

    def watch(self, layer: "Layer") -> None:
        key = layer.unique_id
        if key in self.counts:
            return
        self.counts[key] = 0

        def bump(event=None, key=key) -> None:
            self.counts[key] = self.counts.get(key, 0) + 1

        layer.events.data.connect(bump)
        if hasattr(layer.events, "paint"):
            layer.events.paint.connect(bump)

    def token(self, layers: Iterable["Layer | None"]) -> tuple:
        out = []
        for layer in layers:
            if layer is None:
                out.append(None)
                continue
            self.watch(layer)
            out.append((layer.unique_id, self.counts[layer.unique_id]))
        return tuple(out)
