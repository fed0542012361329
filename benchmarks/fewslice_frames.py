"""ED and ES of one patient painted 2 + 2 slices and fine-tuned together,
against each frame painted 2 slices and fine-tuned on its own (issue 21,
item 4), through the few-slice engine path (``prepare_volumes`` + ``run``,
the code path of ``m3hl train --data ED --labels ED_painted --data ES
--labels ES_painted`` and of the widget's Data panel with two pairs).

For each ACDC validation patient (both frames are in ``val.list``) and seed,
three kinds of run, painting rule a or b of ``benchmarks/fewslice.py`` in
each frame:

* ``one``: each frame fine-tuned alone on its own two painted slices (two
  fine-tunes);
* ``both``: one fine-tune over both frames, each painted two slices;
* ``one+other``: each frame fine-tuned on its two painted slices with the
  other frame as an unlabeled volume (only the M³HL mode reads unlabeled
  data; ``--arms`` picks the kinds).

Every frame is scored on its own unpainted slices (3D Dice of RV, Myo, LV
×100, the fine-tuned segmentation as shown, the start model's, and the
network alone). Rows accumulate in ``benchmarks/results/fewslice_frames.json``
under ``--name``; ``--report`` prints the markdown table from the JSON.

    python benchmarks/fewslice_frames.py --name sup_s1 --patients 10 --seed 1 --threads 2
    python benchmarks/fewslice_frames.py --report
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fewslice import painted_for, per_class  # noqa: E402

from napari_m3hl.data.cached import read_list  # noqa: E402
from napari_m3hl.fewslice import loop as fs  # noqa: E402
from napari_m3hl.io.h5 import load_h5_volume  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "fewslice_frames.json"
ARMS = ("one", "both", "one+other")


def patients(data: Path, count: int) -> list[tuple[str, str, str]]:
    """(patient, ED volume name, ES volume name) of the first ``count``
    validation patients whose two frames are both in ``val.list``."""
    names = read_list(data / "val.list")
    out: list[tuple[str, str, str]] = []
    for n in names:
        p = n.split("_")[0]
        frames = sorted(m for m in names if m.startswith(p + "_"))
        if len(frames) == 2 and frames[0] == n:
            out.append((p, frames[0], frames[1]))
    return out[:count]


def painted(label: np.ndarray, rule: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(painted labels, painted slice indices, unpainted slice indices)."""
    on = np.asarray(painted_for(label, rule))
    out = np.zeros_like(label)
    out[on] = label[on]
    return out, on, np.setdiff1d(np.arange(label.shape[0]), on)


def score(res: fs.VolumeResult, label: np.ndarray, off: np.ndarray) -> dict:
    return {"base": per_class(res.base, label, off), "shown": per_class(res.labels, label, off),
            "network": per_class(res.network, label, off),
            "suspect": bool(res.verdict.suspect) if res.verdict is not None else None}


def run_job(start: str, labeled: list, unlabeled: list, names: list[str], options: fs.FewSliceOptions):
    t0 = time.perf_counter()
    job = fs.prepare_volumes(start, labeled, unlabeled, options, names=names)
    result = None
    for e in fs.run(job):
        if isinstance(e, fs.FewSliceResult):
            result = e
    return result, time.perf_counter() - t0


def run_patient(data: Path, start: str, patient: tuple[str, str, str], rule: str, arms: list[str],
                options: fs.FewSliceOptions) -> list[dict]:
    p, ed, es = patient
    vols = {n: load_h5_volume(data / "volumes" / f"{n}.h5") for n in (ed, es)}
    paint = {n: painted(vols[n][1], rule) for n in (ed, es)}
    rows = []
    for arm in arms:
        if arm == "both":
            result, wall = run_job(start, [(vols[n][0], paint[n][0]) for n in (ed, es)], [], [ed, es], options)
            for n, vr in zip((ed, es), result.volumes):
                rows.append({"patient": p, "frame": n, "arm": arm, "rule": rule, "seconds": wall,
                             **score(vr, vols[n][1], paint[n][2])})
        else:
            for n, other in ((ed, es), (es, ed)):
                unl = [vols[other][0]] if arm == "one+other" else []
                result, wall = run_job(start, [(vols[n][0], paint[n][0])], unl,
                                       [n] + ([other] if unl else []), options)
                rows.append({"patient": p, "frame": n, "arm": arm, "rule": rule, "seconds": wall,
                             **score(result.volumes[0], vols[n][1], paint[n][2])})
        for r in rows[-2:]:
            print(f"{r['frame']} {arm} rule {rule}: start {100 * np.mean(r['base']):.1f} shown "
                  f"{100 * np.mean(r['shown']):.1f} network {100 * np.mean(r['network']):.1f} ({r['seconds']:.0f} s)",
                  flush=True)
    return rows


def report(results: dict) -> str:
    lines = ["| run | rule | arm | frames | start | shown | Δ mean | Δ range | frames below start | network alone | "
             "median s per fine-tune |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, run in results["runs"].items():
        for rule in ("a", "b"):
            for arm in ARMS:
                rows = [r for r in run["rows"] if r["arm"] == arm and r["rule"] == rule]
                if not rows:
                    continue
                m = lambda k: 100 * float(np.mean([np.mean(r[k]) for r in rows]))  # noqa: E731
                d = [100 * (np.mean(r["shown"]) - np.mean(r["base"])) for r in rows]
                lines.append(f"| {name} | {rule} | {arm} | {len(rows)} | {m('base'):.1f} | {m('shown'):.1f} | "
                             f"{np.mean(d):+.1f} | {min(d):+.1f} … {max(d):+.1f} | {sum(x < 0 for x in d)} | "
                             f"{m('network'):.1f} | {np.median([r['seconds'] for r in rows]):.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "acdc"))
    ap.add_argument("--start", default=str(ROOT / "models" / "acdc70_unet2d.pt"))
    ap.add_argument("--name")
    ap.add_argument("--patients", type=int, default=10)
    ap.add_argument("--rules", default="a")
    ap.add_argument("--arms", default="one,both")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--set", action="append", default=[], help="a FewSliceOptions field, KEY=VALUE")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(OUT))
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    if args.report:
        print(report(results))
        return
    data = Path(args.data)
    if not (data / "val.list").exists():
        sys.exit(f"ACDC data not found at {data} (see ../shared/data/README.md); pass --data")
    torch.set_num_threads(args.threads)
    sets = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    options = fs.FewSliceOptions(seed=args.seed, **sets)
    arms = args.arms.split(",")
    if not set(arms) <= set(ARMS):
        sys.exit(f"--arms takes {', '.join(ARMS)}")
    run = {"options": {k: v for k, v in vars(options).items()}, "seed": args.seed, "threads": args.threads,
           "start": Path(args.start).name, "load_before": os.getloadavg()[0], "rows": []}
    results["runs"][args.name] = run
    for patient in patients(data, args.patients):
        for rule in args.rules.split(","):
            run["rows"] += run_patient(data, args.start, patient, rule, arms, options)
            path.write_text(json.dumps(results, indent=1, default=str))
    print(report({"runs": {args.name: run}}))


if __name__ == "__main__":
    main()
