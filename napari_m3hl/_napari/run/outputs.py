"""The dock widget's results: Predict, the segmentation layer, Export, checkpoints.

:class:`Outputs` (a helper of the Run panel, on the shared
:class:`napari_m3hl._napari.panels.state.PanelState`) segments an
image with the latest model, writes 'M³HL segmentation' in place (keeping
the user's edits of it in a layer of their own first), exports it as NIfTI
with the user's painted slices exactly as painted (or alone), and saves and
loads checkpoints; the heavy parts run in workers (:class:`napari_m3hl._napari.run.controller.RunController`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image, Labels

from napari_m3hl._napari.layers import control as lc
from napari_m3hl._napari.run import request as rq
from napari_m3hl._napari.panels.annotate import Suggestions
from napari_m3hl._napari.run.jobs import RunAnalysis
from napari_m3hl._napari.panels.state import PanelState
from napari_m3hl._napari.run.workers import describe_error
from napari_m3hl.app.plan import StartMode
from napari_m3hl.errors import M3HLInputError


class Outputs:
    """Predict / segmentation layer / Export / Save and Load checkpoint (on the shared state)."""

    def __init__(self, st: PanelState) -> None:
        self.st = st

    def _device(self) -> str:
        return self.st.model_panel.device_combo.currentText()

    def predict(self, image: Image | None = None) -> bool:
        """Segment ``image`` (default: the selected one) with the latest model in a worker."""
        image = image or self.st.data_panel.image_layer()
        if image is None:
            self.st.error("No image layer to segment.")
            return False
        if image.rgb or image.ndim < 3:
            self.st.error(rq.msg_2d(image))
            return False
        if not self.st.runner.checkpoint:
            self.st.error("No model yet: train first, or load a checkpoint / model file.")
            return False
        volumes = lc.frames(image.data)  # views: the job converts them
        self.st.run_panel.predict_btn.setEnabled(False)
        self.st.status(f"Segmenting '{image.name}' with the {self.st.run_panel.which_combo.currentText()}…")
        names = self.st.model_panel.current_class_names()

        def done(labels: np.ndarray) -> None:
            self.show_segmentation(labels, image, names)

        self.st.runner.predict(volumes, which=self.st.run_panel.which_combo.currentText(), device=self._device(),
                               clean=self.st.run_panel.clean_check.isChecked(),
                               connect={"returned": done, "errored": self._on_predict_error,
                                        "finished": self.st.update_buttons})
        return True

    def analyse_run(self, image: Image, frame: int = 0) -> bool:
        """After a run: one job segments ``image`` (every frame) and, with
        ``auto_suggest``, scores the slices of ``frame``, from one checkpoint load."""
        volumes = lc.frames(image.data)  # views: the job converts them
        method = self.st.annotate_panel.score_combo.currentText() if self.st.auto_suggest else None
        which, ckpt = self.st.run_panel.which_combo.currentText(), self.st.runner.checkpoint
        names = self.st.model_panel.current_class_names()
        self.st.run_panel.predict_btn.setEnabled(False)
        self.st.annotate_panel.suggest_btn.setEnabled(False)
        self.st.status(f"Segmenting '{image.name}' with the {which}" + (" and ranking its slices…" if method else "…"))

        def done(result: RunAnalysis) -> None:
            self.show_segmentation(result.segmentation, image, names)
            if result.analysis is not None:
                self.st.annotate_panel.on_analysis(
                    Suggestions(image, frame if image.ndim == 4 else None, result.analysis, ckpt))

        self.st.runner.analyse_run(volumes, frame, method, which, device=self._device(),
                                   clean=self.st.run_panel.clean_check.isChecked(), connect={
            "returned": done, "errored": self._on_predict_error, "finished": self.st.update_buttons})
        return True

    @staticmethod
    def segmentation_layer(labels: np.ndarray, image: Image, class_names: tuple[str, ...]) -> Labels:
        """'M³HL segmentation' built (not added): for :meth:`show_segmentation` in a later turn."""
        return lc.class_labels(labels, lc.SEGMENTATION, class_names, like=image, opacity=0.6)

    def show_segmentation(self, labels: np.ndarray, image: Image, class_names: tuple[str, ...],
                          built: Labels | None = None) -> None:
        """Write ``labels`` into 'M³HL segmentation' in place, or add it
        (``built``: that layer from :meth:`segmentation_layer`)."""
        if not lc.layer_in(self.st.viewer, image) or tuple(labels.shape) != tuple(image.data.shape):
            self.st.warn("The image changed while segmenting; press Predict again.")
            return
        self._keep_user_edits()
        seg = lc.upsert_labels(self.st.viewer, lc.SEGMENTATION, labels, class_names, like=image, opacity=0.6,
                               built=built)
        self.st.seg_token = self.st.versions.token([seg])
        counts = ", ".join(f"{n} {int((labels == c).sum())} vox" for c, n in enumerate(class_names) if c)
        self.st.status(f"Segmentation of '{image.name}' in layer '{lc.SEGMENTATION}' (editable): {counts}")
        self.st.update_buttons()
        if self.st.measure_panel is not None:
            self.st.measure_panel.measure(labels, image)

    def _keep_user_edits(self) -> None:
        """Before a new segmentation replaces 'M³HL segmentation' in place, copy
        it to its own layer if the user edited it since it was written."""
        if lc.SEGMENTATION not in self.st.viewer.layers or self.st.seg_token is None:
            return
        seg = self.st.viewer.layers[lc.SEGMENTATION]
        if self.st.versions.token([seg]) == self.st.seg_token:
            return
        with lc.keep_selection(self.st.viewer):
            kept = lc.add_class_labels(self.st.viewer, np.array(seg.data, copy=True), f"{lc.SEGMENTATION} (your edits)",
                                       self.st.model_panel.current_class_names(), like=seg, visible=False)
        self.st.warn(f"Your edits of '{lc.SEGMENTATION}' are kept in layer '{kept.name}'.")

    def _on_predict_error(self, exc: BaseException) -> None:
        self.st.error(describe_error(exc, "Prediction", 8, self.st.runner.checkpoint))

    def export(self, path: str | None = None) -> bool:
        """Write 'M³HL segmentation' as NIfTI with the source affine/header (in a worker)."""
        if lc.SEGMENTATION not in self.st.viewer.layers:
            self.st.error("Nothing to export: train or press Predict first to make 'M³HL segmentation'.")
            return False
        layer = self.st.viewer.layers[lc.SEGMENTATION]
        if path is None:
            src = layer.metadata.get("source_path")
            default = str(self.st.runner.out_dir / "segmentation.nii.gz")
            if src and str(src).lower().endswith((".nii", ".nii.gz")):
                stem = Path(src).name.split(".nii")[0]
                default = str(Path(src).with_name(f"{stem}_m3hl_seg.nii.gz"))
            path = self.st.run_panel.ask_save_path("Export segmentation as NIfTI", default, "NIfTI (*.nii.gz *.nii)")
        if not path:
            return False
        meta = {"name": layer.name, "scale": tuple(layer.scale), "translate": tuple(layer.translate),
                "metadata": dict(layer.metadata)}
        if meta["metadata"].get("affine") is None:
            self.st.warn("The image has no NIfTI geometry; exporting with a diagonal affine from the voxel size.")
        painted, what = self._painted_for_export(layer)
        labels = np.array(layer.data, copy=True)

        def saved(p: str) -> None:
            self.st.status(f"Saved {p} ({what})")
            if self.st.measure_panel is not None:  # the measurements of what was written, beside it
                self.st.measure_panel.export_next_to(p, labels, painted)

        self.st.runner.export(path, labels, meta, painted=painted, connect={
            "returned": saved,
            "errored": lambda exc: self.st.error(describe_error(exc, "Export")),
        })
        self._export_others(path)
        return True

    def _export_others(self, path: str) -> None:
        """Write each other volume's fine-tuned segmentation ('M³HL segmentation · <name>')
        beside ``path`` as ``<path's name>_<name>.nii.gz``, its painted slices as
        painted (its labels under Data ▸ More volumes) unless the prediction alone is asked."""
        stem = Path(path).name.split(".nii")[0]
        alone = self.st.run_panel.prediction_only_check.isChecked()
        pairs = {img.name: lab for img, lab in self.st.data_panel.extra_pairs()}
        for layer in list(self.st.viewer.layers):
            if not layer.name.startswith(lc.SEGMENTATION_OF):
                continue
            name = layer.name[len(lc.SEGMENTATION_OF):]
            labels = pairs.get(name)
            painted = None if alone or labels is None or tuple(labels.data.shape) != tuple(layer.data.shape) \
                else np.array(labels.data, copy=True)
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
            other = str(Path(path).with_name(f"{stem}_{safe}.nii.gz"))
            meta = {"name": layer.name, "scale": tuple(layer.scale), "translate": tuple(layer.translate),
                    "metadata": dict(layer.metadata)}
            self.st.runner.export(other, np.array(layer.data, copy=True), meta, painted=painted, connect={
                "returned": lambda p: self.st.status(f"Saved {p}"),
                "errored": lambda exc: self.st.error(describe_error(exc, "Export")),
            })

    def _painted_for_export(self, seg: Labels) -> tuple[np.ndarray | None, str]:
        """A copy of the user's labels to put over the segmentation (None: export it alone), and its words."""
        if self.st.run_panel.prediction_only_check.isChecked():
            return None, "the network's segmentation only"
        labels = self.st.data_panel.labels_layer()
        if labels is None or tuple(labels.data.shape) != tuple(seg.data.shape):
            self.st.warn(f"No labels layer of the segmentation's shape is chosen under Data ▸ Labels; exporting "
                       f"'{lc.SEGMENTATION}' alone.")
            return None, "the segmentation alone: no painted labels of its shape"
        return np.array(labels.data, copy=True), f"the slices painted in '{labels.name}' as painted"

    def save_checkpoint(self, path: str | None = None) -> bool:
        """Copy the latest checkpoint to a file the user picks (in a worker)."""
        if not self.st.runner.checkpoint:
            self.st.error("No checkpoint yet: train first (Stop also saves one).")
            return False
        default = str(Path.home() / "m3hl_checkpoint.pt")
        path = path or self.st.run_panel.ask_save_path("Save checkpoint", default, "Checkpoints (*.pt)")
        if not path:
            return False
        self.st.runner.save_checkpoint(path, connect={
            "returned": lambda p: self.st.status(f"Checkpoint saved to {p}"),
            "errored": lambda exc: self.st.error(describe_error(exc, "Saving the checkpoint")),
        })
        return True

    def load_checkpoint(self, path: str | None = None) -> bool:
        """Load a checkpoint/model file (checked in a worker) for Predict and fine-tuning."""
        path = path or self.st.model_panel.ask_open_path("Load checkpoint or model file")
        if not path:
            return False
        try:
            cfg = self.st.model_panel.build_config()
        except M3HLInputError as exc:
            self.st.error(str(exc))
            return False
        self.st.runner.load_checkpoint(path, cfg.arch, cfg.num_classes, connect={
            "returned": self._on_checkpoint_loaded,
            "errored": lambda exc: self.st.error(describe_error(exc, "Loading the checkpoint")),
        })
        return True

    def _on_checkpoint_loaded(self, info: dict[str, Any]) -> None:
        self.st.runner.checkpoint = info["path"]
        self.st.model_iteration = int(info["iteration"])
        self.st.model_resumable = bool(info["resumable"])
        self.st.model_is_fewslice = info["kind"] == "fewslice"
        self.st.finetune = None
        self.st.model_panel.start_path.setText(info["path"])
        self.st.model_panel.set_start_mode(StartMode.FINE_TUNE)
        self.st.update_buttons()
        text = (f"Loaded {info['path']} (iteration {info['iteration']}, classes {', '.join(info['class_names'])}): "
                "Predict uses it, Train fine-tunes from it.")
        if info.get("note"):  # a run that did not finish: said, not refused
            self.st.warn(f"{text} {info['note'][0].upper()}{info['note'][1:]}.")
        else:
            self.st.status(text)
