"""What cleaning (each class's largest 3D component) and flip TTA do to the
shipped ACDC models' segmentations, and what they cost on the CPU.

For each shipped model and each of the 20 ACDC validation volumes, four
segmentations from one :class:`~napari_m3hl.inference.predictor.Predictor`:
``plain`` (the paper's protocol: argmax, no post-processing), ``clean`` (the
default of ``m3hl predict``, ``m3hl evaluate`` and the widget), ``tta`` (flip
test-time augmentation: four passes, probabilities averaged) and
``tta+clean``. Each is scored as ``m3hl evaluate`` scores (Dice, HD95 and ASD
in pixels, the papers' convention for an empty class); the seconds per volume
of the prediction (with and without TTA) and of the cleaning step alone are
recorded.

Writes ``benchmarks/results/cleaning.json``.

    python benchmarks/cleaning.py [--data ../shared/data/acdc] [--threads 1] [--limit N]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from napari_m3hl.data import load_val_volumes
from napari_m3hl.inference.predictor import Predictor
from napari_m3hl.metrics.labelmaps import evaluate_case, summarize

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("acdc70_unet2d", "acdc7_m3hl_unet2d")
VARIANTS = ("plain", "clean", "tta", "tta+clean")


def _summary(cases: list, names: list[str]) -> dict:
    s = summarize(cases, names)
    return {"mean": {k: round(float(v), 4) for k, v in s["mean"].items()},
            "per_class": {c["name"]: {k: round(float(c[k]["mean"]), 4) for k in ("dice", "hd95", "asd")}
                          for c in s["classes"]}}


def run_model(path: Path, vols: list) -> dict:
    base = Predictor.from_checkpoint(path, clean=False)
    names = list(base.class_names)
    cases: dict[str, list] = {v: [] for v in VARIANTS}
    secs: dict[str, list[float]] = {"predict": [], "predict_tta": [], "clean": []}
    for _, image, label in vols:
        got = {}
        for tta in (False, True):
            p = replace(base, tta=tta)
            t = time.perf_counter()
            lab = p.predict(image)
            secs["predict_tta" if tta else "predict"].append(time.perf_counter() - t)
            t = time.perf_counter()
            cleaned = replace(p, clean=True).finish(lab)
            secs["clean"].append(time.perf_counter() - t)
            got["tta" if tta else "plain"] = lab
            got["tta+clean" if tta else "clean"] = cleaned
        for k in VARIANTS:
            cases[k].append(evaluate_case(got[k], label, base.num_classes, empty_convention="paper"))
    return {"model": f"models/{path.name}", "volumes": len(vols),
            "scores": {k: _summary(cases[k], names) for k in VARIANTS},
            "seconds_per_volume": {k: round(statistics.median(v), 3) for k, v in secs.items()},
            "seconds_all": {k: [round(x, 3) for x in v] for k, v in secs.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "acdc"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    ap.add_argument("--limit", type=int, default=None, help="the first N validation volumes only")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cleaning.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vols = load_val_volumes(args.data, 2, limit=args.limit)
    result = {"device": "cpu", "device_name": platform.processor() or platform.machine(), "threads": args.threads,
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "cpu_count": os.cpu_count(),
              "load_average_1min_start": round(os.getloadavg()[0], 2), "data": args.data,
              "units": "Dice in %; HD95 and ASD in pixels (no spacing, as the papers); a class missing from the "
                       "prediction scores 0 on all metrics (the papers' convention)",
              "models": []}
    for name in MODELS:
        r = run_model(ROOT / "models" / f"{name}.pt", vols)
        result["models"].append(r)
        for k in VARIANTS:
            m = r["scores"][k]["mean"]
            print(f"{name:20s} {k:10s} Dice {100 * m['dice']:.2f}  HD95 {m['hd95']:.2f}  ASD {m['asd']:.2f}")
        print(f"{name:20s} s/volume {r['seconds_per_volume']}")
    result["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
