"""``m3hl train --data IMAGE --labels PAINTED [--data … --labels …] [--unlabeled IMAGE …]``: the few-slice loop.

A clinician's volumes with a few painted slices are not a data set: instead of
a preset's 30,000-iteration schedule, ``train`` fine-tunes a start model
(``--init``, by default the shipped 70-patient ACDC model) with the few-slice
defaults of :class:`napari_m3hl.fewslice.loop.FewSliceOptions` through the same
engine path as ``benchmarks/fewslice.py`` (the start model's own input size
and resizing; the safeguard's verdict). Each ``--data IMAGE`` takes the
``--labels PAINTED`` given in the same position; ``--unlabeled IMAGE`` adds
images without paint (M³HL mode learns from them; every input is segmented).
A 4D cine splits into its frames: the frames with paint are labeled volumes,
the others unlabeled. One model is trained over all of them. It writes to
``--out``: ``last.pt``, ``run.json`` and per input file the segmentation (the
painted slices exactly as painted, the network elsewhere, or the start
model's segmentation when the safeguard fires) and the prediction (the
network alone): ``segmentation.nii.gz`` and ``prediction.nii.gz`` for one
input, ``segmentation_<name>.nii.gz`` and ``prediction_<name>.nii.gz`` (names
made unique) for several.

The preset path stays available for a volume: give ``--preset``,
``--variant``, ``--patch-size``, ``--block-size``, ``--set``, ``--no-hl`` or
``--no-mix``.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_m3hl.app.plan import PRESET_SETTINGS, RunInputs, StartMode
from napari_m3hl.cli import checks
from napari_m3hl.errors import M3HLInputError


def run_inputs(args: argparse.Namespace) -> RunInputs:
    """``m3hl train``'s arguments in the terms :func:`~napari_m3hl.app.plan.plan_run` decides on:
    ``--labels`` are painted volumes fine-tuned from ``--init`` or the shipped model."""
    start = (StartMode.RESUME if args.resume else StartMode.FINE_TUNE if (args.labels or args.init)
             else StartMode.SCRATCH)
    asked = [f"--{k.replace('_', '-')}" for k in PRESET_SETTINGS if getattr(args, k, None) is not None]
    asked += [flag for flag, on in (("--set", args.set), ("--no-hl", args.no_hl), ("--no-mix", args.no_mix),
                                    ("--val", args.val)) if on]
    return RunInputs(start=start, painted_volume=bool(args.labels), preset_settings=tuple(asked))


def default_start() -> Path:
    from napari_m3hl.config import MODELS_DIR

    return MODELS_DIR / "acdc70_unet2d.pt"


@dataclass
class InputFile:
    """One ``--data`` (with its ``--labels``) or ``--unlabeled`` file and where
    its frames went: ``frames[t]`` is ``("labeled", k)`` or ``("unlabeled", k)``,
    the index among the job's labeled or unlabeled volumes."""

    option: str
    path: Path
    nifti: object
    labels_path: Path | None = None
    frames: list[tuple[str, int]] = field(default_factory=list)


def _check_image(option: str, path: str, data: np.ndarray) -> None:
    if data.ndim not in (3, 4):
        raise M3HLInputError(f"{option} {path} has {data.ndim} dimensions (shape {data.shape}); the few-slice loop "
                             "takes a 3D volume or a 4D cine (give --preset for the data-set path)")
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise M3HLInputError(f"{option} {path} holds {bad} NaN or infinite voxel(s); fix or re-export the image")


def read_inputs(args: argparse.Namespace) -> tuple[list[InputFile], list, list, list[str]]:
    """The input files of ``args`` (``--data``/``--labels`` pairs in order, then
    ``--unlabeled``), checked, and the job's labeled (image, painted) pairs,
    unlabeled images and volume names, frame by frame."""
    from napari_m3hl.io.nifti import load_nifti

    data, labels, extra = list(args.data or []), list(args.labels or []), list(getattr(args, "unlabeled", None) or [])
    if len(data) != len(labels):
        raise M3HLInputError(f"{len(data)} --data but {len(labels)} --labels: give one --labels PAINTED after each "
                             "--data IMAGE, in the same order (images without paint go in --unlabeled IMAGE)")
    inputs: list[InputFile] = []
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    unlabeled: list[np.ndarray] = []
    names_l: list[str] = []
    names_u: list[str] = []
    for image_path, labels_path in zip(data, labels):
        img, lab = load_nifti(image_path), load_nifti(labels_path)
        _check_image("--data", image_path, img.data)
        if lab.data.shape != img.data.shape:
            raise M3HLInputError(f"--labels {labels_path} has shape {lab.data.shape} but --data {image_path} has "
                                 f"{img.data.shape}; paint on a label map of the image's grid")
        painted = np.asarray(lab.data)
        if not np.all(np.isfinite(painted)) or np.any(painted != np.rint(painted)):
            raise M3HLInputError(f"--labels {labels_path} holds non-integer values; a label map holds class numbers")
        painted = np.rint(painted).astype(np.int64)
        item = InputFile("--data", Path(image_path), img, Path(labels_path))
        frames = [img.data] if img.data.ndim == 3 else list(img.data)
        paints = [painted] if painted.ndim == 3 else list(painted)
        if not any(p.any() for p in paints):
            raise M3HLInputError(f"--labels {labels_path} has no painted slice; paint at least one slice of "
                                 f"{image_path}, or give it as --unlabeled {image_path}")
        for t, (frame, paint) in enumerate(zip(frames, paints)):
            name = Path(image_path).name + ("" if len(frames) == 1 else f" frame {t}")
            if paint.any():
                item.frames.append(("labeled", len(pairs)))
                pairs.append((frame, paint))
                names_l.append(name)
            else:  # a cine's frames without paint: unlabeled data
                item.frames.append(("unlabeled", len(unlabeled)))
                unlabeled.append(frame)
                names_u.append(name)
        inputs.append(item)
    for image_path in extra:
        img = load_nifti(image_path)
        _check_image("--unlabeled", image_path, img.data)
        item = InputFile("--unlabeled", Path(image_path), img)
        frames = [img.data] if img.data.ndim == 3 else list(img.data)
        for t, frame in enumerate(frames):
            item.frames.append(("unlabeled", len(unlabeled)))
            unlabeled.append(frame)
            names_u.append(Path(image_path).name + ("" if len(frames) == 1 else f" frame {t}"))
        inputs.append(item)
    return inputs, pairs, unlabeled, names_l + names_u


def output_names(inputs: list[InputFile]) -> list[tuple[str, str]]:
    """(segmentation, prediction) file names per input: the plain names for one
    input, else ``segmentation_<stem>.nii.gz`` / ``prediction_<stem>.nii.gz``
    with ``_2``, ``_3``, … where stems repeat."""
    from napari_m3hl.io.files import stem

    if len(inputs) == 1:
        return [("segmentation.nii.gz", "prediction.nii.gz")]
    seen: dict[str, int] = {}
    out = []
    for item in inputs:
        base = stem(item.path)
        seen[base] = seen.get(base, 0) + 1
        tag = base if seen[base] == 1 else f"{base}_{seen[base]}"
        out.append((f"segmentation_{tag}.nii.gz", f"prediction_{tag}.nii.gz"))
    return out


def cmd_train_fewslice(args: argparse.Namespace, bar) -> int:
    """Run the few-slice loop for ``m3hl train``; ``bar`` (:class:`napari_m3hl.cli.train.ProgressBar`) draws ``Progress`` events."""
    from napari_m3hl.fewslice import loop as fs
    from napari_m3hl.fewslice.safeguard import merge_painted
    from napari_m3hl.io.nifti import save_nifti_labels
    from napari_m3hl.training import events as ev

    out = Path(args.out)
    start = Path(args.init) if args.init else default_start()
    if not start.is_file():
        raise M3HLInputError(f"start model {start} not found" + ("" if args.init else " (the shipped model is missing "
                             "from this install)") + "; give a model file with --init MODEL.pt")
    inputs, pairs, unlabeled, names = read_inputs(args)
    given = {k: getattr(args, k) for k in ("iterations", "lr", "batch_size", "mode", "seed", "device", "start_blend")}
    options = fs.FewSliceOptions(**{k: v for k, v in given.items() if v is not None})
    job = fs.prepare_volumes(start, pairs, unlabeled, options, names)
    checks.check_writable_dir(out, "--out")
    if args.overwrite:
        checks.clear_run_files(out)
    n_painted = sum(int(v.painted_slices.size) for v in job.volumes)
    n_slices = sum(int(v.image.shape[0]) for v in job.volumes)
    print(f"few-slice fine-tune of {start.name} on {n_painted} painted slice(s) of {n_slices} in {len(job.volumes)} "
          f"volume(s) ({job.config.patch_size[0]}x{job.config.patch_size[1]} input, the model's own): "
          f"{options.summary()}", file=sys.stderr)
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
    written = []
    for item, (seg_name, pred_name) in zip(inputs, output_names(inputs)):
        index = [k if kind == "labeled" else len(pairs) + k for kind, k in item.frames]  # into job.volumes
        per_frame = [result.volumes[i] for i in index]
        shown = [r.base if r.verdict is not None and r.verdict.suspect else r.labels for r in per_frame]
        shown = [s if job.volumes[i].painted is None else merge_painted(s, job.volumes[i].painted)
                 for s, i in zip(shown, index)]
        pred = [r.labels for r in per_frame]
        stack = (lambda vols: vols[0]) if item.nifti.data.ndim == 3 else np.stack
        seg = save_nifti_labels(stack(shown), out / seg_name, item.nifti.affine, item.nifti.header)
        prd = save_nifti_labels(stack(pred), out / pred_name, item.nifti.affine, item.nifti.header)
        written.append({
            "option": item.option, "image": str(item.path),
            "labels": str(item.labels_path) if item.labels_path else None,
            "painted_slices": [job.volumes[i].painted_slices.tolist() for i in index],
            "verdicts": [None if r.verdict is None else {"suspect": r.verdict.suspect, "message": r.verdict.message}
                         for r in per_frame],
            "segmentation": str(seg), "prediction": str(prd)})
    first = written[0]
    manifest = {
        "command": "m3hl " + " ".join(sys.argv[1:]) if sys.argv and "m3hl" in sys.argv[0] else None,
        "kind": "few-slice fine-tune", "start_model": str(start), "image": first["image"], "labels": first["labels"],
        "painted_slices": job.painted_slices.tolist(), "options": vars(options), "config": job.config.to_dict(),
        "seconds": round(time.perf_counter() - t0, 1), "iterations_done": result.iterations,
        "checkpoint": result.checkpoint, "verdict": {"suspect": result.verdict.suspect, "message": result.verdict.message},
        "segmentation": first["segmentation"], "prediction": first["prediction"], "inputs": written,
    }
    checks.write_json(out / "run.json", manifest, "--out")
    for r in result.volumes:
        if r.verdict is not None:
            print(f"{r.name}: {r.verdict.message}" if len(result.volumes) > 1 else r.verdict.message, file=sys.stderr)
    for w in written:
        print(f"segmentation: {w['segmentation']} (painted slices as painted)  prediction: {w['prediction']}")
    return 0
