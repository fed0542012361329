"""The few-slice loop on real ACDC validation volumes, through the few-slice engine path.

For each validation volume (its labels play the clinician) two slices are
"painted" by a rule, the start model is fine-tuned on them with
:mod:`napari_m3hl.fewslice.loop` (``prepare`` + ``run``, the code path of
``m3hl train --data IMG --labels PAINTED`` and of the widget's Train), and the start
model's and the fine-tuned model's segmentations are scored on the slices
that were NOT painted (3D Dice per class, ``napari_m3hl.metrics.labelmaps.dice``,
medpy conventions) and on the painted ones.

Painting rules:
  a: two slices at about a third and two thirds of the slices that show all
     three structures (RV, Myo, LV);
  b: two adjacent slices (the first third's slice and the next one), the
     worst case a hurried user produces.

Every ``--check-every`` iterations the engine segments the volume with the
EMA teacher and the student; both are scored, so one run at a constant
learning rate also gives the shorter budgets, teacher vs student, and what an
early stop would have returned. Results accumulate in
``benchmarks/results/fewslice.json`` under ``--name``; ``--report`` writes the
markdown table and ``docs/images/fewslice.svg`` from the JSON only.

    python benchmarks/fewslice.py --name sup_lr0.01 --volumes 4 --iterations 100
    python benchmarks/fewslice.py --report
    python benchmarks/fewslice.py --name gpu --volumes 20 --device cuda   # on a GPU: seconds per volume there

``--device`` sets the loop's device (``FewSliceOptions.device``; default its
own ``auto``); the run records the device and, on CUDA, the seconds of CUDA's
initialisation (process start), apart from each volume's seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from napari_m3hl.fewslice import loop as fs
from napari_m3hl.data.cached import read_list
from napari_m3hl.io.h5 import load_h5_volume
from napari_m3hl.metrics.binary import dice
from napari_m3hl.fewslice.safeguard import check_finetune

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("RV", "Myo", "LV")
STOP_THRESHOLDS = (0.01, 0.02, 0.03)


def painted_for(label: np.ndarray, rule: str) -> list[int]:
    """The two painted slice indices of a (D, H, W) label volume under ``rule``."""
    full = [z for z in range(label.shape[0]) if all((label[z] == c).any() for c in (1, 2, 3))]
    if len(full) < 2:
        full = [z for z in range(label.shape[0]) if label[z].any()]
    n = len(full)
    if rule == "a":
        i, j = int(round((n - 1) / 3)), int(round(2 * (n - 1) / 3))
        j = j if j != i else min(i + 1, n - 1)
        return sorted({full[i], full[j]})
    z = full[int(round((n - 1) / 3))]
    return [z, z + 1] if z + 1 < label.shape[0] else [z - 1, z]


def per_class(pred: np.ndarray, ref: np.ndarray, slices: np.ndarray) -> list[float]:
    """Dice of RV, Myo, LV over the sub-volume ``slices`` (3D, one value per class)."""
    return [float(dice(pred[slices] == c, ref[slices] == c)) for c in (1, 2, 3)]


def run_volume(name: str, image: np.ndarray, label: np.ndarray, rule: str, start: str,
               options: fs.FewSliceOptions) -> dict:
    sel = painted_for(label, rule)
    painted = np.zeros_like(label)
    painted[sel] = label[sel]
    on = np.asarray(sel)
    off = np.setdiff1d(np.arange(label.shape[0]), on)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    job = fs.prepare(start, image, painted, options)
    checks, result = [], None
    for e in fs.run(job):
        if isinstance(e, fs.Check):
            checks.append({"iteration": e.iteration, "change": e.instability,
                           "shown": per_class(e.labels, label, off),
                           **{net: per_class(lab, label, off) for net, lab in e.networks.items()},
                           "shown_painted": per_class(e.labels, label, on),
                           "verdict": _verdict(job, e.labels)})
        elif isinstance(e, fs.FewSliceResult):
            result = e
    wall = time.perf_counter() - t0
    base = per_class(job.base, label, off)
    tuned = per_class(result.labels, label, off)
    v = result.verdict
    shown = base if v.suspect else tuned  # what the user is offered: the start model's segmentation when suspect
    row = {"volume": name, "rule": rule, "painted": [int(z) for z in sel], "depth": int(label.shape[0]),
           "base": base, "tuned": tuned, "shown": shown, "base_painted": per_class(job.base, label, on),
           "tuned_painted": per_class(result.labels, label, on), "network": per_class(result.network, label, off),
           "iterations": result.iterations,
           "seconds_total": wall, "seconds_train": result.seconds, "load_before": load0,
           "load_after": os.getloadavg()[0], "suspect": v.suspect, "message": v.message, "checks": checks}
    print(f"{name} rule {rule} painted {sel}: base {100 * np.mean(base):.1f} tuned {100 * np.mean(tuned):.1f} "
          f"shown {100 * np.mean(shown):.1f} ({wall:.0f} s, load {load0:.1f}) {'SUSPECT ' if v.suspect else ''}", flush=True)
    return row


def _verdict(job: fs.FewSliceJob, labels: np.ndarray) -> dict:
    v = check_finetune(job.base, labels, job.painted, job.config.num_classes, tuple(job.config.class_names))
    return {"suspect": v.suspect, "painted_base": v.painted_base, "painted_tuned": v.painted_tuned,
            "change": v.drift, "expected": v.expected}


# ------------------------------------------------------------------ report
def _m(rows: list[dict], key: str) -> float:
    return 100 * float(np.mean([np.mean(r[key]) for r in rows])) if rows else float("nan")


def summarize(run: dict) -> dict:
    out = {}
    for rule in ("a", "b"):
        rows = [r for r in run["rows"] if r["rule"] == rule]
        if not rows:
            continue
        d = {k: _m(rows, k) for k in ("base", "tuned", "shown", "base_painted", "tuned_painted")}
        if all("network" in r for r in rows):  # the fine-tuned network alone (runs with a start blend)
            d["network"] = _m(rows, "network")
            d["network_worse_by_1"] = int(sum(np.mean(r["network"]) - np.mean(r["base"]) < -0.01 for r in rows))
        delta = [100 * (np.mean(r["tuned"]) - np.mean(r["base"])) for r in rows]
        dshown = [100 * (np.mean(r["shown"]) - np.mean(r["base"])) for r in rows]
        d.update(volumes=len(rows), worst_delta=float(min(delta)), worse_by_1=int(sum(x < -1 for x in delta)),
                 shown_worse_by_1=int(sum(x < -1 for x in dshown)), suspect=int(sum(r["suspect"] for r in rows)),
                 median_seconds=float(np.median([r["seconds_total"] for r in rows])),
                 median_load=float(np.median([r["load_before"] for r in rows])))
        by_it: dict[int, dict[str, list]] = {}
        for r in rows:
            for c in r["checks"]:
                for net in ("teacher", "student", "shown"):
                    if net in c:
                        by_it.setdefault(c["iteration"], {}).setdefault(net, []).append(np.mean(c[net]))
        d["by_iteration"] = {str(k): {net: 100 * float(np.mean(v)) for net, v in nets.items()}
                             for k, nets in sorted(by_it.items()) if all(len(v) == len(rows) for v in nets.values())}
        net = "shown" if "shown" in rows[0]["checks"][0] else run.get("options", {}).get("segment_with", "teacher")
        d["early_stop"] = {}
        for thr in STOP_THRESHOLDS:  # what an early stop at this change would have returned
            picks = [next((c for c in r["checks"] if c["change"] == c["change"] and c["change"] < thr), r["checks"][-1])
                     for r in rows]
            d["early_stop"][str(thr)] = {"dice": 100 * float(np.mean([np.mean(c[net]) for c in picks])),
                                         "iterations": float(np.mean([c["iteration"] for c in picks]))}
        out[rule] = d
    return out


def early_stop_table(results: dict) -> str:
    lines = ["| run | rule | no stop | " + " | ".join(f"stop at change < {t}" for t in STOP_THRESHOLDS) + " |",
             "|---|---|---|" + "---|" * len(STOP_THRESHOLDS)]
    for name, run in results["runs"].items():
        for rule, s in summarize(run).items():
            cells = " | ".join(f"{v['dice']:.1f} ({v['iterations']:.0f} it)" for v in s["early_stop"].values())
            lines.append(f"| {name} | {rule} | {s['tuned']:.1f} | {cells} |")
    return "\n".join(lines)


def table(results: dict) -> str:
    lines = ["| run | rule | volumes | start | network alone (vols < −1) | tuned | shown | worst Δ | "
             "vols < −1 (tuned / shown) | safeguard | painted start → tuned | median s (load) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, run in results["runs"].items():
        for rule, s in summarize(run).items():
            alone = f"{s['network']:.1f} ({s['network_worse_by_1']})" if "network" in s else "= tuned"
            lines.append(f"| {name} | {rule} | {s['volumes']} | {s['base']:.1f} | {alone} | {s['tuned']:.1f} | {s['shown']:.1f} | "
                         f"{s['worst_delta']:+.1f} | {s['worse_by_1']} / {s['shown_worse_by_1']} | {s['suspect']} | "
                         f"{s['base_painted']:.1f} → {s['tuned_painted']:.1f} | {s['median_seconds']:.0f} "
                         f"({s['median_load']:.1f}) |")
    return "\n".join(lines)


def iteration_table(results: dict) -> str:
    lines = ["| run | rule | iterations: teacher / student (/ shown: blended with the start) |", "|---|---|---|"]
    for name, run in results["runs"].items():
        for rule, s in summarize(run).items():
            cells = ", ".join(f"{k}: {v.get('teacher', float('nan')):.1f} / {v.get('student', float('nan')):.1f}"
                              + (f" / {v['shown']:.1f}" if "shown" in v else "") for k, v in s["by_iteration"].items())
            lines.append(f"| {name} | {rule} | {cells} |")
    return "\n".join(lines)


def svg_plot(run_name: str, run: dict, path: Path) -> None:
    """Base vs shown mean Dice per volume, one panel per rule (hand-written SVG)."""
    w, h, pad = 360, 320, 44
    vals = [float(np.mean(r[k])) for r in run["rows"] for k in ("base", "tuned", "network") if k in r]
    lo, hi = min(0.6, np.floor(min(vals, default=0.6) * 10) / 10), 1.0

    def xy(b: float, t: float, ox: int) -> tuple[float, float]:
        return (ox + pad + (b - lo) / (hi - lo) * (w - 2 * pad), h - pad - (t - lo) / (hi - lo) * (h - 2 * pad))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * w}" height="{h}" font-family="sans-serif" '
           f'font-size="12"><rect width="100%" height="100%" fill="white"/>']
    for k, rule in enumerate(("a", "b")):
        ox = k * w
        rows = [r for r in run["rows"] if r["rule"] == rule]
        x0, y0 = xy(lo, lo, ox)
        x1, y1 = xy(hi, hi, ox)
        out.append(f'<rect x="{x0}" y="{y1}" width="{x1 - x0}" height="{y0 - y1}" fill="none" stroke="#888"/>')
        out.append(f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y1}" stroke="#bbb" stroke-dasharray="4 3"/>')
        for v in np.arange(lo, hi + 1e-9, 0.1):
            xa, ya = xy(v, lo, ox)
            xb, yb = xy(lo, v, ox)
            out.append(f'<text x="{xa}" y="{ya + 14}" text-anchor="middle">{100 * v:.0f}</text>')
            out.append(f'<text x="{xb - 4}" y="{yb + 4}" text-anchor="end">{100 * v:.0f}</text>')
        title = "rule a: slices at 1/3 and 2/3" if rule == "a" else "rule b: two adjacent slices"
        out.append(f'<text x="{ox + w / 2}" y="16" text-anchor="middle" font-weight="bold">{title} ({len(rows)} volumes)</text>')
        out.append(f'<text x="{ox + w / 2}" y="{h - 6}" text-anchor="middle">start model, mean Dice (unpainted)</text>')
        out.append(f'<text x="{ox + 12}" y="{h / 2}" transform="rotate(-90 {ox + 12} {h / 2})" text-anchor="middle">'
                   f'fine-tuned, mean Dice (unpainted)</text>')
        for r in rows:
            if "network" in r:  # the fine-tuned network alone, before the blend with the start model
                nx, ny = xy(float(np.mean(r["base"])), float(np.mean(r["network"])), ox)
                out.append(f'<circle cx="{nx:.1f}" cy="{ny:.1f}" r="4" fill="none" stroke="#999">'
                           f'<title>{r["volume"]}: network alone {100 * np.mean(r["network"]):.1f}</title></circle>')
            cx, cy = xy(float(np.mean(r["base"])), float(np.mean(r["tuned"])), ox)
            color = "#d62728" if r["suspect"] else "#1f77b4"
            out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="{color}" fill-opacity="0.8">'
                       f'<title>{r["volume"]}: {100 * np.mean(r["base"]):.1f} → {100 * np.mean(r["tuned"]):.1f}</title></circle>')
    blend = any("network" in r for r in run["rows"])
    out.append(f'<text x="{w}" y="{h - 22}" text-anchor="middle" fill="#555">{run_name}; red: the safeguard fired '
               f'(the user is offered the start model)'
               + ("; hollow grey: the fine-tuned network alone, filled: blended with the start model (shown)" if blend else "")
               + '</text></svg>')
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "acdc"))
    ap.add_argument("--start", default=str(ROOT / "models" / "acdc70_unet2d.pt"))
    ap.add_argument("--name", default="default")
    ap.add_argument("--volumes", type=int, default=20, help="the first N of val.list")
    ap.add_argument("--skip", type=int, default=0, help="skip the first N of val.list")
    ap.add_argument("--rules", nargs="+", default=["a", "b"], choices=["a", "b"])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a FewSliceOptions field")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "fewslice.json"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "images" / "fewslice.svg"))
    ap.add_argument("--plot-run", default=None, help="the run drawn in the plot (default: the last one)")
    ap.add_argument("--report", action="store_true", help="tables and plot from the JSON, no training")
    ap.add_argument("--device", default=None, help="auto | cpu | cuda | mps (default: FewSliceOptions.device)")
    args = ap.parse_args()
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    if not args.report:
        import yaml

        torch.set_num_threads(args.threads)
        options = fs.FewSliceOptions(**{k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)})
        if args.device:
            options.device = args.device
        from napari_m3hl.runtime import resolve_device

        device = resolve_device(options.device)
        t_init = time.perf_counter()
        torch.zeros(1, device=device).sum().item()  # CUDA's initialisation, timed apart from the volumes
        init_s = time.perf_counter() - t_init
        names = read_list(Path(args.data) / "val.list")[args.skip:args.skip + args.volumes]
        run = results["runs"].setdefault(args.name, {"rows": []})
        run.update(options=vars(options), start=Path(args.start).name, threads=args.threads, cpu_count=os.cpu_count(),
                   platform=platform.platform(), torch=torch.__version__, device=str(device),
                   device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
                   device_init_s=round(init_s, 3))
        for n in names:
            image, label = load_h5_volume(Path(args.data) / "volumes" / f"{n}.h5")
            done: dict[tuple, dict] = {}
            for rule in args.rules:
                run["rows"] = [r for r in run["rows"] if (r["volume"], r["rule"]) != (n, rule)]
                sel = tuple(painted_for(label, rule))
                if sel in done:  # both rules paint the same slices here (few slices show all three
                    # structures): the fine-tune is deterministic, so its result is the same
                    row = {**done[sel], "rule": rule, "same_as_rule": done[sel]["rule"]}
                else:
                    row = done[sel] = run_volume(n, image, label, rule, args.start, options)
                run["rows"].append(row)
                path.parent.mkdir(parents=True, exist_ok=True)
                fresh = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
                fresh["runs"][args.name] = run  # other runs may have been written meanwhile
                path.write_text(json.dumps(fresh, indent=1))
        results = json.loads(path.read_text())
    print(table(results))
    print()
    print(iteration_table(results))
    print()
    print(early_stop_table(results))
    if results["runs"]:
        name = args.plot_run or list(results["runs"])[-1]
        svg_plot(name, results["runs"][name], Path(args.plot))


if __name__ == "__main__":
    main()
