"""The main job, end to end on files: paint two slices, fine-tune, compare, export.

``python -m napari_m3hl.demo --image IMG.nii.gz --truth TRUTH.nii.gz --out DIR``
plays the clinician with a fully labeled volume: it keeps the truth on two
slices (a third and two thirds of the way through the slices that show every
class) as the "painted" label file, fine-tunes the start model on them with
the few-slice defaults (:mod:`napari_m3hl.fewslice.loop`, the path of ``m3hl train --labels``),
prints the start model's and the fine-tuned model's Dice on the slices that
were not painted and the time taken, and writes NIfTI files to ``DIR``:
``painted.nii.gz`` (the two painted slices), ``segmentation.nii.gz`` (the
export: painted slices as painted, the network elsewhere, or the start
model's segmentation when the safeguard fires) and ``prediction.nii.gz``
(the network's prediction alone). ``scripts/demo.sh`` runs it on a phantom.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from napari_m3hl.config import MODELS_DIR


def two_slices(label: np.ndarray) -> list[int]:
    """The painting rule of the demo and the benchmark's rule (a): two slices at about a third
    and two thirds of the (D, H, W) volume's slices that show every foreground class."""
    classes = [c for c in np.unique(label) if c]
    full = [z for z in range(label.shape[0]) if all((label[z] == c).any() for c in classes)]
    full = full if len(full) >= 2 else [z for z in range(label.shape[0]) if label[z].any()]
    if len(full) < 2:
        raise SystemExit("the truth volume needs at least two labeled slices to paint")
    n = len(full)
    i, j = int(round((n - 1) / 3)), int(round(2 * (n - 1) / 3))
    return sorted({full[i], full[max(j, i + 1)]})


def main(argv: list[str] | None = None) -> int:
    import torch

    from napari_m3hl.fewslice import loop as fs
    from napari_m3hl.errors import M3HLInputError
    from napari_m3hl.io.nifti import load_nifti, save_nifti_labels
    from napari_m3hl.metrics.binary import dice
    from napari_m3hl.fewslice.safeguard import merge_painted

    ap = argparse.ArgumentParser(prog="python -m napari_m3hl.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", required=True, help="a 3D NIfTI image")
    ap.add_argument("--truth", required=True, help="its full label map (NIfTI); two slices of it are 'painted'")
    ap.add_argument("--start", default=str(MODELS_DIR / "acdc70_unet2d.pt"), help="the model to fine-tune")
    ap.add_argument("--out", default="runs/demo", help="folder for the NIfTI outputs")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        img, truth = load_nifti(args.image), load_nifti(args.truth)
        label = np.rint(truth.data).astype(np.uint8)
        sel = two_slices(label)
        painted = np.zeros_like(label)
        painted[sel] = label[sel]
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        save_nifti_labels(painted, out / "painted.nii.gz", img.affine, img.header)
        t0 = time.perf_counter()
        options = fs.FewSliceOptions()
        job = fs.prepare(args.start, img.data, painted, options)
        print(f"painted slices {sel} of {label.shape[0]}; fine-tuning {Path(args.start).name} "
              f"({job.config.patch_size[0]}x{job.config.patch_size[1]} input): {options.summary()}", flush=True)
        result = None
        for e in fs.run(job):
            if isinstance(e, fs.Check):
                print(f"  iteration {e.iteration}: {time.perf_counter() - t0:.0f} s", flush=True)
            elif isinstance(e, fs.FewSliceResult):
                result = e
    except M3HLInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    off = np.setdiff1d(np.arange(label.shape[0]), sel)
    names = job.config.class_names

    def scores(pred: np.ndarray) -> list[float]:
        return [100 * dice(pred[off] == c, label[off] == c) for c in range(1, job.config.num_classes)]

    base, tuned = scores(result.base), scores(result.labels)
    print(f"Dice on the {off.size} unpainted slices ({', '.join(names[1:])}; mean):")
    print(f"  start model  {'  '.join(f'{v:5.1f}' for v in base)}   mean {np.mean(base):5.1f}")
    if result.blend.weight > 0 and result.network is not None:
        alone = scores(result.network)
        print(f"  network alone{'  '.join(f'{v:5.1f}' for v in alone)}   mean {np.mean(alone):5.1f}"
              f"   (the fine-tuned network without the start-model blend)")
    print(f"  fine-tuned   {'  '.join(f'{v:5.1f}' for v in tuned)}   mean {np.mean(tuned):5.1f}")
    print(result.blend.describe())
    print(f"time from Train to segmentation: {seconds:.0f} s")
    print(result.verdict.message)
    shown = result.base if result.verdict.suspect else result.labels
    save_nifti_labels(merge_painted(shown, painted), out / "segmentation.nii.gz", img.affine, img.header)
    save_nifti_labels(result.labels, out / "prediction.nii.gz", img.affine, img.header)
    print(f"wrote {out / 'segmentation.nii.gz'} (your painted slices kept) and {out / 'prediction.nii.gz'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
