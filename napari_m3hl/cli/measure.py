"""``m3hl measure SEG [SEG_ES] [--json FILE] [--csv FILE]``: the clinical
measures of a segmentation (:mod:`napari_m3hl.metrics.clinical`).

One 3D segmentation gives the LV and RV blood-pool volumes and the LV
myocardial volume and mass; an end-diastolic and an end-systolic file, or a
4D cine segmentation (ED and ES picked by the LV volume's maximum and
minimum, or named with ``--ed`` / ``--es``), add EDV, ESV, SV and EF of the
LV and RV. The voxel size comes from the NIfTI header (``--spacing`` states
it when the file has none); an output file that is one of the inputs is
refused before anything is read.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from napari_m3hl.cli import checks
from napari_m3hl.errors import M3HLInputError


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_outputs(inputs: list[Path], outputs: list[tuple[Path, str]]) -> None:
    """Refuse an output file that is an input or another output (one line naming both)."""
    for k, (out, opt) in enumerate(outputs):
        for src in inputs:
            if _same(out, src):
                raise M3HLInputError(f"{opt} {out} is the input segmentation {src}; choose another file name "
                                     "(measure never overwrites its input)")
        for other, other_opt in outputs[:k]:
            if _same(out, other):
                raise M3HLInputError(f"{opt} and {other_opt} are one file ({out}); give two file names")
        checks.check_output_file(out, opt)


def cmd_measure(args: argparse.Namespace) -> int:
    from napari_m3hl.io.files import atomic_write_text
    from napari_m3hl.io.nifti import load_nifti
    from napari_m3hl.metrics.clinical import measure, voxel_size_from_geometry

    seg = Path(args.segmentation)
    inputs = [seg] + ([Path(args.es_segmentation)] if args.es_segmentation else [])
    outputs = [(Path(p), opt) for p, opt in ((args.json, "--json"), (args.csv, "--csv")) if p]
    check_outputs(inputs, outputs)
    vol = load_nifti(seg)
    if args.spacing is not None:
        spacing, where = tuple(args.spacing), "--spacing"
    else:
        spacing, where = voxel_size_from_geometry(vol.header, None), "the header"
    es_labels = None
    if args.es_segmentation:
        if vol.data.ndim != 3:
            raise M3HLInputError(f"{seg} is a 4D cine ({vol.data.shape}); give it alone (ED and ES are picked from "
                                 "its frames, or named with --ed / --es) or two 3D files")
        es = load_nifti(inputs[1])
        if es.data.shape != vol.data.shape:
            raise M3HLInputError(f"the end-systolic segmentation {inputs[1]} has shape {es.data.shape[::-1]} "
                                 f"(X, Y, Z), the end-diastolic {seg} {vol.data.shape[::-1]}; give two frames of "
                                 "one scan")
        es_spacing = voxel_size_from_geometry(es.header, None)
        if args.spacing is None and (spacing is None or es_spacing is None
                                     or any(abs(a - b) > 1e-3 for a, b in zip(spacing, es_spacing))):
            raise M3HLInputError(f"{seg} and {inputs[1]} have different voxel sizes ({spacing} and {es_spacing} mm); "
                                 "give two frames of one scan")
        es_labels = es.data
    elif args.ed is not None or args.es is not None:
        if vol.data.ndim != 4:
            raise M3HLInputError(f"--ed / --es name frames of a 4D cine segmentation; {seg} is 3D {vol.data.shape[::-1]}")
    m = measure(vol.data, spacing, es_labels, ed=args.ed, es=args.es, source=str(seg))
    frames = f", {len(m.frames)} frames" if vol.data.ndim == 4 else ""
    print(f"{seg}: voxel {' x '.join(f'{s:g}' for s in m.spacing)} mm (slice spacing first, from {where}){frames}")
    for line in m.summary_lines():
        print(f"  {line}")
    for out, opt in outputs:
        try:
            text = m.to_csv() if opt == "--csv" else None
            if text is None:
                checks.write_json(out, m.to_dict() | {"segmentation": [str(p) for p in inputs]}, opt)
            else:
                atomic_write_text(out, text)
        except OSError as exc:
            raise M3HLInputError(f"cannot write {opt} {out} ({exc.strerror or exc})") from None
        print(f"{opt.lstrip('-')}: {out}")
    return 0
