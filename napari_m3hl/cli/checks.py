"""Checks the command line runs before it reads, trains or writes anything.

Each function raises :class:`~napari_m3hl.errors.M3HLInputError` with one line
naming the option or file and what to do (the CLI prints it and exits with
status 2). They exist so that no command destroys a file, returns a silently
wrong result or fails half-way: outputs are planned and checked before the
first inference, the run folder before the first training step. The list of
what each command refuses is in ``docs/refusals.md``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from napari_m3hl.errors import M3HLInputError
from napari_m3hl.io.files import (NIFTI_SUFFIXES, atomic_write_text, is_nifti_name, probe_writable, same_path, stem,
                                  why_not_a_file)

INPUT_SUFFIXES = NIFTI_SUFFIXES + (".h5",)
#: Files a training run writes into its folder (``--overwrite`` replaces or removes them).
RUN_FILES = ("run.json", "last.pt", "best.pt", "diverged.pt")


# --------------------------------------------------------------------- writing


def check_writable_dir(folder: Path, option: str) -> None:
    """``folder`` exists or can be created, and a file can be written in it.

    Creates the folder (as the command would) and probes it with a temporary
    file, which is removed again."""
    if folder.exists() and not folder.is_dir():
        raise M3HLInputError(f"{option} {folder} is a file, not a folder; give a folder name")
    try:
        probe_writable(folder)
    except OSError as exc:
        raise M3HLInputError(
            f"{option} {folder} is not writable ({exc.strerror or exc}); choose a folder you can write to"
        ) from None


def check_output_file(path: str | Path, option: str, inputs: dict[str, Any] | None = None) -> Path:
    """A file the command will write at the end (e.g. ``--json``): checked
    before the (long) run, so its results are not lost at the last step.
    Refused when it is one of the command's ``inputs`` (``{"--checkpoint":
    path, ...}``: :func:`check_not_input`). A missing parent folder is created."""
    path = Path(path)
    check_not_input(path, option, inputs or {})
    if path.is_dir():
        raise M3HLInputError(f"{option} {path} is a folder; give a file name, e.g. {path / 'results.json'}")
    check_writable_dir(path.parent if str(path.parent) else Path("."), f"{option} folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise M3HLInputError(f"{option} {path} exists and is not writable; choose another file")
    return path


def write_json(path: str | Path, obj: Any, option: str) -> None:
    """Write ``obj`` as JSON (temporary file + rename); one clear line on failure."""
    path = Path(path)
    try:
        atomic_write_text(path, json.dumps(obj, indent=2, default=float))
    except OSError as exc:
        raise M3HLInputError(f"cannot write {option} {path} ({exc.strerror or exc})") from None


# --------------------------------------------------------------------- inputs vs outputs


def check_not_input(path: str | Path, option: str, inputs: dict[str, str | Path | None]) -> None:
    """Refuse an output ``path`` that is one of the command's ``inputs``
    (``{"--checkpoint": path, ...}``; None and ``phantom`` are skipped)."""
    for flag, src in inputs.items():
        if src is None or str(src).strip().lower() == "phantom":
            continue
        if same_path(path, src):
            raise M3HLInputError(
                f"{option} {path} is the {flag} file {src}; writing there would destroy it. Choose another {option} "
                "file name")


# --------------------------------------------------------------------- predict


def input_files(path: Path) -> list[Path]:
    """The volumes ``--input`` names: one file or the NIfTI/h5 files of a folder."""
    if not path.is_dir():
        problem = why_not_a_file(path, "--input", "give a .nii, .nii.gz or .h5 file or a folder of them")
        if problem:
            raise M3HLInputError(problem)
    if path.is_file():
        if not path.name.lower().endswith(INPUT_SUFFIXES):
            raise M3HLInputError(f"--input {path} is not a .nii, .nii.gz or .h5 file")
        return [path]
    # hidden names are skipped: a temporary file of an interrupted write (".scan.nii.gz.XXXX.nii.gz") is no scan
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.name.lower().endswith(INPUT_SUFFIXES))
    if not files:
        raise M3HLInputError(f"--input folder {path} holds no .nii, .nii.gz or .h5 file")
    return files


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _holds_image(path: Path) -> bool:
    """An existing file is a NIfTI image of grey values (fractional, or more than
    256 distinct values), not a label map as ``m3hl predict`` writes them. A
    file that cannot be read as NIfTI holds no image."""
    try:
        import nibabel as nib

        data = np.asanyarray(nib.load(str(path)).dataobj)
    except Exception:  # noqa: BLE001 - unreadable: no scan to lose
        return False
    if data.dtype.kind == "f" and (not np.all(np.isfinite(data)) or np.any(data != np.rint(data))):
        return True
    return np.unique(data).size > 256


def plan_outputs(inputs: Sequence[Path], output: Path, overwrite: bool) -> list[tuple[Path, Path]]:
    """``(input, label file)`` pairs for ``m3hl predict``, checked before any inference.

    ``output`` is a folder (``<name>.nii.gz`` per input) or, for a single
    input, a ``.nii``/``.nii.gz`` file name. Refused: an output that is an
    existing non-NIfTI file, a file name for several inputs, two inputs
    mapping to one output (``a.nii`` and ``a.nii.gz``), an output that is one
    of the inputs (even with ``--overwrite``), and existing outputs unless
    ``overwrite``.
    """
    if is_nifti_name(output) and not output.is_dir():
        if len(inputs) != 1:
            raise M3HLInputError(
                f"--output {output} names one file but --input holds {len(inputs)} volumes; give a folder"
            )
        pairs = [(inputs[0], output)]
    else:
        if output.exists() and not output.is_dir():
            raise M3HLInputError(
                f"--output {output} is an existing file, not a folder; give a folder (or, for one input, "
                "a .nii.gz file name)"
            )
        pairs = [(f, output / f"{stem(f)}.nii.gz") for f in inputs]
    seen: dict[Path, Path] = {}
    for src, dest in pairs:
        key = dest.resolve()
        if key in seen:
            raise M3HLInputError(
                f"{seen[key].name} and {src.name} would both be written to {dest}; move one of them to another "
                "folder or predict them separately"
            )
        seen[key] = src
    for src, dest in pairs:
        hit = next((f for f in inputs if _same_file(f, dest)), None)
        if hit is not None:
            raise M3HLInputError(
                f"--output {dest} is the input scan {hit}; writing labels there would destroy it. "
                "Choose another --output folder"
            )
        if dest.is_dir():
            raise M3HLInputError(f"{dest} is a folder; remove it or choose another --output")
    existing = [dest for _, dest in pairs if dest.exists()]
    for dest in existing:
        if overwrite and _holds_image(dest):
            raise M3HLInputError(
                f"--output {dest} exists and is not a label map (it holds an image's grey values); --overwrite "
                "replaces earlier label maps only. Choose another --output folder")
    if existing and not overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise M3HLInputError(
            f"{existing[0]}{more} already exist(s); pass --overwrite to replace them or choose another --output"
        )
    return pairs


# --------------------------------------------------------------------- train


def check_run_inputs(out: Path, outputs: Sequence[str], inputs: dict[str, str | Path | None]) -> None:
    """Refuse a run whose ``--out`` files ``outputs`` (names in ``out``) include
    one of its inputs: the run would replace a file it was handed to read."""
    for flag, src in inputs.items():
        if src is None or str(src).strip().lower() == "phantom":
            continue
        for name in outputs:
            if same_path(out / name, src):
                raise M3HLInputError(
                    f"{flag} {src} is the {name} this run writes into --out {out}; it would be replaced. Copy it "
                    "elsewhere first, or choose another --out")


def stage_run(out: Path, overwrite: bool, resume: str | None) -> Path:
    """The folder a run writes into: ``out`` itself, or with ``--overwrite`` of
    a folder holding files a temporary sibling folder (``.NAME.new-*``) that
    :func:`commit_run` swaps in when the run completes, so an interrupted or
    failed run leaves the earlier one intact (and ``--init out/last.pt`` is
    read before anything is replaced)."""
    if not overwrite or resume or not out.is_dir() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        return out
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new-"))


def commit_run(work: Path, out: Path) -> list[str]:
    """Move the completed run in ``work`` into ``out`` (each file renamed into
    place), remove the earlier run's files (``RUN_FILES``) it did not write,
    and drop ``work``. Other files in ``out`` (painted labels, notes) stay.
    Returns the earlier run's files that were removed."""
    if work == out:
        return []
    written = {p.name for p in work.iterdir()}
    removed = [n for n in RUN_FILES if n not in written and (out / n).is_file()]
    for name in sorted(written):
        os.replace(work / name, out / name)
    for name in removed:
        (out / name).unlink()
    shutil.rmtree(work, ignore_errors=True)
    return removed


def abandon_run(work: Path, out: Path) -> tuple[Path | None, str]:
    """A run into a staging folder (:func:`stage_run`) that did not complete:
    the earlier run in ``out`` is kept. The staging folder stays, renamed to
    a visible ``NAME.interrupted-*``, when it holds a checkpoint (to resume or
    inspect); else it is removed. Returns that folder (or None) and a sentence
    for the user."""
    if work == out:
        return None, ""
    if not any((work / n).is_file() for n in ("last.pt", "diverged.pt")):
        shutil.rmtree(work, ignore_errors=True)
        return None, f"the earlier run in {out} is kept as it was"
    kept = Path(tempfile.mkdtemp(dir=out.parent, prefix=f"{out.name}.interrupted-"))
    os.replace(work, kept)  # onto the new empty folder
    return kept, f"the earlier run in {out} is kept as it was; this run's files are in {kept}"


def check_run_folder(out: Path, resume: str | None, overwrite: bool) -> None:
    """A run folder must be new or empty, unless resuming a run or ``--overwrite``."""
    if out.exists() and not out.is_dir():
        raise M3HLInputError(f"--out {out} is a file, not a folder; give a folder for the run")
    if resume or overwrite or not out.is_dir():
        return
    found = sorted(p.name for p in out.iterdir())
    if found:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise M3HLInputError(
            f"--out {out} is not empty ({shown}); a new run would replace its files. Choose a new folder, "
            "continue that run with --resume, or pass --overwrite"
        )


def clear_run_files(out: Path) -> list[str]:
    """With ``--overwrite``: remove an earlier run's files (``RUN_FILES``) so none is mistaken for this run's."""
    removed = []
    for name in RUN_FILES:
        p = out / name
        if p.is_file():
            p.unlink()
            removed.append(name)
    return removed


def resume_settings(ckpt: dict[str, Any], path: str) -> dict[str, Any]:
    """The training settings a checkpoint was written with (unknown keys dropped),
    the base of a resumed run's config."""
    from napari_m3hl.config import TrainConfig

    stored = ckpt.get("config")
    if not isinstance(stored, dict) or not stored or "optimizer" not in ckpt:
        raise M3HLInputError(
            f"--resume {path} is a model file or weights-only checkpoint (no optimizer state to continue from); "
            f"use --init {path} to fine-tune it, or resume from a run's last.pt"
        )
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in stored.items() if k in known}


def explicit_differences(settings: dict[str, Any], given: dict[str, Any], keys: Iterable[str]) -> list[str]:
    """``key old→new`` for each of ``keys`` given on the command line with a new value."""
    out = []
    for k in keys:
        if given.get(k) is None or k not in settings:
            continue
        old, new = settings[k], given[k]
        if (list(old) if isinstance(old, (list, tuple)) else old) != (list(new) if isinstance(new, (list, tuple)) else new):
            out.append(f"{k} {old}→{new}")
    return out


# --------------------------------------------------------------------- evaluate


def data_kind(source: str | Path) -> tuple[int, int] | None:
    """(ndim, num_classes) of an evaluation source without reading it:
    phantom and ACDC 2D/4, LA 3D/2; None when unknown."""
    if isinstance(source, str) and source.strip().lower() == "phantom":
        return 2, 4
    path = Path(source)
    if (path / "volumes").is_dir() or (path / "train_slices.list").is_file():
        return 2, 4
    if (path / "cases").is_dir():
        return 3, 2
    return None


def check_spacing(spacing: Sequence[float] | None) -> None:
    """``evaluate --spacing``: three positive, finite voxel sizes in mm (D H W), or none (pixels)."""
    if spacing is None:
        return
    given = " ".join(f"{v:g}" for v in spacing)
    if len(spacing) != 3:
        raise M3HLInputError(f"--spacing {given}: give 3 values (D H W voxel sizes in mm, e.g. --spacing 10 1.5 1.5), "
                             f"not {len(spacing)}; leave it out to measure distances in pixels")
    if not all(math.isfinite(v) and v > 0 for v in spacing):
        raise M3HLInputError(f"--spacing {given}: voxel sizes must be positive numbers of mm (D H W, e.g. --spacing "
                             "10 1.5 1.5); leave it out to measure distances in pixels")


def check_teacher(ckpt: dict[str, Any], which: str | None, path: str) -> None:
    if which == "teacher" and "teacher" not in ckpt:
        raise M3HLInputError(
            f"--which teacher: {path} has no teacher network (a model file holds the student only); "
            "use --which student"
        )
