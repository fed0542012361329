"""One decision: does Train run the few-slice fine-tune or a preset's run?

The command line (``m3hl train``) and the widget's Train button describe what
the user gave in the same plain terms (:class:`RunInputs`) and take the answer
from :func:`plan_run`, so the two cannot disagree. The few-slice loop
(:mod:`napari_m3hl.fewslice.loop`) runs when the user starts from a model
file, gives painted volumes (any number, cines included, with or without
unlabeled ones) and asks for nothing only a preset's run uses;
otherwise the preset's schedule runs (:mod:`napari_m3hl.training.trainer`).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal


class StartMode(str, enum.Enum):
    """Where the weights of a run come from; the value is the widget's label."""

    SCRATCH = "From scratch"
    FINE_TUNE = "Fine-tune from file"
    RESUME = "Resume checkpoint"


#: Settings that only a preset's run uses (the few-slice loop keeps the start
#: model's input size and its own schedule): asking for one plans a preset run.
PRESET_SETTINGS = ("preset", "variant", "patch_size", "block_size", "mask_ratio", "lam", "alpha")


@dataclass(frozen=True)
class RunInputs:
    """What the user gave, however they gave it.

    ``start``: where the weights come from; ``painted_volume``: the labeled
    input is images with painted label maps (3D volumes or 4D cines, not a
    data set or an RGB image); ``preset_settings``: the names of :data:`PRESET_SETTINGS` (or other
    preset-only requests such as ``--set``, ``--val``, ``--no-hl``) the user
    set explicitly.
    """

    start: StartMode
    painted_volume: bool
    preset_settings: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunPlan:
    """The answer: ``kind`` and, in one sentence, why."""

    kind: Literal["fewslice", "preset"]
    reason: str

    @property
    def fewslice(self) -> bool:
        return self.kind == "fewslice"


def plan_run(inputs: RunInputs) -> RunPlan:
    """The run that Train / ``m3hl train`` starts for ``inputs``."""
    if inputs.start is not StartMode.FINE_TUNE:
        return RunPlan("preset", f"Start is '{inputs.start.value}': the preset's schedule trains the network")
    if not inputs.painted_volume:
        return RunPlan("preset", "the labeled input is not painted volumes: the preset's schedule fine-tunes")
    if inputs.preset_settings:
        asked = ", ".join(inputs.preset_settings)
        return RunPlan("preset", f"{asked} belong to a preset's run: the preset's schedule fine-tunes")
    return RunPlan("fewslice", "painted volumes fine-tuned from a model file: the few-slice loop")
