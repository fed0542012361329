"""The dock widget's few-slice fine-tune: Train from a start model, the safeguard, Train on.

:class:`FineTune` (a helper of the Run panel, on the shared
:class:`napari_m3hl._napari.panels.state.PanelState`) is the path that
**Train** takes when **Start** is *Fine-tune from file* (by default the
shipped cardiac model): the engine's few-slice loop in a worker
(:mod:`napari_m3hl._napari.run.fewslice`), with the CLI's defaults and the
Model panel's Method, over the picked image (a volume or a cine) and labels
and the volumes ticked under Data ▸ More volumes (with their labels, or
unlabeled). 'M³HL segmentation preview' shows the start model's
segmentation of the first painted volume as soon as it is loaded, then,
while it trains, the segmenting network's at each check (every
``check_every`` iterations and at the end), with its Dice against the
painted slices beside the loss plot; an M³HL fine-tune also shows the
teacher's pseudo-labels in 'M³HL pseudo-labels' (with the teacher's Dice on
the painted slices) and the mixed images in 'M³HL mix preview' / 'M³HL mix
targets'. When it ends, 'M³HL segmentation' shows the picked image's
fine-tuned segmentation, each other volume's goes into 'M³HL segmentation ·
<its name>', and the panel shows the safeguard's verdict; the button under
it switches to the start model's segmentation (and back).
**Train on** after such a run fine-tunes the current model again on the
labels as they are now, and the safeguard still compares with the first
start model's segmentation.

Everything here runs in the GUI thread and only starts workers.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image

from napari_m3hl.errors import M3HLInputError
from napari_m3hl.fewslice.loop import Check, FewSliceResult, PseudoLabels
from napari_m3hl.labels import painting_warnings
from napari_m3hl._napari.layers import control as lc
from napari_m3hl._napari.run import request as rq
from napari_m3hl._napari.run.fewslice import FewSliceRequest, StartSegmentation, job_order
from napari_m3hl.app.plan import StartMode
from napari_m3hl._napari.panels.layout import KEEP_START, USE_TUNED
from napari_m3hl._napari.panels.state import PanelState

SUSPECT_STYLE = "color: #ff8a65; font-weight: bold;"


@dataclass
class FineTuneOutcome:
    """The last few-slice run's result and what 'M³HL segmentation' shows of it
    (``showing``: ``"tuned"`` or ``"start"``); ``labels`` / ``base``: the
    fine-tuned and the start model's segmentation of ``image`` (every frame of a cine)."""

    image: Image
    result: FewSliceResult
    class_names: tuple[str, ...]
    checkpoint: str | None = None  # the fine-tuned model's file
    showing: str = "tuned"
    labels: np.ndarray | None = None
    base: np.ndarray | None = None


class FineTune:
    """Train from a start model, the verdict, the start model's segmentation (on the shared state)."""

    def __init__(self, st: PanelState) -> None:
        self.st = st

    def update_buttons(self) -> None:
        self._update_fewslice_buttons()

    def _make_fewslice_request(self, start: str | Path | None, iterations: int | None,
                               base: np.ndarray | None) -> tuple[FewSliceRequest, rq.RunState]:
        from napari_m3hl.runtime import resolve_device

        data = self.st.data_panel
        image, labels = rq.check_layers(data.image_layer(), data.labels_layer())
        lab = np.asarray(labels.data)
        config = self.st.model_panel.build_config()
        rq.check_labels(labels.name, lab, config)
        if lab.ndim == 3:  # a slice painted in part teaches the rest of it as background: say which
            for text in painting_warnings(lab, tuple(config.class_names)):
                self.st.warn(f"'{labels.name}': {text}")
        pairs = data.extra_pairs()
        for extra_image, extra_labels in pairs:
            rq.check_layers(extra_image, extra_labels)
            rq.check_labels(extra_labels.name, np.asarray(extra_labels.data), config)
        volumes, sources = rq.fewslice_volumes(image, lab, pairs, data.extra_layers())
        options = replace(self.st.model_panel.fewslice_options(iterations),
                          clean=self.st.run_panel.clean_check.isChecked())
        resolve_device(options.device)  # cheap; a clear error for an absent GPU
        if start is None:
            start, _ = rq.start_files(StartMode.FINE_TUNE, self.st.model_panel.start_path.text(), None)
        run_dir, self.st.n_runs = rq.next_run_dir(self.st.runner.out_dir, self.st.n_runs)
        token = self.st.versions.token([image, labels])
        names = tuple(config.class_names)
        req = FewSliceRequest(start=Path(start), volumes=volumes, options=options, class_names=names, out_dir=run_dir,
                              token=token, base=base, autosave=self.st.session_panel.autosave_snapshot(),
                              mix_preview_every_s=self.st.mix_preview_every_s)
        order = job_order(volumes)
        first = volumes[order[0]]  # the first painted volume: the picked image's first painted frame, previewed
        state = rq.RunState(image=image, labels=labels, token=token, preview_frame=first.frame or 0, class_names=names,
                            run_dir=run_dir, batch_size=options.batch_size, fewslice=True, method=options.mode,
                            sources=sources, volume_refs=[(volumes[i].source, volumes[i].frame) for i in order])
        return req, state

    def start_fewslice(self, start: str | Path | None = None, iterations: int | None = None,
                       continued: bool = False) -> bool:
        """Start the few-slice fine-tune of ``start`` (default: the Start file);
        ``continued``: Train on after a few-slice run (the current model, the
        first start model's segmentation for the safeguard)."""
        out = self.st.finetune
        base = out.result.base if continued and out is not None and out.checkpoint == self.st.runner.checkpoint else None
        try:
            req, state = self._make_fewslice_request(start, iterations, base)
        except M3HLInputError as exc:
            self.st.error(str(exc))
            return False
        if continued:
            state.iteration_offset = self.st.model_iteration
        self.st.finetune = self.st.finetune if continued else None
        self.st.run_panel.verdict_label.setText("")
        self._update_fewslice_buttons()
        how = "train on" if continued else "few-slice fine-tune"
        previews = (lc.PREVIEW, lc.PSEUDO_LABELS) if req.options.mode == "m3hl" else (lc.PREVIEW,)
        self.st.run_panel.begin_run(state, how, str(req.start), req.options.iterations, vars(req.options),
                                    previews=previews)
        more = f" and {len(state.sources) - 1} more volume(s)" if len(state.sources) > 1 else ""
        self.st.status(f"Fine-tuning {req.start.name} on the painted slices of '{state.image.name}'{more} "
                     f"({req.options.summary()}; the model's own input size) in {state.run_dir}")
        self.st.runner.start_fewslice(req, connect=self.st.run_panel.run_handlers())
        return True

    def _on_check(self, e: Check) -> None:
        """Show the segmentation of the previewed volume at a check in the segmentation preview layer."""
        self.st.run_view.show_preview(e.labels, e.iteration, None, lc.PREVIEW)

    def _on_pseudo_labels(self, e: PseudoLabels) -> None:
        """The teacher's pseudo-labels of the previewed volume in 'M³HL pseudo-labels', its Dice beside the plot."""
        self.st.run_view.show_preview(e.labels[0], e.iteration, None, lc.PSEUDO_LABELS)
        if np.isfinite(e.painted_dice[0]):
            self.st.run_view.show_teacher_dice(e.painted_dice[0])

    @staticmethod
    def segmentation_of(run: rq.RunState, r: FewSliceResult, source: int, start: bool = False) -> np.ndarray:
        """The fine-tuned (``start``: the start model's) segmentation of the run's
        image layer ``source`` (0: the picked image), its frames stacked for a cine."""
        frames = {frame: (v.base if start else v.labels)
                  for v, (src, frame) in zip(r.volumes, run.volume_refs) if src == source}
        if None in frames:
            return frames[None]
        return np.stack([frames[t] for t in sorted(frames)])

    def _on_fewslice_result(self, r: FewSliceResult) -> None:
        run = self.st.run
        if run is None:
            return
        self.st.finetune = FineTuneOutcome(run.image, r, run.class_names, self.st.runner.checkpoint,
                                           labels=self.segmentation_of(run, r, 0),
                                           base=self.segmentation_of(run, r, 0, start=True))
        self.st.run_panel.verdict_label.setText(f"{r.verdict.message} {r.blend.describe()}")
        self.st.run_panel.verdict_label.setStyleSheet(SUSPECT_STYLE if r.verdict.suspect else "")
        built: list = []  # 'M³HL segmentation' built in one event-loop turn, added in the next

        out = self.st.finetune

        def build() -> None:
            if lc.SEGMENTATION not in self.st.viewer.layers and lc.layer_in(self.st.viewer, run.image):
                built.append(self.st.outputs.segmentation_layer(out.labels, run.image, run.class_names))

        steps = [build, lambda: self._show_fewslice_result(r, run, built)]
        for source, layer in enumerate(run.sources[1:], start=1):  # one layer per event-loop turn
            steps.append(lambda source=source, layer=layer: self._show_other_segmentation(run, r, source, layer))
        self.st.runner.later("show few-slice segmentation", *steps)

    def _show_other_segmentation(self, run: rq.RunState, r: FewSliceResult, source: int, layer: Image) -> None:
        """Another volume's fine-tuned segmentation into 'M³HL segmentation · <its name>' (editable)."""
        if not lc.layer_in(self.st.viewer, layer):
            return
        lc.upsert_labels(self.st.viewer, f"{lc.SEGMENTATION_OF}{layer.name}", self.segmentation_of(run, r, source),
                         run.class_names, like=layer, opacity=0.6)

    def _show_fewslice_result(self, r: FewSliceResult, run: Any, built: list) -> None:
        """The fine-tuned segmentation into 'M³HL segmentation' (``built``: the
        layer, when it had to be made), the verdict's warning, the suggestions."""
        if not lc.layer_in(self.st.viewer, run.image):
            return
        labels = self.st.finetune.labels if self.st.finetune is not None else self.segmentation_of(run, r, 0)
        self.st.outputs.show_segmentation(labels, run.image, run.class_names, built[0] if built else None)
        self.st.run_panel.keep_start_btn.setText(KEEP_START)
        if r.verdict.suspect:
            self.st.warn(f"{r.verdict.message} Press '{KEEP_START}' to keep it.")
        if self.st.auto_suggest:
            self.st.annotate_panel.suggest(run.image)
        self.st.update_buttons()

    def toggle_start_segmentation(self) -> bool:
        """Put the start model's segmentation into 'M³HL segmentation' (or the fine-tuned one back)."""
        out = self.st.finetune
        if out is None or not lc.layer_in(self.st.viewer, out.image):
            self.st.error("No fine-tune to choose from: press Train with Start 'Fine-tune from file' first.")
            return False
        to_start = out.showing == "tuned"
        self.st.outputs.show_segmentation(out.base if to_start else out.labels, out.image, out.class_names)
        out.showing = "start" if to_start else "tuned"
        self.st.run_panel.keep_start_btn.setText(USE_TUNED if to_start else KEEP_START)
        which = "the start model's" if to_start else "the fine-tuned"
        self.st.status(f"'{lc.SEGMENTATION}' shows {which} segmentation; Export writes it with your painted slices.")
        return True

    def _update_fewslice_buttons(self) -> None:
        out = self.st.finetune
        self.st.run_panel.keep_start_btn.setEnabled(out is not None and not self.st.runner.training
                                                    and lc.layer_in(self.st.viewer, out.image))

    def fewslice_event(self, e: Any) -> bool:
        """Draw a few-slice event; False when ``e`` is not one."""
        if isinstance(e, Check):
            self._on_check(e)
        elif isinstance(e, PseudoLabels):
            self._on_pseudo_labels(e)
        elif isinstance(e, StartSegmentation):  # the first preview: the start model's segmentation
            self.st.run_view.show_preview(e.labels, 0, None, lc.PREVIEW)
        elif isinstance(e, FewSliceResult):
            self._on_fewslice_result(e)
        else:
            return False
        return True
