"""LA benchmark (3D V-Net, left atrium): supervised-only vs M³HL on the shared LA cases.

The shared LA folder holds 16 of the 80 training cases (``train.list``); the
first 8 are the labeled cases of the "10 % labeled" protocol. There is no
validation or test split here, so this script holds cases out:

* labeled   : ``train.list`` entries 1-8 (the protocol's labeled cases);
* unlabeled : entries 9-12 (M³HL only);
* scored    : entries 13-16, used by no training run (neither labeled nor
  unlabeled) and not used to pick a checkpoint: the last student and the
  last EMA teacher of each run are scored.

Methods (all from the ``la_vnet3d`` preset, ``reference`` variant, same
seed, same budget):

* ``sup``        : supervised-only on the 8 labeled cases (batch/2 labeled
  crops per step, as the baseline of the ACDC benchmark);
* ``m3hl``       : M³HL with the real 3D block mix (our mask generator);
* ``m3hl_nomix`` : M³HL with ``mask_ratio = 0`` so that the mask is constant
  (M = 1 everywhere): what the released LA code trained, since its 3D mask
  generator never wrote the per-sample masks into the batch mask. With a
  constant mask one mixed batch is pure unlabeled images with their
  pseudo-labels (weight α) and the other pure labeled images with their
  labels; an all-zero mask gives the same thing with the halves swapped.

Scoring follows the LA protocol of ``shared/docs/reference-protocol.md``:
sliding window of the training patch, foreground probability > 0.5, largest
3D connected component, Dice / Jaccard / HD95 / ASD in voxels (medpy
conventions, :mod:`napari_m3hl.metrics.labelmaps`). The CPU budget uses a smaller
patch, so its stride is scaled too (half the patch), which the JSON records.

Budgets:
  cpu   : patch 64×64×48, batch 4 (2 labeled + 2 unlabeled), blocks 16×16×12
          (the paper's 4×4×4 grid), 250 iterations, lr 0.01 constant, stride
          48×48×32 (36 windows per case). One thread: an M³HL step takes
          about 1.5 s on an idle core of the 2-core machine here; on the
          shared machine (load 5 to 15) it took 5.8 s and the supervised step
          2.6 s, so sup + m3hl took 41 min with scoring (m3hl_nomix not run).
  paper : patch 112×112×80, batch 8, blocks 28×28×20, 15,000 iterations,
          lr 0.01 ×0.1 every 2,500 (the released script's schedule), stride
          18×18×4 (meant for a GPU; not run here).

    python benchmarks/la.py --budget cpu                 # all three methods, one after another
    python benchmarks/la.py --methods sup m3hl           # a subset
    python benchmarks/la.py --merge                      # rebuild la.json + table from results/la/*.json

Writes ``benchmarks/results/la/<method>.json``, the combined
``benchmarks/results/la.json`` and ``benchmarks/results/la.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "la"
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("sup", "m3hl", "m3hl_nomix")
LABELS = {"sup": "Supervised only (8 labeled)", "m3hl": "M³HL, real 3D mix (ours)",
          "m3hl_nomix": "M³HL, constant mask (the released LA code)"}
BUDGETS = {
    "cpu": {"patch_size": [64, 64, 48], "batch_size": 4, "block_size": [16, 16, 12], "iterations": 250,
            "lr": 0.01, "lr_schedule": "constant", "stride": [48, 48, 32]},
    "paper": {"patch_size": [112, 112, 80], "batch_size": 8, "block_size": [28, 28, 20], "iterations": 15000,
              "lr": 0.01, "lr_schedule": "step", "lr_step": 2500, "stride": [18, 18, 4]},
}
SPLIT = {"labeled": (0, 8), "unlabeled": (8, 12), "scored": (12, 16)}


def machine_info() -> dict:
    import torch

    model = ""
    try:
        model = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                     if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"nproc": len(os.sched_getaffinity(0)), "cpu_model": model or platform.processor(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "cuda": torch.cuda.is_available()}


def split_names(data: Path) -> dict[str, list[str]]:
    from napari_m3hl.data.cached import read_list

    names = read_list(data / "train.list")
    if len(names) < SPLIT["scored"][1]:
        sys.exit(f"{data}/train.list lists {len(names)} cases; this benchmark needs {SPLIT['scored'][1]}")
    return {k: names[a:b] for k, (a, b) in SPLIT.items()}


def run_method(method: str, budget: str, data: Path, out: Path, seed: int, device: str) -> dict:
    import numpy as np
    from dataclasses import replace

    import torch

    from napari_m3hl.config import load_preset
    from napari_m3hl.labels import LA_CLASSES
    from napari_m3hl.data.la import LACases
    from napari_m3hl.data.types import TrainData
    from napari_m3hl.metrics.labelmaps import evaluate_case, summarize
    from napari_m3hl.inference.predictor import Predictor
    from napari_m3hl.io.checkpoint import trained_models
    from napari_m3hl.training.trainer import train

    b = dict(BUDGETS[budget])
    stride = b.pop("stride")
    over = dict(b, seed=seed, device=device, val_every=0, checkpoint_every=0,
                mode="supervised" if method == "sup" else "m3hl")
    if method == "m3hl_nomix":
        over["mask_ratio"] = 0.0
    config = load_preset("la_vnet3d", "reference", **over)
    split = split_names(data)
    train_data = TrainData(LACases(data, split["labeled"], True), LACases(data, split["unlabeled"], False),
                           ndim=3, num_classes=2, class_names=LA_CLASSES)
    run_dir = out / method
    t0 = time.perf_counter()
    loads, finished, last_losses = [], None, {}
    for e in train(config, train_data, run_dir):
        name = type(e).__name__
        if name == "Progress":
            last_losses = e.losses
            if e.iteration % 50 == 0:
                loads.append(os.getloadavg()[0])
                print(f"  {method} {e.iteration}/{e.total_iterations} " +
                      " ".join(f"{k}={v:.3f}" for k, v in e.losses.items()), flush=True)
        elif name == "TrainFinished":
            finished = e
    train_s = time.perf_counter() - t0
    student, teacher = trained_models(finished.checkpoint, device)
    scored = LACases(data, split["scored"], True)
    scores: dict[str, dict] = {}
    t1 = time.perf_counter()
    networks = (("student", student),) if method == "sup" else (("student", student), ("teacher", teacher))
    for which, model in networks:  # the supervised run's EMA teacher is not a method of its own
        predictor = replace(Predictor.from_network(model, config, which, device=device), stride=tuple(stride),
                            clean=True)
        cases, per_case = [], {}
        for i, name in enumerate(scored.names):
            image, label = scored[i]
            with torch.no_grad():
                pred = predictor.predict(image)
            m = evaluate_case(pred, label, 2)
            cases.append(m)
            per_case[name] = {k: float(v) for k, v in vars(m[1]).items() if isinstance(v, (int, float, np.floating))}
        scores[which] = {"summary": summarize(cases, LA_CLASSES), "cases": per_case}
    return {
        "method": method, "label": LABELS[method], "budget": budget, "seed": seed,
        "config": config.to_dict(), "stride": stride, "split": split,
        "train_seconds": round(train_s, 1), "score_seconds": round(time.perf_counter() - t1, 1),
        "s_per_iteration": round(train_s / config.iterations, 3), "final_losses": last_losses,
        "loadavg_1min_during_training": loads, "loadavg_end": list(os.getloadavg()),
        "machine": machine_info(), "scores": scores,
    }


def _fmt(summary: dict) -> str:
    m = summary["mean"]
    return f"{100 * m['dice']:.2f} | {100 * m['jaccard']:.2f} | {m['hd95']:.2f} | {m['asd']:.2f}"


def build_table(results: list[dict]) -> str:
    lines = ["| method | network | Dice % | Jaccard % | 95HD (vox) | ASD (vox) | train s (s/it) | mean load |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        load = r["loadavg_1min_during_training"]
        mean_load = f"{sum(load) / len(load):.1f}" if load else "n/a"
        for which in ("student", "teacher"):
            if which not in r["scores"]:
                continue
            lines.append(f"| {r['label']} | {which} | {_fmt(r['scores'][which]['summary'])} | "
                         f"{r['train_seconds']:.0f} ({r['s_per_iteration']:.2f}) | {mean_load} |")
    return "\n".join(lines) + "\n"


def merge() -> list[dict]:
    results = []
    for m in METHODS:
        p = RESULTS / "la" / f"{m}.json"
        if p.is_file():
            results.append(json.loads(p.read_text()))
    (RESULTS / "la.json").write_text(json.dumps({"results": results}, indent=2, default=float))
    (RESULTS / "la.md").write_text(build_table(results))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    p.add_argument("--methods", nargs="*", choices=METHODS, default=list(METHODS))
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--out", default=str(ROOT / "runs" / "la_bench"), help="checkpoints (git-ignored)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared CPU)")
    p.add_argument("--iterations", type=int, default=None, help="override the budget's iterations (smoke test)")
    p.add_argument("--merge", action="store_true", help="only rebuild la.json / la.md from results/la/*.json")
    args = p.parse_args(argv)
    if not args.merge:
        import torch

        torch.set_num_threads(args.threads)
        data = Path(args.data)
        if not (data / "cases").is_dir():
            sys.exit(f"no LA data at {data} (expected cases/ and train.list); see shared/data/README.md")
        if args.iterations:
            BUDGETS[args.budget]["iterations"] = args.iterations
        (RESULTS / "la").mkdir(parents=True, exist_ok=True)
        for m in args.methods:
            print(f"{m}: training ({args.budget} budget)", flush=True)
            r = run_method(m, args.budget, data, Path(args.out), args.seed, args.device)
            (RESULTS / "la" / f"{m}.json").write_text(json.dumps(r, indent=2, default=float))
            print(m + ": " + "  ".join(f"{k} {_fmt(v['summary'])}" for k, v in r["scores"].items()), flush=True)
    print(build_table(merge()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
