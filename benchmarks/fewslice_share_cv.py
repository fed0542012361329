"""Can a better share rule close the few-slice loop's gap? The ceiling of the blend and the
share rule chosen on half of the patients, scored on the other half.

After a few-slice fine-tune the user is shown ``w·p_start + (1 − w)·p_student``, ``w`` set by
the share rule of :mod:`napari_m3hl.fewslice.trust` from what the loop can see: the start
model's Dice on the painted slices and the student's change at its last check. This script
reads the caches of ``benchmarks/fewslice_blend.py --cache`` (one folder per shift or none and
seed; folders of the same name are seeds of one row) and scores on the unpainted slices (mean
Dice of RV, Myo, LV, each class's largest 3D component kept, as the loop shows it):

* ``start``: the start model alone;
* ``rule``: the default's share rule (``FewSliceOptions``), exactly as the loop settles it;
* ``best fixed share``: the one share on a 0.025 grid that scores best over the row (an
  in-sample upper bound for a constant);
* ``ceiling``: each volume at its own best share on that grid (no rule can do better: the
  blend's ceiling with these students);
* ``cross-validated``: the rule's six parameters (``start_blend``, ``start_blend_untrusted``,
  ``start_blend_stable``, ``stable_change``, ``trust_low``, ``trust_high``; or those ``--vary``
  names, the others at the default's values) chosen on a grid
  from the volumes of one half of the patients (every row and seed; alternate patients by
  name; each phantom is a patient) to maximise the mean of the rows' means with no volume more
  than 1 point below its start, then scored on the other half, and the other way round.

The search reads each volume's Dice at the share rounded to the 0.025 grid (kept beside its cache
as ``NAME.share_curve.json`` for the next run); the rows of the table (``rule``,
``cross-validated``, ``fit on all``) are scored at the exact share. JSON:
``benchmarks/results/fewslice_share_cv.json`` under ``--key``.

    python benchmarks/fewslice_share_cv.py --key supervised /tmp/fs/s1337/none /tmp/fs/s2/none ... /tmp/fs/s3/rot90
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from fewslice_blend import _clean, _score, loop_view  # noqa: E402

from napari_m3hl.fewslice.loop import FewSliceOptions  # noqa: E402
from napari_m3hl.fewslice.trust import BlendChoice, settle_blend, start_share  # noqa: E402

#: the shares each volume is scored at for the search, the fixed shares and the ceiling
SHARES = tuple(round(0.025 * i, 3) for i in range(41))
#: the values searched for each of the rule's parameters (``FewSliceOptions`` fields)
GRID = {"start_blend": (0.5, 0.55, 0.6, 0.65, 0.7), "start_blend_untrusted": (0.4, 0.45, 0.5, 0.55, 0.6),
        "start_blend_stable": (0.2, 0.25, 0.3, 0.35, 0.4, 0.45), "stable_change": (0.03, 0.04, 0.05),
        "trust_low": (0.8, 0.85, 0.88), "trust_high": (0.9, 0.92, 0.94)}
FLOOR = 1.0  # points below the start that count as a broken promise (the floor)


def default_params() -> tuple[float, ...]:
    """The default's rule, in the order of :data:`GRID`."""
    o = FewSliceOptions()
    return tuple(float(getattr(o, name)) for name in GRID)


def candidates(vary: list[str]) -> list[tuple[float, ...]]:
    """Every rule with the ``vary`` parameters on their grid and the others at the default's values,
    the stable share at most the untrusted, at most the trusted."""
    axes = [GRID[n] if n in vary else (v,) for n, v in zip(GRID, default_params())]
    return [p for p in itertools.product(*axes) if p[2] <= p[1] <= p[0]]


def share(params: tuple[float, ...], painted: float | None, change: float | None) -> float:
    """The start model's share as the loop settles it (``start_share`` then ``settle_blend``)."""
    trusted, untrusted, stable, stable_change, low, high = params
    first = BlendChoice(start_share(painted, trusted, min(untrusted, trusted), low, high), painted)
    return settle_blend(first, change, trusted, untrusted, stable, stable_change, low, high).weight


class Volume:
    """One cached (volume, seed): what the loop sees, and the shown Dice (×100) at any share."""

    def __init__(self, path: Path, row: str) -> None:
        z = np.load(path)
        self.ref, self.sel = z["label"], z["painted"]
        self.off = np.setdiff1d(np.arange(self.ref.shape[0]), self.sel)
        p = {k: z[k].astype(np.float32) / 255 for k in z.files if k == "start" or k.startswith("student@")}
        self.painted, self.change = loop_view(p, self.ref, self.sel)
        last = max((k for k in p if k.startswith("student@")), key=lambda k: int(k.split("@")[1]))
        self._start, self._student = z["start"], z[last]  # uint8, probability × 255
        self.row, self.name = row, path.stem
        self.patient = re.match(r"(patient\d+|phantom\d+)", path.stem).group(1)
        # the curve over SHARES is the slow part (41 blends): kept beside the cache, valid for this npz
        side = path.with_suffix(".share_curve.json")
        stamp = [path.stat().st_mtime, list(SHARES)]
        kept = json.loads(side.read_text()) if side.is_file() else {}
        if kept.get("stamp") == stamp:
            self.curve = np.array(kept["curve"])
        else:
            self.curve = np.array([self.dice(w) for w in SHARES])
            side.write_text(json.dumps({"stamp": stamp, "curve": self.curve.tolist()}))

    def dice(self, w: float) -> float:
        # as fewslice_blend.score_case blends: the probabilities first, then the share
        prob = w * (self._start.astype(np.float32) / 255) + (1 - w) * (self._student.astype(np.float32) / 255)
        return 100 * float(np.mean(_score(_clean(prob), self.ref, self.off)))

    @property
    def start(self) -> float:
        return float(self.curve[-1])


def _nearest(w: float) -> int:
    return int(round(w / 0.025))


def search_score(vols: list[Volume], params: tuple[float, ...]) -> tuple[int, float]:
    """(volumes more than FLOOR below their start, mean over rows of the rows' means) at the grid share."""
    rows: dict[str, list[float]] = {}
    below = 0
    for v in vols:
        d = float(v.curve[_nearest(share(params, v.painted, v.change))])
        rows.setdefault(v.row, []).append(d)
        below += d < v.start - FLOOR
    return below, float(np.mean([np.mean(x) for x in rows.values()]))


def choose(vols: list[Volume], params: list[tuple[float, ...]]) -> tuple[float, ...]:
    """The parameters with the fewest volumes below the floor, then the best mean of rows."""
    return max(params, key=lambda p: (lambda b, m: (-b, m))(*search_score(vols, p)))


def summarise(vals: dict[str, np.ndarray], start: np.ndarray) -> dict:
    """Mean, volumes more than FLOOR below the start, worst Δ, for arrays over the same volumes."""
    return {k: {"mean": float(v.mean()), "below": int((v < start - FLOOR).sum()), "worst": float((v - start).min())}
            for k, v in vals.items()}


def evaluate(vols: list[Volume], vary: list[str]) -> dict:
    pats = sorted({v.patient for v in vols})
    fold = {p: i % 2 for i, p in enumerate(pats)}
    params = candidates(vary)
    chosen = {f: choose([v for v in vols if fold[v.patient] != f], params) for f in (0, 1)}
    full = choose(vols, params)
    cur = default_params()
    rows: dict[str, dict] = {}
    for row in sorted({v.row for v in vols}):
        rv = [v for v in vols if v.row == row]
        start = np.array([v.start for v in rv])
        best_fixed = int(np.argmax(np.mean([v.curve for v in rv], axis=0)))
        vals = {"rule": np.array([v.dice(share(cur, v.painted, v.change)) for v in rv]),
                "best fixed share": np.array([v.curve[best_fixed] for v in rv]),
                "ceiling": np.array([v.curve.max() for v in rv]),
                "cross-validated": np.array([v.dice(share(chosen[fold[v.patient]], v.painted, v.change)) for v in rv]),
                "fit on all (in-sample)": np.array([v.dice(share(full, v.painted, v.change)) for v in rv])}
        rows[row] = {"n": len(rv), "start": float(start.mean()), "best_fixed_share": SHARES[best_fixed],
                     "scores": summarise(vals, start), "cases": [v.name for v in rv]}
    return {"parameters": list(GRID), "varied": vary, "default": cur,
            "chosen_per_fold": {str(f): p for f, p in chosen.items()}, "fit_on_all": full,
            "folds": {str(f): [p for p in pats if fold[p] == f] for f in (0, 1)}, "rows": rows}


def table(result: dict) -> str:
    keys = ["rule", "best fixed share", "ceiling", "cross-validated", "fit on all (in-sample)"]
    lines = ["| row | n | start | " + " | ".join(keys) + " |", "|---|---:|---:|" + "---|" * len(keys)]
    for row, r in result["rows"].items():
        cells = [f"{r['scores'][k]['mean']:.2f} ({r['scores'][k]['below']})" for k in keys]
        cells[1] = f"{cells[1]} at {r['best_fixed_share']:g}"
        lines.append(f"| {row} | {r['n']} | {r['start']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", help="cache folders of benchmarks/fewslice_blend.py --cache, one mode")
    ap.add_argument("--key", required=True, help="the JSON key (the mode the caches ran, e.g. supervised)")
    ap.add_argument("--vary", action="append", choices=list(GRID), metavar="PARAMETER",
                    help="a rule parameter searched, once per parameter (default: all six); the others keep the "
                         f"default's values; one of {', '.join(GRID)}")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "fewslice_share_cv.json"))
    args = ap.parse_args()
    vols = []
    for d in map(Path, args.dirs):
        files = sorted(d.glob("*.npz")) if d.is_dir() else []
        if not files:
            ap.error(f"{d}: no cached volumes (*.npz) there; pass folders written by "
                     "benchmarks/fewslice_blend.py --cache --cache-dir FOLDER")
        for f in files:
            if not re.match(r"(patient\d+|phantom\d+)_.*_[ab]$", f.stem):
                ap.error(f"{f}: not a fewslice_blend.py cache (expected patientNNN_frameNN_a.npz or phantomNNN_a.npz)")
            vols.append(Volume(f, f"{d.name} ({f.stem.rsplit('_', 1)[1]})"))
        print(f"{d}: {len(vols)} volumes read", file=sys.stderr, flush=True)
    if len({v.patient for v in vols}) < 2:
        ap.error("the cross-validation splits the patients in two halves: pass caches of two patients or more")
    result = evaluate(vols, args.vary or list(GRID)) | {"dirs": args.dirs}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[args.key] = result
    path.write_text(json.dumps(results, indent=1))
    print(f"{args.key}: default {result['default']}, chosen per fold {result['chosen_per_fold']}, "
          f"fit on all {result['fit_on_all']}")
    print("mean Dice on the unpainted slices (volumes more than 1 point below their start)")
    print(table(result))


if __name__ == "__main__":
    main()
