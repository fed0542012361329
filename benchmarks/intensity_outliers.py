"""Min–max scaling with one hot voxel: the shipped ACDC model's Dice on real
ACDC validation volumes, clean and with one voxel at 10x the maximum, scaled
by plain min–max (the range of every voxel) and by the package's ``minmax``
(:func:`napari_m3hl.io.intensity.robust_range`: isolated outliers left out).

Also records, for every ACDC validation volume, how far its maximum lies
beyond the 99.9th percentile in units of the 0.1–99.9 % spread (the outlier
fence is ``OUTLIER_SPREAD`` of them), so the fence is seen to leave normal
scans unchanged.

    python benchmarks/intensity_outliers.py [--data ../shared/data/acdc] [--volumes 2]

Writes ``benchmarks/results/intensity_outliers.json``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import h5py
import numpy as np

from napari_m3hl.inference.predictor import Predictor
from napari_m3hl.io.checkpoint import load_checkpoint
from napari_m3hl.io.intensity import OUTLIER_SPREAD, scale_intensity
from napari_m3hl.metrics.binary import dice

ROOT = Path(__file__).resolve().parents[1]


def plain_minmax(img: np.ndarray) -> np.ndarray:
    return ((img - img.min()) / (img.max() - img.min())).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "acdc"))
    ap.add_argument("--volumes", type=int, default=2)
    ap.add_argument("--model", default=str(ROOT / "models" / "acdc70_unet2d.pt"))
    args = ap.parse_args()
    files = sorted(Path(args.data, "volumes").glob("*.h5"))
    beyond = {}
    for f in files:
        with h5py.File(f) as h:
            img = h["image"][:]
        lo, hi = np.percentile(img, [0.1, 99.9])
        beyond[f.stem] = round(float((img.max() - hi) / (hi - lo)), 3)
    predictor = Predictor.from_checkpoint(load_checkpoint(args.model), "student", "cpu")
    rows = {}
    for f in files[: args.volumes]:
        with h5py.File(f) as h:
            img, lab = h["image"][:] * 800.0 + 20.0, h["label"][:]  # a scanner's grey values
        hot = img.copy()
        hot[0, 5, 5] = 10 * img.max()
        row = {}
        for tag, vol in (("clean", img), ("hot_voxel", hot)):
            for how, scale in (("plain_minmax", plain_minmax), ("minmax", lambda v: scale_intensity(v, "minmax"))):
                pred = predictor.predict(scale(vol))
                row[f"{tag}_{how}"] = round(100 * float(np.mean([dice(pred == c, lab == c) for c in (1, 2, 3)])), 2)
        row["minmax_equals_plain_on_clean"] = bool(np.array_equal(scale_intensity(img, "minmax"), plain_minmax(img)))
        rows[f.stem] = row
        print(f.stem, row, flush=True)
    out = {"model": Path(args.model).name, "outlier_spread": OUTLIER_SPREAD, "mean_dice": rows,
           "max_beyond_p99_9_in_spreads": beyond, "largest_beyond": max(beyond.values())}
    dest = ROOT / "benchmarks" / "results" / "intensity_outliers.json"
    dest.write_text(json.dumps(out, indent=1))
    print(f"largest max beyond p99.9 on {len(beyond)} volumes: {out['largest_beyond']} spreads (fence {OUTLIER_SPREAD})")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
