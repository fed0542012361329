"""Whole-volume 2D prediction speed, and whether bf16 changes the segmentation.

Speed: a 10-slice 256×216 phantom volume (the napari sample's size) through
the 2D U-Net at the 256² patch, with every core (the CLI's threads), in four
settings timed round-robin in one process (median of ``--repeats``):

- ``before``: what ``predict_volume_2d`` did before this change: fp32,
  contiguous (NCHW), 8 slices per pass (two passes for 10 slices);
- ``channels_last``: fp32, NHWC model and input, one pass;
- ``bf16``: bf16 autocast, NCHW, one pass;
- ``default``: today's defaults (``precision="auto"``: bf16 where the CPU
  computes it natively; channels_last; one pass).

Agreement: the shipped ACDC models predict the validation volumes in fp32 and
with the defaults; per volume and class the Dice between the two label maps
(and each one's Dice against the reference labels) is recorded.

Writes ``benchmarks/results/inference.json``.

    python benchmarks/inference.py [--repeats 7] [--data ../shared/data/acdc]
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

from napari_m3hl.inference.slices2d import predict_volume_2d
from napari_m3hl.metrics.binary import dice
from napari_m3hl.method.networks import build_network
from napari_m3hl.data.phantom import make_phantom
from napari_m3hl.inference.predictor import Predictor
from napari_m3hl.runtime import resolve_precision, set_threads, tune_malloc

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {  # name -> predict_volume_2d keyword arguments
    "before": {"precision": "fp32", "channels_last": False, "batch_size": 8},
    "channels_last": {"precision": "fp32", "channels_last": True},
    "bf16": {"precision": "bf16", "channels_last": False},
    "default": {},
}


def speed(repeats: int, patch: int) -> dict:
    vol = make_phantom(shape=(10, 216, 256), seed=0).image.astype(np.float32)
    torch.manual_seed(0)
    models = {}
    for name, kw in SETTINGS.items():  # one model per setting: channels_last converts in place
        net = build_network("unet2d", 1, 4).eval()
        models[name] = (net, kw)
        predict_volume_2d(net, vol, patch=(patch, patch), **kw)  # warm-up (and the in-place conversion)
    times: dict[str, list[float]] = {k: [] for k in SETTINGS}
    load0 = os.getloadavg()[0]
    for _ in range(repeats):
        for name, (net, kw) in models.items():
            t = time.perf_counter()
            predict_volume_2d(net, vol, patch=(patch, patch), **kw)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"volume": list(vol.shape), "patch": [patch, patch],
            "load_average_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
            "median_s": {k: round(v, 4) for k, v in med.items()},
            "min_s": {k: round(min(v), 4) for k, v in times.items()},
            "all_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
            "default_over_before": round(med["default"] / med["before"], 3)}


def agreement(data_root: Path, limit: int | None) -> list[dict]:
    from napari_m3hl.data import load_val_volumes

    out = []
    vols = load_val_volumes(str(data_root), 2, limit=limit)
    for model_path in sorted((ROOT / "models").glob("acdc*.pt")):
        results = {}
        for which in ("fp32", "default"):  # a fresh network each: channels_last converts in place
            predictor = Predictor.from_checkpoint(model_path, clean=False)
            if which == "fp32":
                predictor = replace(predictor, precision="fp32", channels_last=False)
            preds = [predictor.predict(img) for _, img, _ in vols]
            results[which] = preds
        per_class_agree, gt = [], {"fp32": [], "default": []}
        changed = 0
        for i, (_, _, lab) in enumerate(vols):
            a, b = results["fp32"][i], results["default"][i]
            changed += int((a != b).sum())
            for c in (1, 2, 3):
                per_class_agree.append(dice(a == c, b == c))
                for which in gt:
                    gt[which].append(dice(results[which][i] == c, lab == c))
        out.append({"model": model_path.name, "patch": list(predictor.patch), "volumes": len(vols),
                    "dice_fp32_vs_default": {"mean": round(float(np.mean(per_class_agree)), 4),
                                             "min": round(float(np.min(per_class_agree)), 4)},
                    "pixels_changed": changed,
                    "mean_dice_vs_reference": {k: round(100 * float(np.mean(v)), 2) for k, v in gt.items()}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: every core, as the CLI)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "acdc"))
    ap.add_argument("--limit", type=int, default=None, help="agreement on the first N validation volumes only")
    ap.add_argument("--skip-agreement", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "inference.json"))
    args = ap.parse_args()
    tune_malloc()
    threads = set_threads("cli") if args.threads is None else args.threads
    torch.set_num_threads(threads)
    result = {"device": "cpu", "device_name": platform.processor() or platform.machine(), "threads": threads,
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "cpu_count": os.cpu_count(),
              "default_autocast": str(resolve_precision("auto", torch.device("cpu"))),
              "speed": speed(args.repeats, args.patch)}
    print(json.dumps(result["speed"]["median_s"]), result["speed"]["load_average_1min"])
    data = Path(args.data)
    if not args.skip_agreement and (data / "val.list").is_file():
        result["agreement"] = agreement(data, args.limit)
        for r in result["agreement"]:
            print(json.dumps(r))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
