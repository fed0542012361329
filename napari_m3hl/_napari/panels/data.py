"""The Data panel of the dock widget: layer pickers, info line, New labels layer.

:class:`DataPanel` holds everything that follows the viewer's layers: the
image and labels pickers (magicgui combo boxes, ``create_widget(annotation=
napari.layers.Image)`` / ``Labels``, filtered to the user's layers), "More
volumes" (other image layers to train on, each ticked with its labels layer
or unlabeled), the live "k of n slices labeled" line and "New labels
layer". napari refreshes the pickers through the dock widget's
``reset_choices`` (it connects that to the layer list's inserted, removed,
reordered and renamed events). It reads layers and never writes the user's data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtWidgets import QCheckBox, QComboBox, QFormLayout, QGridLayout, QGroupBox, QLabel, QPushButton, QWidget

from napari_m3hl._napari.layers import control as lc
from napari_m3hl._napari.panels.layout import layer_picker
from napari_m3hl._napari.run.request import msg_2d
from napari_m3hl._napari.panels.slots import on_signal
from napari_m3hl._napari.panels.state import PanelState


#: "More volumes": the labels choice of a volume trained on as unlabeled data.
UNLABELED = "unlabeled"


@dataclass
class ExtraRow:
    """One row of "More volumes": an image layer, its tick box and its labels choice."""

    layer: Image
    check: QCheckBox
    labels: QComboBox


class DataPanel(QGroupBox):
    """Data: Image, Labels, New labels layer, More volumes, the info line."""

    def __init__(self, st: PanelState) -> None:
        super().__init__("Data")
        self.st = st
        self._info_source: Labels | None = None
        self._labeled_seen: tuple | None = None  # labeled slices when the info line was written
        form = QFormLayout(self)
        # magicgui layer pickers; their native combo boxes are laid out
        self.image_picker = layer_picker(Image, "The cardiac MR volume (Z, Y, X) or cine (T, Z, Y, X) to segment")
        self.labels_picker = layer_picker(
            Labels, "Your painted labels on the image's grid; only slices with paint are used as labeled")
        self.image_combo: QComboBox = self.image_picker.native
        self.labels_combo: QComboBox = self.labels_picker.native
        self.new_labels_btn = QPushButton("New labels layer")
        self.new_labels_btn.setToolTip(
            "An empty labels layer matched to the image (shape, voxel size, geometry, RV/Myo/LV colours)"
        )
        self.extra_box = QWidget()
        self.extra_box.setToolTip(
            "Other image volumes to train on too (e.g. the other frame of the patient, or other patients): tick one, "
            "and pick its labels layer to add its painted slices, or leave 'unlabeled' to add its slices as "
            "unlabeled data (M³HL learns from them). A fine-tune segments every ticked volume.")
        self.extra_grid = QGridLayout(self.extra_box)
        self.extra_grid.setContentsMargins(0, 0, 0, 0)
        self.extra_rows: list[ExtraRow] = []
        self.info_label = QLabel("no image volume selected")
        self.info_label.setWordWrap(True)
        self.info_label.setObjectName("m3hl_info")
        form.addRow("Image", self.image_combo)
        form.addRow("Labels", self.labels_combo)
        form.addRow("", self.new_labels_btn)
        form.addRow("More volumes", self.extra_box)
        form.addRow(self.info_label)
        for picker, choices in ((self.image_picker, self._image_choices), (self.labels_picker, self._labels_choices)):
            picker.native.blockSignals(True)
            picker.choices = choices  # magicgui fills the combo now, picking its first layer:
            picker.native.setCurrentIndex(-1)  # nothing is picked until refresh_layers chooses
            picker.native.blockSignals(False)
        on_signal(self.image_combo.currentIndexChanged, self._on_image_changed)
        on_signal(self.labels_combo.currentIndexChanged, self._on_labels_changed)
        on_signal(self.new_labels_btn.clicked, self.new_labels_layer)

    def update_buttons(self) -> None:
        """Nothing to enable here: the pickers follow the layers."""

    def set_running(self, running: bool, paused: bool = False) -> None:
        for w in (self.image_combo, self.labels_combo, self.new_labels_btn, self.extra_box):
            w.setEnabled(not running)

    def _layers_of(self, kind: type) -> list:
        return [lay for lay in self.st.viewer.layers if isinstance(lay, kind) and not lc.is_overlay(lay)]

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
        self.st.update_buttons()

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
        """One row per other image volume (ticks and labels choices kept by layer name)."""
        image = self.image_layer()
        kept = {r.layer.name: (r.check.isChecked(), r.labels.currentText()) for r in self.extra_rows}
        for r in self.extra_rows:
            for w in (r.check, r.labels):
                self.extra_grid.removeWidget(w)
                w.deleteLater()
        self.extra_rows = []
        for lay in self._layers_of(Image):
            if lc.same_layer(lay, image) or lay.ndim < 3 or lay.rgb:
                continue
            checked, labels = kept.get(lay.name, (False, UNLABELED))
            check = QCheckBox(lay.name)
            check.setChecked(checked)
            combo = QComboBox()
            combo.addItems([UNLABELED] + [lab.name for lab in self._layers_of(Labels)
                                          if tuple(lab.data.shape) == tuple(lay.data.shape)])
            combo.setCurrentText(labels)
            combo.setToolTip(f"The labels painted on '{lay.name}', or '{UNLABELED}'")
            row = len(self.extra_rows)
            self.extra_grid.addWidget(check, row, 0)
            self.extra_grid.addWidget(combo, row, 1)
            on_signal(check.toggled, self.update_info)
            on_signal(combo.currentIndexChanged, self.update_info)
            self.extra_rows.append(ExtraRow(lay, check, combo))

    def extra_row(self, name: str) -> ExtraRow:
        """The "More volumes" row of the image layer ``name``."""
        for r in self.extra_rows:
            if r.layer.name == name:
                return r
        raise KeyError(name)

    def _ticked(self) -> list[tuple[Image, Labels | None]]:
        """Ticked rows whose layers are still in the viewer: (image, its labels layer or None)."""
        out = []
        for r in self.extra_rows:
            if not r.check.isChecked() or not lc.layer_in(self.st.viewer, r.layer):
                continue
            name = r.labels.currentText()
            lab = self.st.viewer.layers[name] if name != UNLABELED and name in self.st.viewer.layers else None
            out.append((r.layer, lab if isinstance(lab, Labels) else None))
        return out

    def ticked_volumes(self) -> list[tuple[Image, Labels | None]]:
        """The ticked rows in their order: (image, its labels layer, or None: unlabeled)."""
        return self._ticked()

    def tick_volume(self, image: Image, labels: Labels | None) -> bool:
        """Tick the row of ``image`` and pick ``labels`` (None: unlabeled), as
        the user does; False when ``image`` has no row or ``labels`` is not
        offered there (another shape)."""
        rows = [r for r in self.extra_rows if lc.same_layer(r.layer, image)]
        if not rows:
            self._refresh_extra_choices()  # a layer added in this turn
            rows = [r for r in self.extra_rows if lc.same_layer(r.layer, image)]
        if not rows:
            return False
        want = labels.name if labels is not None else UNLABELED
        if rows[0].labels.findText(want) < 0:
            return False
        rows[0].labels.setCurrentText(want)
        rows[0].check.setChecked(True)
        return True

    def image_layer(self) -> Image | None:
        """The picked image layer, if it is still in the viewer."""
        lay = self.image_picker.value if self.image_combo.currentIndex() >= 0 else None
        return lay if isinstance(lay, Image) and lc.layer_in(self.st.viewer, lay) else None

    def labels_layer(self) -> Labels | None:
        """The picked labels layer, if it is still in the viewer."""
        lay = self.labels_picker.value if self.labels_combo.currentIndex() >= 0 else None
        return lay if isinstance(lay, Labels) and lc.layer_in(self.st.viewer, lay) else None

    def extra_layers(self) -> list[Image]:
        """The ticked volumes trained on as unlabeled data."""
        return [img for img, lab in self._ticked() if lab is None]

    def extra_pairs(self) -> list[tuple[Image, Labels]]:
        """The ticked volumes with their labels layers (painted slices: labeled data)."""
        return [(img, lab) for img, lab in self._ticked() if lab is not None]

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
                self.st.versions.watch(lay)

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
        extra, pairs = self.extra_layers(), self.extra_pairs()
        if pairs:
            n = sum(int(lc.labeled_slices(np.asarray(lab.data)).size) for _, lab in pairs)
            text += f"; +{n} painted slices in {len(pairs)} more volume(s)"
        if extra:
            n = sum(int(np.prod(lay.data.shape[:-2])) for lay in extra)
            text += f"; +{n} unlabeled slices from {len(extra)} more volume(s)"
        self.info_label.setText(text)
        if self.st.annotate_panel is not None:  # labeled slices drop out of the suggestion list
            self.st.annotate_panel.refresh_suggestions()

    def new_labels_layer(self) -> Labels | None:
        """Add an empty Labels layer matched to the selected image and select it."""
        image = self.image_layer()
        if image is None:
            self.st.error("No image layer: open a cardiac MR volume first, then create its labels layer.")
            return None
        if image.ndim < 3 or image.rgb:
            self.st.error(msg_2d(image))
            return None
        names = self.st.model_panel.current_class_names()
        layer = lc.new_labels_layer(self.st.viewer, image, names)
        self.labels_combo.setCurrentText(layer.name)
        self.st.viewer.layers.selection.active = layer
        self.st.status(f"Paint {', '.join(names[1:])} on a few slices of '{layer.name}', then press Train.")
        return layer
