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
from napari_m3hl.io.files import why_not_a_file


def run_inputs(args: argparse.Namespace) -> RunInputs:
    """``m3hl train``'s arguments in the terms :func:`~napari_m3hl.app.plan.plan_run` decides on:
    ``--labels`` are painted volumes fine-tuned from ``--init`` or the shipped model."""
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


def _load_painted(image_path: str, labels_path: str, img) -> np.ndarray:
    """The painted labels of ``--data image_path`` on the image's grid, as int64:
    a 3D label map stored on another grid is moved onto the image's when the
    world geometry allows (a message says so) and refused otherwise; a cine's
    labels must share its shape."""
    from napari_m3hl.io.grid import labels_on_image_grid
    from napari_m3hl.io.nifti import load_nifti

    lab = load_nifti(labels_path)
    same_grid = np.allclose(lab.affine, img.affine, atol=1e-3)
    if lab.data.ndim != img.data.ndim or (lab.data.shape != img.data.shape and (same_grid or img.data.ndim == 4)):
        raise M3HLInputError(f"--labels {labels_path} has shape {lab.data.shape} but --data {image_path} has "
                             f"{img.data.shape}; paint on a label map of the image's grid")
    painted = np.asarray(lab.data)
    if not np.all(np.isfinite(painted)) or np.any(painted != np.rint(painted)):
        raise M3HLInputError(f"--labels {labels_path} holds non-integer values; a label map holds class numbers")
    painted = np.rint(painted).astype(np.int64)
    if img.data.ndim == 4:
        return painted
    painted, moved = labels_on_image_grid(painted, lab.affine, img.data.shape, img.affine, f"--labels {labels_path}")
    if moved:
        print(moved, file=sys.stderr)
    return painted


def _input_warnings(image_path: str, labels_path: str, img, painted: np.ndarray, class_names) -> None:
    """Warnings about a volume's slice axis and shape and its painting (the run goes on)."""
    from napari_m3hl.io.grid import in_plane_warning, slice_axis_warning
    from napari_m3hl.labels import painting_warnings

    shape = img.data.shape[-3:]
    spacing = tuple(img.spacing)[-3:]
    texts = [slice_axis_warning(shape, spacing, str(image_path)), in_plane_warning(shape, str(image_path))]
    for frame in ([painted] if painted.ndim == 3 else list(painted)):
        texts += [f"warning: --labels {labels_path}: {t}" for t in painting_warnings(frame, tuple(class_names))]
    for text in texts:
        if text:
            print(text, file=sys.stderr)


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
        img = load_nifti(image_path)
        _check_image("--data", image_path, img.data)
        painted = _load_painted(image_path, labels_path, img)
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
    problem = why_not_a_file(start, "--init" if args.init else "the shipped start model",
                             "give a model file with --init MODEL.pt")
    if problem:
        raise M3HLInputError(problem)
    _check_device(args.device or "auto")
    inputs, pairs, unlabeled, names = read_inputs(args)
    planned = [n for pair in output_names(inputs) for n in pair]
    checks.check_run_inputs(out, [*FEWSLICE_FILES, *planned],
                            {**{f"--data {p}": p for p in args.data or []}, **{f"--labels {p}": p for p in args.labels or []},
                             **{f"--unlabeled {p}": p for p in getattr(args, "unlabeled", None) or []}})
    given = {k: getattr(args, k, None) for k in ("iterations", "lr", "batch_size", "mode", "seed", "device",
                                                "start_blend", "start_blend_untrusted", "start_blend_stable", "clean")}
    options = fs.FewSliceOptions(**{k: v for k, v in given.items() if v is not None})
    job = fs.prepare_volumes(start, pairs, unlabeled, options, names)
    for item in inputs:
        if item.labels_path is not None:
            k = next(k for kind, k in item.frames if kind == "labeled")
            painted = np.stack([job.volumes[i].painted for kind, i in item.frames if kind == "labeled"]) \
                if item.nifti.data.ndim == 4 else job.volumes[k].painted
            _input_warnings(str(item.path), str(item.labels_path), item.nifti, painted, job.config.class_names)
    checks.check_writable_dir(out, "--out")
    work = checks.stage_run(out, args.overwrite, None)  # --overwrite: beside out, swapped in when complete
    n_painted = sum(int(v.painted_slices.size) for v in job.volumes)
    n_slices = sum(int(v.image.shape[0]) for v in job.volumes)
    print(f"few-slice fine-tune of {start.name} on {n_painted} painted slice(s) of {n_slices} in {len(job.volumes)} "
          f"volume(s) ({job.config.patch_size[0]}x{job.config.patch_size[1]} input, the model's own): "
          f"{options.summary()}. {job.blend.describe()}" +
          (" It settles at each check on how much the fine-tuned network still changes."
           if 0 < job.blend.weight < options.start_blend and options.start_blend_stable != options.start_blend_untrusted
           else ""), file=sys.stderr)
    t0 = time.perf_counter()
    result = None
    try:
        for e in fs.run(job, out_dir=work):
            if isinstance(e, ev.Progress):
                bar.update(e)
            elif isinstance(e, fs.FewSliceResult):
                result = e
        written = []
        for item, (seg_name, pred_name) in zip(inputs, output_names(inputs)):
            index = [k if kind == "labeled" else len(pairs) + k for kind, k in item.frames]  # into job.volumes
            per_frame = [result.volumes[i] for i in index]
            shown = [r.base if r.verdict is not None and r.verdict.suspect else r.labels for r in per_frame]
            shown = [s if job.volumes[i].painted is None else merge_painted(s, job.volumes[i].painted)
                     for s, i in zip(shown, index)]
            pred = [r.labels for r in per_frame]
            stack = (lambda vols: vols[0]) if item.nifti.data.ndim == 3 else np.stack
            save_nifti_labels(stack(shown), work / seg_name, item.nifti.affine, item.nifti.header)
            save_nifti_labels(stack(pred), work / pred_name, item.nifti.affine, item.nifti.header)
            seg, prd = out / seg_name, out / pred_name  # where they stand once the run is in place
            written.append({
                "option": item.option, "image": str(item.path),
                "labels": str(item.labels_path) if item.labels_path else None,
                "painted_slices": [job.volumes[i].painted_slices.tolist() for i in index],
                "verdicts": [None if r.verdict is None else {"suspect": r.verdict.suspect, "message": r.verdict.message}
                             for r in per_frame],
                "segmentation": str(seg), "prediction": str(prd)})
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
    first = written[0]
    manifest = {
        "command": "m3hl " + " ".join(sys.argv[1:]) if sys.argv and "m3hl" in sys.argv[0] else None,
        "kind": "few-slice fine-tune", "start_model": str(start), "image": first["image"], "labels": first["labels"],
        "painted_slices": job.painted_slices.tolist(), "options": vars(options), "config": job.config.to_dict(),
        "seconds": round(time.perf_counter() - t0, 1), "iterations_done": result.iterations,
        "checkpoint": result.checkpoint and str(out / Path(result.checkpoint).name),
        "verdict": {"suspect": result.verdict.suspect, "message": result.verdict.message},
        "start_blend": {"weight": result.blend.weight, "start_painted_dice": result.blend.painted_dice,
                        "student_change": result.blend.student_change},
        "segmentation": first["segmentation"], "prediction": first["prediction"], "inputs": written,
    }
    checks.write_json(work / "run.json", manifest, "--out")
    if work != out:
        checks.commit_run(work, out)
    for r in result.volumes:
        if r.verdict is not None:
            print(f"{r.name}: {r.verdict.message}" if len(result.volumes) > 1 else r.verdict.message, file=sys.stderr)
    if result.blend != job.blend:  # the share settled after training (napari_m3hl.fewslice.trust.settle_blend)
        print(result.blend.describe(), file=sys.stderr)
    for w in written:
        print(f"segmentation: {w['segmentation']} (painted slices as painted)  prediction: {w['prediction']}")
    return 0
