"""Does the CPU fast path (bf16 autocast + channels_last) cost accuracy?

Short real-ACDC M³HL runs (7 labeled patients, the CPU comparison budget's
128², batch 8, a poly learning-rate decay so the end point is settled) in
plain fp32 (contiguous) and in the fast path, with the same seeds. Each run
ends with the student and the EMA teacher scored on the 20 validation
volumes (fp32 inference for both, so only the training precision differs).
Each run also records the share of its wall time spent making batches
(reading slices + augmentation: the time the step waits for data, issue 11
item 5). One torch thread per run; the two paths of a seed run side by side
so they see the same machine load.

    python benchmarks/precision_accuracy.py [--seeds 1 2 3] [--iterations 400]
    python benchmarks/precision_accuracy.py --run-one fast:1   # internal: one run, JSON on stdout

Writes ``benchmarks/results/precision_accuracy.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "acdc"
PATHS = {
    "fp32": {"precision": "fp32", "channels_last": False},
    "fast": {"precision": "auto", "channels_last": True},
}


def run_one(path: str, seed: int, iterations: int, data_root: str) -> dict:
    import torch

    from napari_m3hl.training import events as ev
    from napari_m3hl.training import trainer
    from napari_m3hl.io.checkpoint import trained_models
    from napari_m3hl.config import load_preset
    from napari_m3hl.data import load_train_data, load_val_volumes
    from napari_m3hl.runtime import resolve_precision

    torch.set_num_threads(1)
    cfg = load_preset("acdc_unet2d", "reference", patch_size=(128, 128), block_size=(32, 32), batch_size=8,
                      iterations=iterations, lr_schedule="poly", seed=seed, device="cpu", val_every=0,
                      checkpoint_every=0, **PATHS[path])
    data = load_train_data(data_root, labeled_patients=7)
    val = load_val_volumes(data_root, 2)
    data_s = [0.0]
    make = trainer._make_batch

    def timed_make(*a, **k):  # wall time the step waits for its batch
        t = time.perf_counter()
        try:
            return make(*a, **k)
        finally:
            data_s[0] += time.perf_counter() - t

    trainer._make_batch = timed_make
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        for e in trainer.train(cfg, data, tmp):
            if isinstance(e, ev.Progress) and e.iteration % 50 == 0:
                loads.append(os.getloadavg()[0])
            if isinstance(e, ev.TrainFinished):
                final = e.checkpoint
        train_s = time.perf_counter() - t0
        student, teacher = trained_models(final)
    fp32_cfg = cfg.replace(precision="fp32")
    s_mean, s_cls = trainer._validate(student, val, fp32_cfg, torch.device("cpu"))
    t_mean, t_cls = trainer._validate(teacher, val, fp32_cfg, torch.device("cpu"))
    return {
        "path": path, "seed": seed, "iterations": iterations,
        "autocast": str(resolve_precision(cfg.precision, torch.device("cpu"))), "channels_last": cfg.channels_last,
        "student_dice": round(100 * s_mean, 2), "teacher_dice": round(100 * t_mean, 2),
        "student_per_class": {k: round(100 * v, 2) for k, v in s_cls.items()},
        "train_s": round(train_s, 1), "s_per_iteration": round(train_s / iterations, 4),
        "data_wait_s": round(data_s[0], 1), "data_wait_share": round(data_s[0] / train_s, 4),
        "load_average_1min": [round(x, 2) for x in loads], "n_val": len(val),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--iterations", type=int, default=400)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "precision_accuracy.json"))
    ap.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_one:
        path, seed = args.run_one.split(":")
        print(json.dumps(run_one(path, int(seed), args.iterations, args.data)))
        return 0
    if not (Path(args.data) / "train_slices.list").is_file():
        print(f"no ACDC data at {args.data}", file=sys.stderr)
        return 1
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    rows = []
    for seed in args.seeds:
        procs = [subprocess.Popen([sys.executable, __file__, "--run-one", f"{p}:{seed}", "--iterations",
                                   str(args.iterations), "--data", args.data], stdout=subprocess.PIPE, env=env, text=True)
                 for p in PATHS]
        for proc in procs:
            out, _ = proc.communicate()
            if proc.returncode:
                raise SystemExit(f"a run failed (exit {proc.returncode})")
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for p in PATHS:
        r = [x for x in rows if x["path"] == p]
        summary[p] = {k: {"mean": round(statistics.mean(x[k] for x in r), 2), "min": min(x[k] for x in r),
                          "max": max(x[k] for x in r)} for k in ("student_dice", "teacher_dice", "s_per_iteration",
                                                                 "data_wait_share")}
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu_count": os.cpu_count(), "threads_per_run": 1,
              "setting": "ACDC, 7 labeled patients, reference variant, 128², batch 8, poly lr, scored on the "
                         "validation volumes with fp32 inference", "paths": PATHS, "rows": rows, "summary": summary}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
