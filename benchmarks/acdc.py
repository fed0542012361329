"""ACDC benchmark: supervised-only, M³HL (paper / reference variants), the two
ablations and the fully supervised ceiling, on the shared ACDC data.

Every method trains the 2D U-Net with the same budget (input size, batch,
iterations, seed), is validated every ``val_every`` iterations on the 20
validation volumes (student, mean Dice; ``best.pt`` kept), and the best
student is then scored on all 20 validation volumes per class with Dice,
Jaccard, HD95 and ASD in the papers' conventions (pixels; a class missing
from the prediction scores 0 on all four metrics).

NOTE: the 20 test patients of the standard split are not in the shared data,
so checkpoint selection and the final scores use the SAME validation
patients. That flatters every row in the same way; the numbers are not test
numbers and compare with the papers' Table 1 only loosely.

Each method runs in its own process (a crash loses only that method) and
writes ``benchmarks/results/acdc/<method>.json``; the combined
``benchmarks/results/acdc.json`` and the markdown table
``benchmarks/results/acdc.md`` are rebuilt from those files.

    python benchmarks/acdc.py --budget cpu                    # all methods, one after another
    python benchmarks/acdc.py --budget cpu --methods sup7 m3hl_paper --merge
    python benchmarks/acdc.py --merge                         # only rebuild table from results/acdc/*.json
    python benchmarks/acdc.py --budget cpu --methods m3hl_paper --set lr=0.01 --suffix lr1e-2 --merge

A result becomes a shipped model (``models/<name>.pt`` + card) with
``scripts/ship_model.py``.

Budgets:
  cpu   : 128×128 input, batch 8 (4 labeled + 4 unlabeled), 1,200 iterations,
          mask blocks 32×32 (the paper's 4×4 grid), validation every 200
          iterations on all 20 validation volumes; 5-25 min per method on a
          shared 2-core machine (two methods at a time, one thread each).
  paper : 256×256, batch 24, 30,000 iterations, blocks 64×64, validation every
          200 iterations (the published protocol; meant for a GPU, not run here).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PER_METHOD = RESULTS / "acdc"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "acdc"

BUDGETS = {
    "cpu": {"patch_size": [128, 128], "batch_size": 8, "iterations": 1200, "block_size": [32, 32], "val_every": 200},
    "paper": {"patch_size": [256, 256], "batch_size": 24, "iterations": 30000, "block_size": [64, 64], "val_every": 200},
    # the paper's input, batch and blocks at a GPU session's budget (benchmarks/acdc_gpu.py sets --iterations)
    "gpu": {"patch_size": [256, 256], "batch_size": 24, "iterations": 3000, "block_size": [64, 64], "val_every": 250},
}
# One preprocessing for every row, so that rows differ in the method only (the
# reference variant alone would otherwise resize nearest-neighbour).
COMMON = {"image_interp": "bilinear"}

# Learning rate of the supervised rows: the SSL4MIS / reference-code baseline (0.01).
SUP_LR = 0.01

# name -> (label, variant, labeled patients, overrides). ``variant None`` = the
# ablation variant chosen on the command line (--ablation-variant).
METHODS: dict[str, tuple[str, str | None, int, dict]] = {
    "sup7": ("Supervised only, 7 patients", "paper", 7, {"mode": "supervised", "lr": SUP_LR}),
    "m3hl_paper": ("M³HL, paper variant", "paper", 7, {}),
    "m3hl_reference": ("M³HL, reference-code variant", "reference", 7, {}),
    "m3hl_fast": ("M³HL, fast recipe (warm start, poly)", "fast", 7, {}),
    "m3_only": ("M³ only (no HL)", None, 7, {"use_hl": False}),
    "hl_only": ("HL only (no mix)", None, 7, {"use_mix": False}),
    "sup70": ("Fully supervised, 70 patients (ceiling)", "paper", 70, {"mode": "supervised", "lr": SUP_LR}),
}
ORDER = list(METHODS)

PAPER_ROWS = [  # M³HL paper, Table 1 (ACDC, 10 % = 7 labeled patients; TEST set, 256², 30k iterations)
    ("Paper Table 1: SupOnly (7 patients)", 79.41, 68.11, 9.35, 2.70),
    ("Paper Table 1: M³HL (7 patients)", 90.47, 83.23, 1.43, 0.34),
]


def machine_info() -> dict:
    import torch

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count()
    return {"nproc": nproc, "cpu_model": model or platform.processor(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform(), "cuda": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _parse_sets(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        k, _, v = item.partition("=")
        out[k.strip()] = yaml.safe_load(v)
    return out


def method_config(method: str, budget: str, ablation_variant: str, extra: dict, seed: int):
    from napari_m3hl.config import load_preset

    label, variant, labeled, over = METHODS[method]
    variant = variant or ablation_variant
    cfg = load_preset("acdc_unet2d", variant, **{**BUDGETS[budget], **COMMON, **over, **extra, "seed": seed, "device": "cpu"
                                                 if budget == "cpu" else "auto", "checkpoint_every": 0})
    return cfg, label, variant, labeled


# ----------------------------------------------------------------- one method (child process)
def run_one(args: argparse.Namespace) -> int:
    import torch

    from napari_m3hl.training import events as ev
    from napari_m3hl.io.checkpoint import load_checkpoint
    from napari_m3hl.data import load_train_data, load_val_volumes
    from napari_m3hl.metrics.labelmaps import format_table
    from napari_m3hl.inference.predictor import Predictor
    from napari_m3hl.runtime import resolve_device, tune_malloc
    from napari_m3hl.training.trainer import TrainControl, train

    tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    method = args.run_one
    key = method + (f"@{args.suffix}" if args.suffix else "")
    extra = _parse_sets(args.set)
    cfg, label, variant, labeled = method_config(method, args.budget, args.ablation_variant, extra, args.seed)
    if args.iterations:
        cfg = cfg.replace(iterations=args.iterations, val_every=min(cfg.val_every, args.iterations))
    if args.val_every:
        cfg = cfg.replace(val_every=args.val_every)
    if args.suffix:
        label += f" [{', '.join(f'{k}={v}' for k, v in extra.items()) or args.suffix}]"
    data = load_train_data(args.data, labeled_patients=labeled)
    val = load_val_volumes(args.data)
    sel = val[: args.val_subset] if args.val_subset else val
    out = Path(args.out) / key.replace("@", "_")
    date = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    print(f"[{key}] {label}: variant {variant}, {len(data.labeled)} labeled / {len(data.unlabeled)} unlabeled slices, "
          f"{cfg.iterations} it, batch {cfg.batch_size}, {tuple(cfg.patch_size)}, lr {cfg.lr}, out {out}", flush=True)
    history = []
    pl_curve = []
    t0 = time.perf_counter()
    val_s = 0.0
    last_v = None
    finished = None
    last_print = 0.0
    control = TrainControl()  # SIGTERM (an orchestrator's deadline) ends the run early, scored and written
    signal.signal(signal.SIGTERM, lambda *_: control.stop())
    for e in train(cfg, data, out, val_volumes=sel, control=control):
        if isinstance(e, ev.Progress):
            if e.elapsed_s - last_print > 30 or e.iteration == e.total_iterations:
                last_print = e.elapsed_s
                print(f"  it {e.iteration}/{e.total_iterations} " + " ".join(f"{k}={v:.3f}" for k, v in e.losses.items())
                      + f" {e.images_per_s:.1f} img/s elapsed {e.elapsed_s:.0f}s", flush=True)
            last_v = time.perf_counter()
        elif isinstance(e, ev.Validation):
            val_s += time.perf_counter() - (last_v or time.perf_counter())
            history.append({"iteration": e.iteration, "mean_dice": e.mean_dice, "per_class": e.per_class,
                            "best": e.best})
            print(f"  val @{e.iteration}: {100 * e.mean_dice:.2f}" + (" (best)" if e.best else "") + "  "
                  + " ".join(f"{k} {100 * v:.2f}" for k, v in e.per_class.items()), flush=True)
        elif isinstance(e, ev.PseudoLabelQuality):
            pl_curve.append({"iteration": e.iteration, **e.scores})
        elif isinstance(e, ev.TrainFinished):
            finished = e
    train_wall = time.perf_counter() - t0
    best_path = finished.best_checkpoint or finished.checkpoint
    # final scoring of the best student on all validation volumes
    t1 = time.perf_counter()
    ckpt = load_checkpoint(best_path)
    # the one prediction path `m3hl evaluate` uses (input resizing as the checkpoint was trained)
    device = str(resolve_device(cfg.device))
    summary, per_case = Predictor.from_checkpoint(ckpt, "student", device, clean=False).score(val, empty_convention="paper")
    teacher_last = None
    last = Path(best_path).with_name("last.pt")
    if last.is_file():
        t_summary, _ = Predictor.from_checkpoint(load_checkpoint(last), "teacher", device, clean=False).score(
            val, empty_convention="paper")
        teacher_last = {"iteration": int(finished.iteration), "which": "teacher", "summary": t_summary}
    score_s = time.perf_counter() - t1
    print(format_table(summary), flush=True)
    result = {
        "key": key, "method": method, "label": label, "variant": variant, "budget": args.budget,
        "labeled_patients": labeled, "n_labeled_slices": len(data.labeled), "n_unlabeled_slices": len(data.unlabeled),
        "config": cfg.to_dict(), "extra_overrides": extra,
        "iterations": finished.iteration, "train_wall_s": round(train_wall, 1),
        "validation_wall_s": round(val_s, 1), "scoring_wall_s": round(score_s, 1),
        "iterations_per_s": round(finished.iteration / max(train_wall - val_s, 1e-9), 3),
        "iterations_per_s_incl_validation": round(finished.iteration / train_wall, 3),
        "date": date, "machine": machine_info(),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "selection": {"volumes": len(sel), "every": cfg.val_every, "best_iteration": int(ckpt["iteration"]),
                      "best_val_mean_dice": max((h["mean_dice"] for h in history), default=None)},
        "history": history, "best_checkpoint": str(best_path), "summary": summary, "cases": per_case,
        "teacher_last": teacher_last, "pseudo_label_curve": pl_curve, "scored_on": device,
        "stopped_early": bool(finished.stopped),
        "note": "selection and scoring use the same 20 validation volumes (the test patients are absent)",
    }
    PER_METHOD.mkdir(parents=True, exist_ok=True)
    dest = PER_METHOD / f"{key.replace('@', '_')}.json"
    dest.write_text(json.dumps(result, indent=2, default=float))
    print(f"[{key}] wrote {dest} ({train_wall / 60:.1f} min training)", flush=True)
    return 0


def score_checkpoint(path: str | Path, which: str, data: str) -> dict:
    """``summarize`` of one checkpoint's student or teacher on all validation volumes."""
    from napari_m3hl.io.checkpoint import load_checkpoint
    from napari_m3hl.data import load_val_volumes
    from napari_m3hl.inference.predictor import Predictor

    ckpt = load_checkpoint(path)
    summary, _ = Predictor.from_checkpoint(ckpt, which, "cpu", clean=False).score(load_val_volumes(data), empty_convention="paper")
    return {"iteration": int(ckpt["iteration"]), "which": which, "summary": summary}


def score_teacher(key: str, data: str) -> int:
    """Add the EMA teacher of the run's last iteration (last.pt, not selected on
    validation) to the per-method result: a diagnostic column of the table."""
    path = PER_METHOD / f"{key.replace('@', '_')}.json"
    r = json.loads(path.read_text())
    last = Path(r["best_checkpoint"]).with_name("last.pt")
    r["teacher_last"] = score_checkpoint(last, "teacher", data)
    path.write_text(json.dumps(r, indent=2, default=float))
    print(f"[{key}] EMA teacher @ {r['teacher_last']['iteration']}: mean Dice "
          f"{100 * r['teacher_last']['summary']['mean']['dice']:.2f}")
    return 0


def salvage(key: str, args: argparse.Namespace) -> int:
    """Result of a run stopped before its last iteration (e.g. out of time):
    the validation history from its log, the best.pt saved so far scored on
    all validation volumes, and ``incomplete`` set. The row says so."""
    import re

    method = key.split("@", 1)[0]
    stem = key.replace("@", "_")
    log = (Path(args.out) / f"{stem}.log").read_text()
    extra = _parse_sets(args.set)
    cfg, label, variant, labeled = method_config(method, args.budget, args.ablation_variant, extra, args.seed)
    history, last_it, elapsed = [], 0, 0.0
    for line in log.splitlines():
        m = re.match(r"\s+val @(\d+): ([\d.]+)( \(best\))?\s+RV ([\d.]+) Myo ([\d.]+) LV ([\d.]+)", line)
        if m:
            history.append({"iteration": int(m[1]), "mean_dice": float(m[2]) / 100, "best": bool(m[3]),
                            "per_class": {"RV": float(m[4]) / 100, "Myo": float(m[5]) / 100, "LV": float(m[6]) / 100}})
        m = re.match(r"\s+it (\d+)/\d+ .* elapsed (\d+)s", line)
        if m:
            last_it, elapsed = int(m[1]), float(m[2])
    if "@" in key and not extra:
        label += f" [{key.split('@', 1)[1]}]"
    best = Path(args.out) / stem / "best.pt"
    sc = score_checkpoint(best, "student", args.data)
    date = _dt.datetime.fromtimestamp(best.stat().st_mtime).astimezone().isoformat(timespec="seconds")
    from napari_m3hl.data.acdc import acdc_split

    lab, unl = acdc_split(args.data, labeled_patients=labeled)
    result = {
        "key": key, "method": method, "label": label + f" (stopped at {last_it}/{cfg.iterations} it.)",
        "variant": variant, "budget": args.budget, "labeled_patients": labeled,
        "n_labeled_slices": len(lab), "n_unlabeled_slices": len(unl), "config": cfg.to_dict(),
        "extra_overrides": extra, "iterations": last_it, "incomplete": True,
        "train_wall_s": elapsed, "validation_wall_s": None, "scoring_wall_s": None,
        "iterations_per_s": round(last_it / max(elapsed, 1e-9), 3), "date": date, "machine": machine_info(),
        "command": "salvaged from " + str(Path(args.out) / f"{stem}.log"),
        "selection": {"volumes": 20, "every": cfg.val_every, "best_iteration": sc["iteration"],
                      "best_val_mean_dice": max((h["mean_dice"] for h in history), default=None)},
        "history": history, "best_checkpoint": str(best), "summary": sc["summary"],
        "note": "run stopped before the end (time); selection and scoring use the same 20 validation volumes",
    }
    (PER_METHOD / f"{stem}.json").write_text(json.dumps(result, indent=2, default=float))
    print(f"[{key}] salvaged at iteration {last_it}: best {sc['iteration']}, "
          f"mean Dice {100 * sc['summary']['mean']['dice']:.2f}")
    return 0


# ----------------------------------------------------------------- table
def _row(r: dict) -> str:
    m = r["summary"]["mean"]
    cls = {c["name"]: c["dice"]["mean"] for c in r["summary"]["classes"]}
    return (f"| {r['label']} | {r['labeled_patients']} | {100 * m['dice']:.2f} | {100 * m['jaccard']:.2f} | "
            f"{m['hd95']:.2f} | {m['asd']:.2f} | {100 * cls.get('RV', float('nan')):.1f} / "
            f"{100 * cls.get('Myo', float('nan')):.1f} / {100 * cls.get('LV', float('nan')):.1f} | "
            f"{r['selection']['best_iteration']} | {_teacher(r)} | {r['train_wall_s'] / 60:.1f} | "
            f"{r['iterations_per_s']:.2f} |")


def _teacher(r: dict) -> str:
    t = r.get("teacher_last")
    return f"{100 * t['summary']['mean']['dice']:.2f}" if t else ""


def build_table(results: list[dict], with_paper: bool = True) -> str:
    head = ("| Method | Labeled patients | Dice (%) | Jaccard (%) | HD95 (px) | ASD (px) | Dice RV / Myo / LV | "
            "best it. | EMA teacher @last, Dice | train min | it/s |\n|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    lines = [head] + [_row(r) for r in results]
    if with_paper:
        for name, d, j, h, a in PAPER_ROWS:
            lines.append(f"| *{name}* | 7 | *{d:.2f}* | *{j:.2f}* | *{h:.2f}* | *{a:.2f}* | | | | | |")
    return "\n".join(lines)


def curve_table(results: list[dict]) -> str:
    """Validation mean Dice (%) of the student at every validation, per method."""
    its = sorted({h["iteration"] for r in results for h in r["history"]})
    lines = ["| Method | " + " | ".join(str(i) for i in its) + " |", "|---|" + "---:|" * len(its)]
    for r in results:
        d = {h["iteration"]: h["mean_dice"] for h in r["history"]}
        lines.append(f"| {r['label']} | " + " | ".join(f"{100 * d[i]:.1f}" if i in d else "" for i in its) + " |")
    return "\n".join(lines)


def _sort_key(r: dict):
    base = r["method"]
    return (ORDER.index(base) if base in ORDER else len(ORDER), r["key"])


def rebuild(keys: list[str] | None = None) -> list[dict]:
    results = []
    for p in sorted(PER_METHOD.glob("*.json")):
        r = json.loads(p.read_text())
        if keys is None or r["key"] in keys:
            results.append(r)
    results.sort(key=_sort_key)
    if not results:
        print("no per-method result in", PER_METHOD)
        return results
    compact = []
    for r in results:
        c = {k: v for k, v in r.items() if k != "cases"}
        compact.append(c)
    combined = {
        "benchmark": "ACDC 2D, 20 validation volumes (selection and scoring on the same volumes; test set absent)",
        "metrics": "Dice/Jaccard fractions, HD95/ASD in pixels; class missing from prediction = 0 on all metrics",
        "built": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "paper_table1": [dict(zip(("row", "dice", "jaccard", "hd95", "asd"), p)) for p in PAPER_ROWS],
        "results": compact,
    }
    (RESULTS / "acdc.json").write_text(json.dumps(combined, indent=2, default=float))
    md = build_table(results) + "\n\n" + curve_table(results)
    (RESULTS / "acdc.md").write_text(md + "\n")
    print(md)
    return results


# ----------------------------------------------------------------- orchestrator
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    p.add_argument("--methods", nargs="*", default=None, choices=ORDER, help=f"subset of {ORDER} (default all)")
    p.add_argument("--merge", action="store_true",
                   help="table from every result present in benchmarks/results/acdc/ (not only this run's)")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--out", default=str(ROOT / "runs" / "acdc_bench"), help="checkpoints and logs (git-ignored)")
    p.add_argument("--ablation-variant", default="paper", help="variant the M³-only / HL-only rows use")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra TrainConfig override")
    p.add_argument("--suffix", default="", help="name suffix for a run with --set overrides (a separate row)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--iterations", type=int, default=None, help="override the budget's iterations (smoke tests)")
    p.add_argument("--val-every", type=int, default=None, help="override the budget's validation period")
    p.add_argument("--val-subset", type=int, default=None, help="validate during training on the first N volumes only")
    p.add_argument("--threads", type=int, default=None, help="torch threads per method process")
    p.add_argument("--jobs", type=int, default=1, help="methods run at the same time (each its own process)")
    p.add_argument("--score-teacher", default=None, metavar="KEY",
                   help="score result KEY's EMA teacher at the last iteration and add it to its JSON")
    p.add_argument("--salvage", default=None, metavar="KEY",
                   help="write the result of a stopped run from its log and best.pt (marked incomplete)")
    p.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_one:
        return run_one(args)
    if args.salvage:
        salvage(args.salvage, args)
        rebuild()
        return 0
    if args.score_teacher:
        score_teacher(args.score_teacher, args.data)
        rebuild()
        return 0
    if args.methods is None and args.merge and not args.set:
        rebuild()
        return 0
    methods = args.methods or ORDER
    log_dir = Path(args.out)
    log_dir.mkdir(parents=True, exist_ok=True)
    keys = [m + (f"@{args.suffix}" if args.suffix else "") for m in methods]
    pending = list(methods)
    running: list[tuple[str, subprocess.Popen, float]] = []
    failed = []
    while pending or running:
        while pending and len(running) < args.jobs:
            m = pending.pop(0)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--run-one", m, "--budget", args.budget,
                   "--data", args.data, "--out", args.out, "--ablation-variant", args.ablation_variant,
                   "--seed", str(args.seed)]
            for s in args.set:
                cmd += ["--set", s]
            for opt, val in (("--suffix", args.suffix), ("--iterations", args.iterations), ("--val-every", args.val_every),
                             ("--val-subset", args.val_subset), ("--threads", args.threads)):
                if val:
                    cmd += [opt, str(val)]
            log = log_dir / f"{m}{'_' + args.suffix if args.suffix else ''}.log"
            print(f"start {m}: log {log}", flush=True)
            running.append((m, subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT),
                            time.time()))
        time.sleep(2)
        for item in list(running):
            m, proc, t = item
            if proc.poll() is not None:
                running.remove(item)
                status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                print(f"done {m}: {status} after {(time.time() - t) / 60:.1f} min", flush=True)
                if proc.returncode:
                    failed.append(m)
    rebuild(None if args.merge else keys)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
