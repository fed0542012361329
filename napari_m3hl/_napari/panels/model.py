"""The Model panel of the dock widget: preset, start, device, Advanced.

:class:`ModelPanel` holds the preset, the Start mode (from scratch, fine-tune
the shipped cardiac model or a file, resume a checkpoint), the device and the
collapsible Advanced section (the variant, and :class:`napari_m3hl._napari.panels.advanced.AdvancedForm`:
one editor per declared :class:`~napari_m3hl.config.TrainConfig` field). It
turns them into the run's config (:meth:`ModelPanel.build_config`) or the
few-slice options, with the panel's defaults for one volume.
"""
from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import QComboBox, QFileDialog, QFormLayout, QGroupBox, QLineEdit, QPushButton, QVBoxLayout, QWidget
from superqt import QCollapsible

from napari_m3hl.config import TrainConfig, list_presets, load_preset, read_preset
from napari_m3hl.errors import M3HLInputError
from napari_m3hl.fewslice.loop import FewSliceOptions
from napari_m3hl.labels import ACDC_CLASSES
from napari_m3hl._napari.panels.advanced import AdvancedForm
from napari_m3hl._napari.run.fewslice import fewslice_options
from napari_m3hl.app.plan import PRESET_SETTINGS, RunInputs, RunPlan, StartMode, plan_run
from napari_m3hl._napari.panels.layout import DEVICES, START_MODES, VARIANTS, default_cardiac_model, row
from napari_m3hl._napari.panels.slots import on_signal
from napari_m3hl._napari.panels.state import PanelState

#: Defaults for interactive training on one volume (the presets are for cohorts,
#: 30 000 iterations). Measured on the 10-slice phantom with 2 painted slices,
#: 300 iterations, 256², batch 8 (student / EMA teacher Dice RV, Myo, LV):
#: reference variant 0.85 0.92 0.95 / 0.13 0.82 0.71; paper variant at lr 0.01
#: 0.96 0.69 0.95 / 0 0 0 (its eval-mode teacher, with BatchNorm statistics
#: averaged from the student's, labels everything background after so few
#: steps, so its pseudo-label preview stays empty); paper at its lr 0.001
#: 0.05 0.84 0.06. Hence: reference variant, lr 0.01.
GUI_ITERATIONS = 300
GUI_CPU_BATCH = 8
GUI_LR = 0.01
GUI_VARIANT = "reference"
CHECKPOINT_EVERY = 100
#: The preset the panel starts with when the user picks none (the shipped start model's).
DEFAULT_PRESET = "acdc_unet2d"
#: The fine-tune's Method choices and their FewSliceOptions.mode.
METHODS = ("supervised", "M³HL")
METHOD_MODES = ("supervised", "m3hl")


def presets_2d() -> list[str]:
    """Presets with a 2D patch (the widget trains slice-wise 2D models)."""
    out = []
    for name in list_presets():
        try:
            settings = dict(read_preset(name).get("settings", {}))
        except M3HLInputError:
            continue
        if len(settings.get("patch_size", (0, 0))) == 2:
            out.append(name)
    return out


class ModelPanel(QGroupBox):
    """Model: Preset, Start (+ file), Device, Advanced (variant and settings)."""

    def __init__(self, st: PanelState) -> None:
        super().__init__("Model")
        self.st = st
        self._class_names: dict[str, tuple[str, ...]] = {}  # preset name → its class names
        lay = QVBoxLayout(self)
        form = QFormLayout()
        self.preset_combo = QComboBox()
        self.preset_combo.setToolTip("Training preset (models/*.yaml); the 2D ACDC U-Net fits cardiac short-axis MR")
        self.start_combo = QComboBox()
        self.start_combo.addItems(START_MODES)
        self.start_combo.setToolTip(
            "From scratch: random weights. Fine-tune: start from a checkpoint's or model file's weights. "
            "Resume: continue a stopped run (weights, optimiser, iteration)."
        )
        self.start_path = QLineEdit()
        self.start_path.setPlaceholderText("checkpoint or model file (.pt)")
        default_model = default_cardiac_model()
        if default_model is not None:  # cardiac MR: fine-tune the shipped 70-patient ACDC model by default
            self.set_start_mode(StartMode.FINE_TUNE)
            self.start_path.setText(str(default_model))
        self.browse_btn = QPushButton("Browse…")
        self.method_combo = QComboBox()
        self.method_combo.addItems(METHODS)
        self.method_combo.setCurrentIndex(METHOD_MODES.index(FewSliceOptions().mode))
        self.method_combo.setToolTip(
            "How a fine-tune learns. supervised: from your painted slices only (the default: it measured better). "
            "M³HL: also from the unpainted slices and the unlabeled volumes, taught by the start model as a "
            "teacher through mixed images; slower, and shows the teacher's pseudo-labels and the mixed images.")
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        self.device_combo.setToolTip("auto: CUDA GPU, then Apple MPS, then CPU")
        form.addRow("Preset", self.preset_combo)
        form.addRow("Start", self.start_combo)
        form.addRow("", row(self.start_path, self.browse_btn))
        form.addRow("Method", self.method_combo)
        form.addRow("Device", self.device_combo)
        lay.addLayout(form)

        self.advanced = QCollapsible("Advanced")
        adv = QWidget()
        aform = QFormLayout(adv)
        aform.setContentsMargins(0, 0, 0, 0)
        self.variant_combo = QComboBox()
        self.variant_combo.addItems(VARIANTS)
        self.variant_combo.setToolTip("paper: settings of the M³HL paper; reference: the authors' released code; "
                                      "fast: the paper's method with a supervised warm start and poly decay "
                                      "(the ACDC preset's default, measured on ACDC: docs/benchmarks.md)")
        self.advanced_form = AdvancedForm()
        aform.addRow("Variant", self.variant_combo)
        aform.addRow(self.advanced_form)
        self.advanced.addWidget(adv)
        lay.addWidget(self.advanced)

        self.preset_combo.addItems(presets_2d())
        self.variant_combo.setCurrentText(GUI_VARIANT)
        on_signal(self.preset_combo.currentIndexChanged, self._apply_preset)
        on_signal(self.variant_combo.currentIndexChanged, self._apply_preset)
        on_signal(self.device_combo.currentIndexChanged, self._apply_device_defaults)
        on_signal(self.start_combo.currentIndexChanged, self.st.update_buttons)
        on_signal(self.start_combo.currentIndexChanged, self._apply_start_defaults)
        on_signal(self.browse_btn.clicked, self._browse_start_file)
        self._apply_preset()

    def update_buttons(self) -> None:
        needs_file = self.start_mode() is not StartMode.SCRATCH
        self.start_path.setVisible(needs_file)
        self.browse_btn.setVisible(needs_file)
        self.method_combo.setEnabled(self.start_mode() is StartMode.FINE_TUNE and not self.st.runner.training)

    def set_running(self, running: bool, paused: bool = False) -> None:
        for w in (self.preset_combo, self.start_combo, self.start_path, self.browse_btn, self.device_combo,
                  self.method_combo, self.advanced):
            w.setEnabled(not running)

    def _device_is_cpu(self) -> bool:
        from napari_m3hl.runtime import resolve_device

        try:
            return resolve_device(self.device_combo.currentText()).type == "cpu"
        except M3HLInputError:
            return True

    def _apply_preset(self) -> None:
        """Fill the advanced section from the preset, with GUI defaults for one volume."""
        name = self.preset_combo.currentText()
        if not name:
            return
        try:
            cfg = load_preset(name, self.variant_combo.currentText())
        except M3HLInputError as exc:
            self.st.error(str(exc))
            return
        self.show_settings(cfg.to_dict())
        self._apply_start_defaults()

    def _apply_start_defaults(self) -> None:
        """Iterations, batch, learning rate and EMA decay of the Start mode: the
        few-slice defaults (``FewSliceOptions``, as ``m3hl train --labels``) for
        *Fine-tune from file*, the panel's M³HL defaults otherwise."""
        if self.start_mode() is StartMode.FINE_TUNE:
            fs = FewSliceOptions()
            self.show_settings({"iterations": fs.iterations, "batch_size": fs.batch_size, "lr": fs.lr,
                                "ema_decay": fs.ema_decay})
            return
        name = self.preset_combo.currentText()
        if not name:
            return
        try:
            cfg = load_preset(name, self.variant_combo.currentText())
        except M3HLInputError:
            return
        self.show_settings({"iterations": GUI_ITERATIONS, "lr": max(cfg.lr, GUI_LR), "ema_decay": cfg.ema_decay,
                            "batch_size": GUI_CPU_BATCH if self._device_is_cpu() else cfg.batch_size})

    def _apply_device_defaults(self) -> None:
        batch = self.advanced_form.editor("batch_size")
        if self._device_is_cpu() and batch.value() > GUI_CPU_BATCH:
            batch.setValue(GUI_CPU_BATCH)

    def build_config(self) -> TrainConfig:
        """The run's config: preset + variant + advanced settings + ``config_overrides``."""
        overrides = {
            **self.settings(),
            "device": self.device_combo.currentText(),
            "checkpoint_every": CHECKPOINT_EVERY,
            "val_every": 0,
            **self.st.config_overrides,
        }
        return load_preset(self.preset_combo.currentText() or "acdc_unet2d", self.variant_combo.currentText(),
                           **overrides)

    def _browse_start_file(self) -> None:
        path = self.ask_open_path("Checkpoint or model file")
        if path:
            self.start_path.setText(path)
            if self.start_mode() is StartMode.SCRATCH:
                self.set_start_mode(StartMode.FINE_TUNE)

    def ask_open_path(self, caption: str) -> str:
        from napari_m3hl.config import MODELS_DIR

        # start in the run folder once it has checkpoints, else among the shipped models
        start = self.st.runner.out_dir if self.st.runner.out_dir.is_dir() else MODELS_DIR
        path, _ = QFileDialog.getOpenFileName(self, caption, str(start), "Checkpoints (*.pt *.pth);;All files (*)")
        return path

    def current_class_names(self) -> tuple[str, ...]:
        """The preset's class names (ACDC's when it cannot be read); parsed once
        per preset (the YAML parse costs the GUI thread ~18 ms per call)."""
        name = self.preset_combo.currentText() or "acdc_unet2d"
        if name not in self._class_names:
            try:
                self._class_names[name] = tuple(load_preset(name).class_names)
            except M3HLInputError:
                return tuple(ACDC_CLASSES)
        return self._class_names[name]

    def settings(self) -> dict[str, Any]:
        """TrainConfig overrides from the advanced section."""
        return self.advanced_form.values()

    def show_settings(self, values: dict[str, Any]) -> None:
        """Fill the advanced section (TrainConfig field names; others are skipped)."""
        self.advanced_form.set_values(values)

    def start_mode(self) -> StartMode:
        return StartMode(self.start_combo.currentText())

    def set_start_mode(self, mode: StartMode) -> None:
        self.start_combo.setCurrentIndex(START_MODES.index(mode.value))

    def preset_settings(self) -> tuple[str, ...]:
        """The preset-only settings (:data:`~napari_m3hl.app.plan.PRESET_SETTINGS`) the
        user changed from what the panel filled in: another preset or variant, or
        an Advanced value that differs from the preset's."""
        name = self.preset_combo.currentText() or DEFAULT_PRESET
        changed = ["preset"] if name != DEFAULT_PRESET else []
        if self.variant_combo.currentText() != GUI_VARIANT:
            changed.append("variant")
        try:
            preset = load_preset(name, self.variant_combo.currentText()).to_dict()
        except M3HLInputError:
            return tuple(changed)
        values = self.settings()
        changed += [k for k in PRESET_SETTINGS if k in values and k in preset
                    and tuple(_flat(values[k])) != tuple(_flat(preset[k]))]
        return tuple(changed)

    def run_inputs(self) -> RunInputs:
        """What the user gave, in the terms :func:`~napari_m3hl.app.plan.plan_run` decides on."""
        image = self.st.data_panel.image_layer()
        painted_volume = image is not None and image.ndim in (3, 4) and not image.rgb
        return RunInputs(start=self.start_mode(), painted_volume=painted_volume,
                         preset_settings=self.preset_settings())

    def plan(self) -> RunPlan:
        """The run Train starts: the few-slice fine-tune or the preset's run."""
        return plan_run(self.run_inputs())

    def method(self) -> str:
        """The fine-tune's :attr:`~napari_m3hl.fewslice.loop.FewSliceOptions.mode` chosen under Method."""
        return METHOD_MODES[self.method_combo.currentIndex()]

    def fewslice_options(self, iterations: int | None = None):
        """The run's :class:`~napari_m3hl.fewslice.loop.FewSliceOptions` (the CLI's
        defaults, the Advanced form's iterations / batch / lr / EMA decay, the
        device, ``config_overrides``)."""
        opts = fewslice_options(self.settings(), self.device_combo.currentText(), self.st.config_overrides,
                                self.method())
        if iterations is not None:
            opts.iterations = int(iterations)
        return opts


def _flat(value: Any) -> list[float]:
    """A setting as a list of numbers (a 2D size is a pair), for comparing values."""
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]
