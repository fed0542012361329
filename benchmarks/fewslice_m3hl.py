"""Supervised vs M³HL in the few-slice loop: the table of docs/benchmarks.md,
"M³HL in the few-slice loop", from the rows ``benchmarks/fewslice.py`` wrote.

The runs (5 ACDC validation volumes, painting rules a and b, one thread each):

    python benchmarks/fewslice.py --volumes 5 --threads 1 --set seed=1 --name m3hl21_sup_s1 --json J
    python benchmarks/fewslice.py --volumes 5 --threads 1 --set seed=S --set mode=m3hl \\
        [--set ema_decay=1.0] [--set teacher_bn=copy] --name m3hl21_<variant>_sS --json J

``--merge J1 J2 …`` copies those runs (and, with ``--supervised-s2``, the
first volumes of the earlier record run ``blend0.6_s2`` of
``benchmarks/results/fewslice.json``: the same default options at seed 2)
into ``benchmarks/results/fewslice_m3hl.json``; without it the table is
printed from that file. Only (volume, rule) pairs present in every run of a
table are compared; a run cut short gets a table of its own with the others
on the volumes it finished.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "fewslice_m3hl.json"


def _mean(v) -> float:
    return 100 * float(np.mean(v))


def table(runs: dict) -> str:
    keys = [{(r["volume"], r["rule"]) for r in run["rows"]} for run in runs.values()]
    common = set.intersection(*keys) if keys else set()
    lines = ["| run | rule | volumes | start | tuned (shown) | Δ mean | Δ range | volumes below start | "
             "network alone | teacher alone, last check | median s (load) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        for rule in ("a", "b"):
            rows = [r for r in run["rows"] if r["rule"] == rule and (r["volume"], rule) in common]
            if not rows:
                continue
            base = [_mean(r["base"]) for r in rows]
            tuned = [_mean(r["shown"]) for r in rows]
            delta = [t - b for t, b in zip(tuned, base)]
            alone = [_mean(r["network"]) for r in rows if "network" in r]
            teacher = [_mean(r["checks"][-1]["teacher"]) for r in rows if r.get("checks")]
            secs = [r["seconds_total"] for r in rows if "seconds_total" in r]
            loads = [r["load_before"] for r in rows if "load_before" in r]
            lines.append(
                f"| {name} | {rule} | {len(rows)} | {np.mean(base):.1f} | {np.mean(tuned):.1f} | {np.mean(delta):+.1f} | "
                f"{min(delta):+.1f} … {max(delta):+.1f} | {sum(d < 0 for d in delta)} | "
                f"{np.mean(alone):.1f} | {np.mean(teacher):.1f} | "
                f"{np.median(secs):.0f} ({np.median(loads):.1f}) |")
    return "\n".join(lines)


def curves(runs: dict) -> str:
    """Mean Dice on the unpainted slices at each check: the teacher alone / the student alone / shown (blended)."""
    lines = ["| run | rule | iteration: teacher / student / shown |", "|---|---|---|"]
    for name, run in runs.items():
        for rule in ("a", "b"):
            rows = [r for r in run["rows"] if r["rule"] == rule and r.get("checks")]
            if not rows:
                continue
            its = sorted({c["iteration"] for r in rows for c in r["checks"]})
            cells = []
            for it in its:
                at = [c for r in rows for c in r["checks"] if c["iteration"] == it]
                cells.append(f"{it}: " + " / ".join(f"{np.mean([_mean(c[k]) for c in at]):.1f}"
                                                   for k in ("teacher", "student", "shown")))
            lines.append(f"| {name} | {rule} ({len(rows)} vol.) | {', '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--merge", nargs="*", default=None, help="JSON files of benchmarks/fewslice.py to copy runs from")
    ap.add_argument("--supervised-s2", type=int, default=0, metavar="N",
                    help="also take the first N volumes of the record run blend0.6_s2 (supervised, seed 2)")
    ap.add_argument("--min-rows", type=int, default=8,
                    help="runs with fewer (volume, rule) rows are compared separately, on the rows they have")
    args = ap.parse_args()
    results = json.loads(OUT.read_text()) if OUT.is_file() else {"runs": {}}
    if args.merge is not None:
        for path in args.merge:
            results["runs"].update(json.loads(Path(path).read_text())["runs"])
        if args.supervised_s2:
            record = json.loads((ROOT / "benchmarks" / "results" / "fewslice.json").read_text())["runs"]["blend0.6_s2"]
            volumes = list(dict.fromkeys(r["volume"] for r in record["rows"]))[:args.supervised_s2]
            results["runs"]["m3hl21_sup_s2 (= blend0.6_s2)"] = {
                **{k: v for k, v in record.items() if k != "rows"},
                "rows": [r for r in record["rows"] if r["volume"] in volumes]}
        OUT.write_text(json.dumps(results, indent=1))
    runs = results["runs"]
    full = {k: v for k, v in runs.items() if len(v["rows"]) >= args.min_rows}
    print(table(full))
    for name, run in runs.items():  # a run cut short: compared with the others on the volumes it finished
        if name not in full:
            print(f"\n{name}, cut short: on its {len(run['rows'])} (volume, rule) rows\n")
            print(table({**full, name: run}))
    print()
    print(curves(runs))


if __name__ == "__main__":
    main()
