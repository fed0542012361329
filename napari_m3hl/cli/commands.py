"""``m3hl predict | evaluate | suggest | phantom``: the commands that apply a
checkpoint or write data (``m3hl train`` and the parser are in :mod:`napari_m3hl.cli.main`).

Every input and output is checked (:mod:`napari_m3hl.cli.checks`) before the first
inference, so a refused command has written nothing.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from napari_m3hl.cli import checks
from napari_m3hl.errors import M3HLInputError, PartlyWrittenError


def _predict_fn(predictor):
    """``predict(vol (Z, Y, X), normalized) -> labels (Z, Y, X)`` with the checkpoint's :class:`Predictor`."""
    def predict(vol: np.ndarray, normalized: bool) -> np.ndarray:
        if predictor.ndim == 2:
            return predictor.predict(vol if normalized else predictor.scale(vol))
        xyz = np.ascontiguousarray(vol.transpose(2, 1, 0))  # the 3D models work in (X, Y, Z), z-scored
        if not normalized:
            xyz = ((xyz - xyz.mean()) / (xyz.std() + 1e-8)).astype(np.float32)
        return np.ascontiguousarray(predictor.predict(xyz).transpose(2, 1, 0))

    return predict


def _open(args: argparse.Namespace):
    """What every inference command does first: glibc malloc tuning, every core
    for torch, the ``--json`` path checked (when the command has one), then the
    device and the checkpoint. Returns ``(device, checkpoint dict)``."""
    from napari_m3hl.io.checkpoint import load_checkpoint, unfinished_note
    from napari_m3hl.runtime import resolve_device, set_threads, tune_malloc

    tune_malloc()
    set_threads("cli")
    if getattr(args, "json", None):
        checks.check_output_file(args.json, "--json", _inputs(args))
    device, ckpt = resolve_device(args.device), load_checkpoint(args.checkpoint)
    note = unfinished_note(ckpt, args.checkpoint)
    if note:
        print(f"m3hl {args.command}: {note}", file=sys.stderr)
    return device, ckpt


def _inputs(args: argparse.Namespace) -> dict[str, str | None]:
    """The files a command reads, by option (an output may be none of them)."""
    names = {"checkpoint": "--checkpoint", "data": "--data", "names_file": "--list", "image": "--image",
             "labels": "--labels", "input": "--input"}
    return {flag: getattr(args, key) for key, flag in names.items() if getattr(args, key, None)}


def _volume_warnings(vol, path: Path, ndim: int) -> list[str]:
    """Warnings about a NIfTI volume's slice axis and in-plane shape, for a 2D (slice-wise) model."""
    from napari_m3hl.io.grid import in_plane_warning, slice_axis_warning

    if ndim != 2:
        return []
    shape, spacing = vol.data.shape[-3:], vol.spacing[-3:]
    return [t for t in (slice_axis_warning(shape, spacing, str(path)), in_plane_warning(shape, str(path))) if t]


def _read_input(load, path: Path, done: list[Path]):
    """``load(path)``; a file that cannot be read once other outputs were
    written ends the command naming it and them (:class:`PartlyWrittenError`)."""
    try:
        return load(path)
    except M3HLInputError as exc:
        if not done:
            raise
        raise PartlyWrittenError(f"{exc} The label maps of the {len(done)} input(s) before it were written "
                                 f"({', '.join(map(str, done))}); the inputs after it were not predicted") from None


def cmd_predict(args: argparse.Namespace) -> int:
    from napari_m3hl.io.nifti import affine_from_spacing, check_nifti_file, load_nifti, save_nifti_labels
    from napari_m3hl.io.checks import fill_non_finite, warn_if_constant
    from napari_m3hl.io.h5 import load_h5_volume, load_la_case
    from napari_m3hl.inference.predictor import Predictor

    device, ckpt = _open(args)
    checks.check_teacher(ckpt, args.which, args.checkpoint)
    files = checks.input_files(Path(args.input))
    pairs = checks.plan_outputs(files, Path(args.output), args.overwrite)
    for _, dest in pairs:
        checks.check_not_input(dest, "--output", {"--checkpoint": args.checkpoint})
    for f in files:  # every file's header before the first output is written
        if not f.name.lower().endswith(".h5"):
            check_nifti_file(f)
    checks.check_writable_dir(pairs[0][1].parent, "--output")
    predictor = Predictor.from_checkpoint(ckpt, args.which, device, batch_size=args.batch_size, clean=args.clean,
                                          tta=args.tta)
    patch = predictor.patch
    predict = _predict_fn(predictor)
    done: list[Path] = []  # label maps written so far
    for f, dest in pairs:
        t0 = time.perf_counter()
        if f.name.lower().endswith(".h5"):  # already normalised as the training data
            if len(patch) == 2:
                image, _ = load_h5_volume(f)
            else:
                image = load_la_case(f, need_label=False)[0].transpose(2, 1, 0)
            labels = predict(image, normalized=True)
            affine, header = affine_from_spacing((1.0, 1.0, 1.0)), None
        else:
            vol = _read_input(load_nifti, f, done)
            data, bad, warning = fill_non_finite(vol.data, f)
            for text in (warning, warn_if_constant(data, f), *_volume_warnings(vol, f, len(patch))):
                if text:
                    print(text, file=sys.stderr)
            if data.ndim == 4:  # (T, Z, Y, X): each frame on its own
                labels = np.stack([predict(frame, normalized=False) for frame in data])
            else:
                labels = predict(data, normalized=False)
            if bad is not None:
                labels[bad] = 0
            affine, header = vol.affine, vol.header
        dest = save_nifti_labels(labels, dest, affine, header, replace=args.overwrite)
        done.append(dest)
        counts = ", ".join(f"{n}: {int((labels == c).sum())} vox" for c, n in enumerate(ckpt["class_names"]) if c)
        print(f"{f} -> {dest} ({time.perf_counter() - t0:.1f} s; {counts})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from napari_m3hl.data import load_val_volumes
    from napari_m3hl.metrics.labelmaps import format_table
    from napari_m3hl.inference.predictor import Predictor

    checks.check_spacing(args.spacing)
    device, ckpt = _open(args)
    checks.check_teacher(ckpt, args.which, args.checkpoint)
    patch = tuple(ckpt["patch_size"])
    kind = checks.data_kind(args.data)
    if kind is not None and kind != (len(patch), ckpt["num_classes"]):
        raise M3HLInputError(
            f"--checkpoint {args.checkpoint} is a {len(patch)}D model with {ckpt['num_classes']} classes but --data "
            f"{args.data} holds {kind[0]}D volumes with {kind[1]} classes; give a checkpoint trained on such data"
        )
    if args.names_file and kind is not None and str(args.data).strip().lower() == "phantom":
        raise M3HLInputError("--list names volumes of an ACDC or LA folder; the phantom has none (use --limit)")
    predictor = Predictor.from_checkpoint(ckpt, args.which, device, clean=args.clean, tta=args.tta)
    volumes = load_val_volumes(args.data, ndim=len(patch), limit=args.limit, names_file=args.names_file)
    if not volumes:
        raise M3HLInputError(f"no validation volume found in {args.data}")
    # the one scoring path (benchmarks/acdc.py uses it too): input resizing as the checkpoint was trained
    summary, per_case = predictor.score(volumes, spacing=args.spacing, empty_convention=args.empty)
    unit = "mm" if args.spacing else "px"
    print(format_table(summary, distance_unit=unit))
    if args.json:
        checks.write_json(args.json, {"checkpoint": str(args.checkpoint), "data": str(args.data), "which": args.which,
                                      "clean": args.clean, "tta": args.tta,
                                      "unit": unit, "empty_convention": args.empty, "summary": summary,
                                      "cases": per_case}, "--json")
    return 0


def cmd_suggest(args: argparse.Namespace) -> int:
    from napari_m3hl.io.checks import fill_non_finite, warn_if_constant
    from napari_m3hl.io.nifti import load_nifti
    from napari_m3hl.inference.predictor import Predictor
    from napari_m3hl.fewslice.suggest import (
        DEFAULT_METHOD, DEFAULT_NETWORK, DEFAULT_SPREAD, analyse_volume, check_labels,
    )

    device, ckpt = _open(args)
    if len(ckpt["patch_size"]) != 2:
        raise M3HLInputError(f"{args.checkpoint} holds a 3D model; slice suggestions need a 2D (slice-wise) model")
    vol = load_nifti(args.image)
    if vol.data.ndim != 3:
        raise M3HLInputError(f"{args.image} has shape {vol.data.shape}; suggest takes one 3D volume (split a cine first)")
    image, _, warning = fill_non_finite(vol.data, args.image)
    for text in (warning, warn_if_constant(image, args.image)):
        if text:
            print(text, file=sys.stderr)
    labeled: list[int] = []
    if args.labels:
        notes: list[str] = []
        labeled = check_labels(args.image, vol, args.labels, ckpt["num_classes"], notes)
        for text in notes:
            print(text, file=sys.stderr)
    teacher = Predictor.from_checkpoint(ckpt, "teacher", device) if "teacher" in ckpt else None
    method = args.score or DEFAULT_METHOD
    if args.score is None and method == "disagreement" and teacher is None:
        method = "entropy"  # the default needs a teacher; a model file has none
        print(f"{args.checkpoint} has no teacher network: ranking by entropy instead of disagreement")
    network = args.which or (DEFAULT_NETWORK if teacher is not None else "student")
    if teacher is None and (method == "disagreement" or network == "teacher"):
        raise M3HLInputError(f"{args.checkpoint} has no teacher network; use --score entropy or margin "
                             "with --which student")
    student = Predictor.from_checkpoint(ckpt, "student", device)
    a = analyse_volume(student, student.scale(image), teacher, method, network=network)
    spread = DEFAULT_SPREAD if args.spread is None else args.spread
    ranking = a.ranking(labeled, spread)
    what = (method if method == "disagreement" else f"the {network}'s {method}") + (
        " × distance to the labeled slices" if spread and labeled else "")
    print(f"{len(ranking)} unlabeled of {len(a.scores)} slices; most uncertain by {what}:")
    for rank, z in enumerate(ranking[: args.top], 1):
        print(f"  {rank}. slice {z}  {method} {a.scores[z]:.4f}")
    if args.json:
        checks.write_json(args.json, {"image": str(args.image), "checkpoint": str(args.checkpoint), "score": method,
                                      "network": network, "spread": spread, "labeled": labeled, "ranking": ranking,
                                      "scores": [float(x) for x in a.scores]}, "--json")
    return 0


def cmd_phantom(args: argparse.Namespace) -> int:
    from napari_m3hl.data.phantom import save_phantom_nifti

    out = Path(args.output)
    checks.check_writable_dir(out, "--output")
    seeds = range(args.seed, args.seed + args.count)
    files = [(out / f"phantom_{s}.nii.gz", out / f"phantom_{s}_labels.nii.gz") for s in seeds]
    existing = [p for pair in files for p in pair if p.exists()]
    if existing and not args.overwrite:
        raise M3HLInputError(f"{existing[0]} already exists; pass --overwrite to replace it or choose another --output")
    for seed, (img, lab) in zip(seeds, files):
        save_phantom_nifti(img, seed=seed, labels_path=lab)
        print(f"{img}  {lab}")
    return 0
