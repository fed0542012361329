"""One decision (napari_m3hl.app.plan): few-slice loop or preset run. The
command line and the widget's Model panel, given the same inputs, plan the
same run."""
from __future__ import annotations

import pytest

from napari_m3hl.app.plan import RunInputs, StartMode, plan_run
from napari_m3hl.cli.fewslice import run_inputs
from napari_m3hl.cli.parser import build_parser


@pytest.mark.parametrize("inputs, kind", [
    (RunInputs(StartMode.FINE_TUNE, painted_volume=True), "fewslice"),
    (RunInputs(StartMode.SCRATCH, painted_volume=True), "preset"),
    (RunInputs(StartMode.RESUME, painted_volume=True), "preset"),
    (RunInputs(StartMode.FINE_TUNE, painted_volume=False), "preset"),
    (RunInputs(StartMode.FINE_TUNE, painted_volume=True, preset_settings=("patch_size",)), "preset"),
])
def test_plan_run(inputs, kind):
    plan = plan_run(inputs)
    assert plan.kind == kind and plan.fewslice == (kind == "fewslice") and plan.reason


def _cli_plan(*argv: str):
    args = build_parser().parse_args(["train", *argv])
    return plan_run(run_inputs(args))


def test_cli_plans():
    assert _cli_plan("--data", "a.nii.gz", "--labels", "p.nii.gz", "--out", "r").fewslice
    assert _cli_plan("--data", "a.nii.gz", "--labels", "p.nii.gz", "--init", "m.pt", "--out", "r").fewslice
    slow = _cli_plan("--data", "a.nii.gz", "--labels", "p.nii.gz", "--patch-size", "128,128", "--out", "r")
    assert not slow.fewslice and "--patch-size" in slow.reason
    assert not _cli_plan("--data", "a.nii.gz", "--labels", "p.nii.gz", "--no-hl", "--out", "r").fewslice
    assert not _cli_plan("--data", "phantom", "--out", "r").fewslice
    assert not _cli_plan("--data", "phantom", "--init", "m.pt", "--out", "r").fewslice


def test_the_panel_and_the_cli_plan_the_same_run(make_widget, qtbot):
    """The same inputs typed on the command line and set in the panel give the same plan."""
    viewer, w = make_widget()
    model = w.model_panel
    cases = [
        # (panel settings, the command line's words for the same)
        (dict(start=StartMode.FINE_TUNE), ["--init", "m.pt"]),
        (dict(start=StartMode.RESUME), ["--resume", "r/last.pt"]),
        (dict(start=StartMode.FINE_TUNE, patch=(128, 128)), ["--init", "m.pt", "--patch-size", "128,128"]),
        (dict(start=StartMode.FINE_TUNE, variant="paper"), ["--init", "m.pt", "--variant", "paper"]),
    ]
    for panel, words in cases:
        model.set_start_mode(panel["start"])
        model.variant_combo.setCurrentText(panel.get("variant", "reference"))
        if "patch" in panel:
            model.show_settings({"patch_size": panel["patch"]})
        cli = _cli_plan("--data", "a.nii.gz", "--labels", "p.nii.gz", "--out", "r", *words)
        assert model.plan().kind == cli.kind, (panel, words)
        model.variant_combo.setCurrentText("reference")  # back to the panel's defaults for the next case
    assert model.plan().fewslice  # the variant set back refilled the form from the preset: the defaults again
