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
from napari_m3hl.io.files import why_not_a_file

def run_inputs(args: argparse.Namespace) -> RunInputs:
    """``m3hl train``'s arguments in the terms :func:`~napari_m3hl.app.plan.plan_run` decides on:
    ``--labels`` is a painted volume fine-tuned from ``--init`` or the shipped model."""
    start = (StartMode.RESUME if args.resume else StartMode.FINE_TUNE if (args.labels or args.init)
             else StartMode.SCRATCH)
    asked = [f"--{k.replace('_', '-')}" for k in PRESET_SETTINGS if getattr(args, k, None) is not None]
    asked += [flag for flag, on in (("--set", args.set), ("--no-hl", args.no_hl), ("--no-mix", args.no_mix),
                                    ("--val", args.val)) if on]
    return RunInputs(start=start, painted_volume=bool(args.labels), preset_settings=tuple(asked))


def check_ablation(args: argparse.Namespace) -> None:
    """Refuse ``--no-hl`` / ``--no-mix`` on ``--data IMAGE --labels PAINTED`` without a
    preset option: they would silently switch from the few-slice fine-tune to a
    preset run from scratch (the few-slice loop has neither mix nor feature loss)."""
    flag = "--no-hl" if args.no_hl else "--no-mix" if args.no_mix else None
    if flag is None or not args.labels or args.resume or args.set or args.val:
        return
    if any(getattr(args, k, None) is not None for k in PRESET_SETTINGS):
        return
    raise M3HLInputError(
        f"{flag} is an ablation of M³HL's preset training; with --data IMAGE --labels PAINTED it would switch from "
        f"the few-slice fine-tune to a preset run from scratch. Drop {flag}, or add --preset acdc_unet2d to train a "
        "preset run on this volume")


#: Files a few-slice run writes into ``--out``.
FEWSLICE_FILES = ("last.pt", "run.json", "segmentation.nii.gz", "prediction.nii.gz")


def _check_device(device: str) -> None:
    """The device exists on this machine (before the start model is read)."""
    from napari_m3hl.runtime import resolve_device

    try:
        resolve_device(device)
    except M3HLInputError as exc:
        raise M3HLInputError(f"--device {device}: {exc}") from None


def _load_painted(args: argparse.Namespace, img) -> np.ndarray:
    """The painted labels on the image's grid (moved there when stored on another grid; refused otherwise)."""
    from napari_m3hl.io.nifti import load_nifti
    from napari_m3hl.io.grid import labels_on_image_grid

    lab = load_nifti(args.labels)
    if lab.data.ndim != 3 or (lab.data.shape != img.data.shape and np.allclose(lab.affine, img.affine, atol=1e-3)):
        raise M3HLInputError(f"--labels {args.labels} has shape {lab.data.shape} but --data {args.data} has "
                             f"{img.data.shape}; paint on a label map of the image's grid")
    painted = np.asarray(lab.data)
    if not np.all(np.isfinite(painted)) or np.any(painted != np.rint(painted)):
        raise M3HLInputError(f"--labels {args.labels} holds non-integer values; a label map holds class numbers")
    painted, moved = labels_on_image_grid(np.rint(painted).astype(np.int64), lab.affine, img.data.shape, img.affine,
                                          f"--labels {args.labels}")
    if moved:
        print(moved, file=sys.stderr)
    return painted


def _input_warnings(args: argparse.Namespace, img, painted: np.ndarray, class_names) -> None:
    """Warnings about the volume's slice axis and shape and the painting (the run goes on)."""
    from napari_m3hl.io.grid import in_plane_warning, slice_axis_warning
    from napari_m3hl.labels import painting_warnings

    texts = [slice_axis_warning(img.data.shape, img.spacing, str(args.data)), in_plane_warning(img.data.shape, str(args.data))]
    texts += [f"warning: --labels {args.labels}: {t}" for t in painting_warnings(painted, tuple(class_names))]
    for text in texts:
        if text:
            print(text, file=sys.stderr)


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
    problem = why_not_a_file(start, "--init" if args.init else "the shipped start model",
                             "give a model file with --init MODEL.pt")
    if problem:
        raise M3HLInputError(problem)
    _check_device(args.device or "auto")
    checks.check_run_inputs(out, FEWSLICE_FILES, {"--data": args.data, "--labels": args.labels})
    img = load_nifti(args.data)
    if img.data.ndim != 3:
        raise M3HLInputError(f"--data {args.data} has {img.data.ndim} dimensions; the few-slice loop fine-tunes on "
                             "one 3D volume (save one frame of a cine series, or give --preset for the data-set path)")
    bad = int(np.size(img.data) - np.count_nonzero(np.isfinite(img.data)))
    if bad:
        raise M3HLInputError(f"--data {args.data} holds {bad} NaN or infinite voxel(s); fix or re-export the image")
    painted = _load_painted(args, img)
    given = {k: getattr(args, k) for k in ("iterations", "lr", "batch_size", "mode", "seed", "device", "start_blend")}
    options = fs.FewSliceOptions(**{k: v for k, v in given.items() if v is not None})
    job = fs.prepare(start, img.data, painted, options)
    _input_warnings(args, img, job.painted, job.config.class_names)
    checks.check_writable_dir(out, "--out")
    work = checks.stage_run(out, args.overwrite, None)  # --overwrite: beside out, swapped in when complete
    print(f"few-slice fine-tune of {start.name} on {len(job.painted_slices)} painted slice(s) "
          f"{job.painted_slices.tolist()} of {job.image.shape[0]} ({job.config.patch_size[0]}x"
          f"{job.config.patch_size[1]} input, the model's own): {options.summary()}", file=sys.stderr)
    t0 = time.perf_counter()
    result = None
    try:
        for e in fs.run(job, out_dir=work):
            if isinstance(e, ev.Progress):
                bar.update(e)
            elif isinstance(e, fs.FewSliceResult):
                result = e
        shown = result.base if result.verdict.suspect else result.labels
        save_nifti_labels(merge_painted(shown, job.painted), work / "segmentation.nii.gz", img.affine, img.header)
        save_nifti_labels(result.labels, work / "prediction.nii.gz", img.affine, img.header)
    except FloatingPointError:  # the loss became NaN/inf: one line, the lr to lower
        bar.close()
        kept, note = checks.abandon_run(work, out)
        print(f"m3hl train: error: the few-slice fine-tune diverged (the loss became NaN or infinite) at learning rate "
              f"{options.lr:g}; lower --lr (e.g. {options.lr / 10:g}). The diverged weights are "
              f"{(kept or out) / 'diverged.pt'}" + (f"; {note}" if note else ""), file=sys.stderr)
        return 1
    except BaseException:  # Ctrl-C, an error: an earlier run replaced with --overwrite stays
        if work != out:
            print(f"m3hl train: --overwrite: {checks.abandon_run(work, out)[1]}", file=sys.stderr)
        raise
    finally:
        bar.close()
    seg, pred = out / "segmentation.nii.gz", out / "prediction.nii.gz"
    manifest = {
        "command": "m3hl " + " ".join(sys.argv[1:]) if sys.argv and "m3hl" in sys.argv[0] else None,
        "kind": "few-slice fine-tune", "start_model": str(start), "image": str(args.data), "labels": str(args.labels),
        "painted_slices": job.painted_slices.tolist(), "options": vars(options), "config": job.config.to_dict(),
        "seconds": round(time.perf_counter() - t0, 1), "iterations_done": result.iterations,
        "checkpoint": result.checkpoint and str(out / Path(result.checkpoint).name),
        "verdict": {"suspect": result.verdict.suspect, "message": result.verdict.message},
        "segmentation": str(seg), "prediction": str(pred),
    }
    checks.write_json(work / "run.json", manifest, "--out")
    if work != out:
        checks.commit_run(work, out)
    print(result.verdict.message, file=sys.stderr)
    print(f"segmentation: {seg} (painted slices as painted"
          + ("; the start model's segmentation, see above" if result.verdict.suspect else "") + f")  prediction: {pred}")
    return 0
