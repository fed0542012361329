"""Layer control of the "Train M³HL" widget: pickers, info line, messages.

:class:`LayerPickerWidget` adds to the layout (:mod:`._layout`) everything that
follows the viewer's layers: the image / labels / extra-unlabeled pickers, the
live "k of n slices labeled" line, "New labels layer", and the status line
with napari notifications. It reads layers and never writes the user's data.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels
from napari.utils import notifications
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QListWidgetItem

from ..config import load_preset
from ..errors import M3HLInputError
from ..labels import ACDC_CLASSES
from . import _layers as lc
from ._layout import TrainWidgetLayout
from ._request import msg_2d
from ._slots import on_signal

if TYPE_CHECKING:  # pragma: no cover
    import napari


def breakable(text: str) -> str:
    """``text`` with zero-width spaces after path separators, so that a word-wrapped
    label can break a long path instead of widening the dock."""
    return text.replace("/", "/\u200b").replace("\\", "\\\u200b")


class LayerPickerWidget(TrainWidgetLayout):
    """The layout bound to a viewer: layer pickers, info line, messages."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.versions = lc.LayerVersions()
        self.last_error = ""
        self._info_source: Labels | None = None
        self._labeled_seen: tuple | None = None  # labeled slices when the info line was written
        for picker, choices in ((self.image_picker, self._image_choices), (self.labels_picker, self._labels_choices)):
            picker.native.blockSignals(True)
            picker.choices = choices  # magicgui fills the combo now, picking its first layer:
            picker.native.setCurrentIndex(-1)  # nothing is picked until refresh_layers chooses
            picker.native.blockSignals(False)
        on_signal(self.image_combo.currentIndexChanged, self._on_image_changed)
        on_signal(self.labels_combo.currentIndexChanged, self._on_labels_changed)
        on_signal(self.extra_list.itemChanged, self.update_info)
        on_signal(self.new_labels_btn.clicked, self.new_labels_layer)

    def _update_buttons(self) -> None:
        """Hook: enable buttons after the layers changed (see the training widget)."""

    # ================================================================ messages
    def _error(self, message: str) -> None:
        """Show an error: napari notification + status line (red)."""
        self.last_error = message
        self.status_label.setStyleSheet("color: #ff6b6b;")
        self.status_label.setText(breakable(message))
        notifications.show_error(message)

    def _warn(self, message: str) -> None:
        self.status_label.setStyleSheet("color: #ffc04d;")
        self.status_label.setText(breakable(message))
        notifications.show_warning(message)

    def _status(self, message: str) -> None:
        self.status_label.setStyleSheet("")
        self.status_label.setText(breakable(message))

    # ================================================================ pickers
    def _layers_of(self, kind: type) -> list:
        return [lay for lay in self.viewer.layers if isinstance(lay, kind) and not lc.is_overlay(lay)]

    def _image_choices(self, _picker: Any = None) -> list[tuple[str, Image]]:
        return [(lay.name, lay) for lay in self._layers_of(Image)]

    def _labels_choices(self, _picker: Any = None) -> list[tuple[str, Labels]]:
        return [(lay.name, lay) for lay in self._layers_of(Labels)]

    def reset_choices(self, event: Any = None) -> None:
        """Refresh the layer pickers: napari calls this (the dock widget's
        ``reset_choices``, as for magicgui widgets) when layers are added,
        removed, moved or renamed."""
        self.refresh_layers()

    def refresh_layers(self, event: Any = None) -> None:
        """Refill the layer pickers after layers were added, removed, renamed;
        a picked layer stays picked (under its new name too)."""
        image = self.image_layer()
        self._reset(self.image_picker, image, None)
        self._refresh_labels_choices()
        self._refresh_extra_choices()
        self._watch_info_source()
        self.update_info()
        self._update_buttons()

    @staticmethod
    def _reset(picker: Any, keep: Any, prefer: Any) -> None:
        """New choices for ``picker``; then ``keep`` if still there, else
        ``prefer``, else the topmost layer, is picked (without a change signal)."""
        native = picker.native
        native.blockSignals(True)
        try:
            picker.reset_choices()
            layers = list(picker.choices)
            ids = [lay.unique_id for lay in layers]
            for target in (keep, prefer, layers[-1] if layers else None):
                if target is not None and target.unique_id in ids:
                    native.setCurrentIndex(ids.index(target.unique_id))
                    break
        finally:
            native.blockSignals(False)

    def _refresh_labels_choices(self) -> None:
        image = self.image_layer()
        keep, prefer = self.labels_layer(), None
        if image is not None:  # keep a choice on the image's grid, else the topmost fitting (visible first)
            fits = [lay for lay in self._layers_of(Labels) if lay.data.shape == image.data.shape]
            fits.sort(key=lambda lay: lay.visible)
            prefer = fits[-1] if fits else None
            if prefer is not None and not any(lc.same_layer(keep, lay) for lay in fits):
                keep = None
        self._reset(self.labels_picker, keep, prefer)

    def _refresh_extra_choices(self) -> None:
        image = self.image_layer()
        checked = {self.extra_list.item(i).text() for i in range(self.extra_list.count())
                   if self.extra_list.item(i).checkState() == Qt.Checked}
        self.extra_list.blockSignals(True)
        self.extra_list.clear()
        for lay in self._layers_of(Image):
            if lc.same_layer(lay, image) or lay.ndim < 3 or lay.rgb:
                continue
            item = QListWidgetItem(lay.name)
            item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
            item.setCheckState(Qt.Checked if lay.name in checked else Qt.Unchecked)
            self.extra_list.addItem(item)
        self.extra_list.blockSignals(False)

    def image_layer(self) -> Image | None:
        """The picked image layer, if it is still in the viewer."""
        lay = self.image_picker.value if self.image_combo.currentIndex() >= 0 else None
        return lay if isinstance(lay, Image) and lc.layer_in(self.viewer, lay) else None

    def labels_layer(self) -> Labels | None:
        """The picked labels layer, if it is still in the viewer."""
        lay = self.labels_picker.value if self.labels_combo.currentIndex() >= 0 else None
        return lay if isinstance(lay, Labels) and lc.layer_in(self.viewer, lay) else None

    def extra_layers(self) -> list[Image]:
        out = []
        for i in range(self.extra_list.count()):
            item = self.extra_list.item(i)
            if item.checkState() == Qt.Checked and item.text() in self.viewer.layers:
                lay = self.viewer.layers[item.text()]
                if isinstance(lay, Image):
                    out.append(lay)
        return out

    def _on_image_changed(self, *_: Any) -> None:
        self._refresh_labels_choices()
        self._refresh_extra_choices()
        self._watch_info_source()
        self.update_info()

    def _on_labels_changed(self, *_: Any) -> None:
        self._watch_info_source()
        self.update_info()

    def _watch_info_source(self) -> None:
        """Keep the info line live: follow paint / data events of the chosen labels."""
        labels = self.labels_layer()
        if lc.same_layer(labels, self._info_source):
            return
        if self._info_source is not None:
            for sig in (self._info_source.events.data, self._info_source.events.paint):
                sig.disconnect(self.update_info)
            self._info_source.events.set_data.disconnect(self._on_labels_refreshed)
        self._info_source = labels
        self._labeled_seen = None
        if labels is not None:
            labels.events.data.connect(self.update_info)
            labels.events.paint.connect(self.update_info)
            # napari's undo / redo emit no paint event, only a refresh (set_data, also sent when slicing)
            labels.events.set_data.connect(self._on_labels_refreshed)
        for lay in (self.image_layer(), labels):
            if lay is not None:
                self.versions.watch(lay)

    def _on_labels_refreshed(self, event: Any = None) -> None:
        """Update the info line when the set of labeled slices changed (undo / redo)."""
        labels = self._info_source
        if labels is None:
            return
        seen = tuple(lc.labeled_slices(np.asarray(labels.data)))
        if seen != self._labeled_seen:
            self.update_info()

    def update_info(self, event: Any = None) -> None:
        """Refresh the line "k of n slices labeled: …; m unlabeled"."""
        image, labels = self.image_layer(), self.labels_layer()
        if image is None:
            self.info_label.setText(
                "No image layer: open a volume, or File ▸ Open Sample ▸ Synthetic cardiac MR phantom (M³HL)"
            )
            return
        if labels is None:
            self.info_label.setText(lc.slice_summary(None, image.data.shape))
            return
        if labels.data.shape != image.data.shape:
            self.info_label.setText(
                f"labels '{labels.name}' {tuple(labels.data.shape)} do not match image '{image.name}' "
                f"{tuple(image.data.shape)}"
            )
            return
        self._labeled_seen = tuple(lc.labeled_slices(np.asarray(labels.data)))
        text = lc.slice_summary(np.asarray(labels.data), image.data.shape)
        extra = self.extra_layers()
        if extra:
            n = sum(int(np.prod(lay.data.shape[:-2])) for lay in extra)
            text += f"; +{n} slices from {len(extra)} extra volume(s)"
        self.info_label.setText(text)

    def new_labels_layer(self) -> Labels | None:
        """Add an empty Labels layer matched to the selected image and select it."""
        image = self.image_layer()
        if image is None:
            self._error("No image layer: open a cardiac MR volume first, then create its labels layer.")
            return None
        if image.ndim < 3 or image.rgb:
            self._error(msg_2d(image))
            return None
        names = self.current_class_names()
        layer = lc.new_labels_layer(self.viewer, image, names)
        self.labels_combo.setCurrentText(layer.name)
        self.viewer.layers.selection.active = layer
        self._status(f"Paint {', '.join(names[1:])} on a few slices of '{layer.name}', then press Train.")
        return layer

    def current_class_names(self) -> tuple[str, ...]:
        try:
            return tuple(load_preset(self.preset_combo.currentText() or "acdc_unet2d").class_names)
        except M3HLInputError:
            return tuple(ACDC_CLASSES)
