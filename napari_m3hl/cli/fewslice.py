"""``m3hl train --data IMAGE --labels PAINTED``: the few-slice loop on one volume.

A clinician's volume with a few painted slices is not a data set: instead of a
preset's 30,000-iteration schedule, ``train`` fine-tunes a start model (``--init``,
by default the shipped 70-patient ACDC model) with the few-slice defaults of
:class:`napari_m3hl.fewslice.loop.FewSliceOptions` through the same engine path as
``benchmarks/fewslice.py`` (the start model's own input size
and resizing; the safeguard's verdict). It writes to ``--out``: ``last.pt``,
``segmentation.nii.gz`` (the painted slices exactly as painted, the network
elsewhere, or the start model's segmentation when the safeguard fires),
``prediction.nii.gz`` (the network alone) and ``run.json``.

The preset path stays available for a volume: give ``--preset``,
``--variant``, ``--patch-size``, ``--block-size``, ``--set``, ``--no-hl`` or
``--no-mix``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from napari_m3hl.app.plan import PRESET_SETTINGS, RunInputs, StartMode
from napari_m3hl.cli import checks
from napari_m3hl.errors import M3HLInputError

def run_inputs(args: argparse.Namespace) -> RunInputs:
    """``m3hl train``'s arguments in the terms :func:`~napari_m3hl.app.plan.plan_run` decides on:
    ``--labels`` is a painted volume fine-tuned from ``--init`` or the shipped model."""
    start = (StartMode.RESUME if args.resume else StartMode.FINE_TUNE if (args.labels or args.init)
             else StartMode.SCRATCH)
    asked = [f"--{k.replace('_', '-')}" for k in PRESET_SETTINGS if getattr(args, k, None) is not None]
    asked += [flag for flag, on in (("--set", args.set), ("--no-hl", args.no_hl), ("--no-mix", args.no_mix),
                                    ("--val", args.val)) if on]
    return RunInputs(start=start, painted_volume=bool(args.labels), preset_settings=tuple(asked))


def default_start() -> Path:
    from napari_m3hl.config import MODELS_DIR

    return MODELS_DIR / "acdc70_unet2d.pt"


def cmd_train_fewslice(args: argparse.Namespace, bar) -> int:
    """Run the few-slice loop for ``m3hl train``; ``bar`` (:class:`napari_m3hl.cli.train.ProgressBar`) draws ``Progress`` events."""
    from napari_m3hl.training import events as ev
    from napari_m3hl.fewslice import loop as fs
    from napari_m3hl.io.nifti import load_nifti, save_nifti_labels
    from napari_m3hl.fewslice.safeguard import merge_painted

    out = Path(args.out)
    start = Path(args.init) if args.init else default_start()
    if not start.is_file():
        raise M3HLInputError(f"start model {start} not found" + ("" if args.init else " (the shipped model is missing "
                             "from this install)") + "; give a model file with --init MODEL.pt")
    img, lab = load_nifti(args.data), load_nifti(args.labels)
    if img.data.ndim != 3:
        raise M3HLInputError(f"--data {args.data} has {img.data.ndim} dimensions; the few-slice loop fine-tunes on "
                             "one 3D volume (save one frame of a cine series, or give --preset for the data-set path)")
    bad = int(np.size(img.data) - np.count_nonzero(np.isfinite(img.data)))
    if bad:
        raise M3HLInputError(f"--data {args.data} holds {bad} NaN or infinite voxel(s); fix or re-export the image")
    if lab.data.shape != img.data.shape:
        raise M3HLInputError(f"--labels {args.labels} has shape {lab.data.shape} but --data {args.data} has "
                             f"{img.data.shape}; paint on a label map of the image's grid")
    painted = np.asarray(lab.data)
    if not np.all(np.isfinite(painted)) or np.any(painted != np.rint(painted)):
        raise M3HLInputError(f"--labels {args.labels} holds non-integer values; a label map holds class numbers")
    given = {k: getattr(args, k) for k in ("iterations", "lr", "batch_size", "mode", "seed", "device", "start_blend")}
    options = fs.FewSliceOptions(**{k: v for k, v in given.items() if v is not None})
    job = fs.prepare(start, img.data, np.rint(painted).astype(np.int64), options)
    checks.check_writable_dir(out, "--out")
    if args.overwrite:
        checks.clear_run_files(out)
    print(f"few-slice fine-tune of {start.name} on {len(job.painted_slices)} painted slice(s) "
          f"{job.painted_slices.tolist()} of {job.image.shape[0]} ({job.config.patch_size[0]}x"
          f"{job.config.patch_size[1]} input, the model's own): {options.summary()}", file=sys.stderr)
    t0 = time.perf_counter()
    result = None
    try:
        for e in fs.run(job, out_dir=out):
            if isinstance(e, ev.Progress):
                bar.update(e)
            elif isinstance(e, fs.FewSliceResult):
                result = e
    finally:
        bar.close()
    shown = result.base if result.verdict.suspect else result.labels
    seg = save_nifti_labels(merge_painted(shown, job.painted), out / "segmentation.nii.gz", img.affine, img.header)
    pred = save_nifti_labels(result.labels, out / "prediction.nii.gz", img.affine, img.header)
    manifest = {
        "command": "m3hl " + " ".join(sys.argv[1:]) if sys.argv and "m3hl" in sys.argv[0] else None,
        "kind": "few-slice fine-tune", "start_model": str(start), "image": str(args.data), "labels": str(args.labels),
        "painted_slices": job.painted_slices.tolist(), "options": vars(options), "config": job.config.to_dict(),
        "seconds": round(time.perf_counter() - t0, 1), "iterations_done": result.iterations,
        "checkpoint": result.checkpoint, "verdict": {"suspect": result.verdict.suspect, "message": result.verdict.message},
        "segmentation": str(seg), "prediction": str(pred),
    }
    checks.write_json(out / "run.json", manifest, "--out")
    print(result.verdict.message, file=sys.stderr)
    print(f"segmentation: {seg} (painted slices as painted"
          + ("; the start model's segmentation, see above" if result.verdict.suspect else "") + f")  prediction: {pred}")
    return 0
