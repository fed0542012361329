"""Ejection fraction and volumes from the shipped models' segmentations
against the ground truth's, on the 10 ACDC validation patients.

Each patient of ``val.list`` has two volumes: ``frame01`` is end-diastole
(ED) and the other frame end-systole (ES). Both are segmented by a shipped
model (:class:`~napari_m3hl.inference.predictor.Predictor`): ``plain`` (not
cleaned: the paper's protocol), ``clean`` (as ``m3hl predict`` does by
default) and ``tta+clean`` (with ``--tta``).
The h5 files hold no voxel size, so volumes are compared as voxel counts:
the EF (a ratio of volumes of one patient, whose two frames share one voxel
size) is computed from counts with
:func:`napari_m3hl.metrics.clinical.function`, and each volume's error is
relative, ``(predicted − true) / true``.

Recorded per model and cleaning: the LV and RV EF of every patient (truth,
prediction, error in EF points), the mean absolute error and the worst
patient; the relative volume error of the LV and RV blood pools (ED and
ES) and of the myocardium (ED: the mass), mean absolute and worst.

Writes ``benchmarks/results/clinical.json``.

    python benchmarks/clinical.py [--data ../shared/data/acdc] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from napari_m3hl.data import load_val_volumes
from napari_m3hl.inference.predictor import Predictor
from napari_m3hl.metrics.clinical import LV, MYO, RV, function

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("acdc70_unet2d", "acdc7_m3hl_unet2d")
STRUCTURES = {"LV": LV, "RV": RV, "Myo": MYO}


def counts(lab: np.ndarray) -> dict[str, int]:
    return {k: int((lab == v).sum()) for k, v in STRUCTURES.items()}


def patients(vols: list) -> list[tuple[str, tuple, tuple]]:
    """``(patient, (ED image, label), (ES image, label))`` from the validation volumes."""
    by: dict[str, dict[str, tuple]] = {}
    for name, image, label in vols:
        pid, frame = name.split("_")[0], name.split("_")[1]
        by.setdefault(pid, {})["ED" if frame == "frame01" else "ES"] = (image, label)
    return [(p, d["ED"], d["ES"]) for p, d in by.items() if {"ED", "ES"} <= d.keys()]


def evaluate(pairs: list, truth: dict, pred: dict) -> dict:
    """EF and volume errors of ``pred`` against ``truth`` (both ``{patient: {"ED": counts, "ES": counts}}``)."""
    out: dict = {"patients": {}}
    ef_err: dict[str, list[tuple[float, str]]] = {"LV": [], "RV": []}
    vol_err: dict[str, list[tuple[float, str]]] = {}
    for p, _, _ in pairs:
        row = {}
        for s in ("LV", "RV"):
            t = function(truth[p]["ED"][s], truth[p]["ES"][s]).ef_pct
            g = function(pred[p]["ED"][s], pred[p]["ES"][s]).ef_pct
            row[f"{s}_ef_true"], row[f"{s}_ef_pred"], row[f"{s}_ef_error"] = round(t, 2), round(g, 2), round(g - t, 2)
            ef_err[s].append((abs(g - t), p))
        for phase in ("ED", "ES"):
            for s in ("LV", "RV", "Myo"):
                if s == "Myo" and phase == "ES":
                    continue
                t, g = truth[p][phase][s], pred[p][phase][s]
                rel = (g - t) / t if t else float("nan")
                row[f"{s}_{phase}_rel_volume_error"] = round(rel, 4)
                vol_err.setdefault(f"{s}_{phase}", []).append((abs(rel), p))
        out["patients"][p] = row
    for s, errs in ef_err.items():
        worst = max(errs)
        out[f"{s}_ef_mae_points"] = round(float(np.mean([e for e, _ in errs])), 2)
        out[f"{s}_ef_worst"] = {"patient": worst[1], "abs_error_points": round(worst[0], 2)}
    out["rel_volume_error"] = {k: {"mean_abs": round(float(np.nanmean([e for e, _ in v])), 4),
                                   "worst": {"patient": max(v)[1], "abs": round(max(v)[0], 4)}}
                               for k, v in vol_err.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "acdc"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "clinical.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pairs = patients(load_val_volumes(args.data, 2))
    truth = {p: {"ED": counts(ed[1]), "ES": counts(es[1])} for p, ed, es in pairs}
    result = {"device": "cpu", "device_name": platform.processor() or platform.machine(), "threads": args.threads,
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "data": args.data,
              "protocol": "ED = frame01, ES = the other frame of each val.list patient; volumes as voxel counts "
                          "(the h5 files hold no voxel size); EF in percentage points; relative volume error = "
                          "(predicted - true) / true",
              "n_patients": len(pairs), "truth": truth, "models": {}}
    for name in MODELS:
        base = Predictor.from_checkpoint(ROOT / "models" / f"{name}.pt", clean=False)
        raw = {p: {ph: base.predict(v[0]) for ph, v in (("ED", ed), ("ES", es))} for p, ed, es in pairs}
        flip = replace(base, tta=True)
        tta = {p: {ph: flip.predict(v[0]) for ph, v in (("ED", ed), ("ES", es))} for p, ed, es in pairs}
        cleaned = replace(base, clean=True)
        res = {}
        for key, labs in (("plain", raw), ("clean", raw), ("tta+clean", tta)):
            if key != "plain":
                labs = {p: {ph: cleaned.finish(lab) for ph, lab in d.items()} for p, d in labs.items()}
            res[key] = evaluate(pairs, truth, {p: {ph: counts(lab) for ph, lab in d.items()} for p, d in labs.items()})
            r = res[key]
            print(f"{name:20s} {key:9s} LV EF MAE {r['LV_ef_mae_points']:.2f} (worst {r['LV_ef_worst']}), "
                  f"RV EF MAE {r['RV_ef_mae_points']:.2f} (worst {r['RV_ef_worst']})", flush=True)
        result["models"][f"models/{name}.pt"] = res
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
