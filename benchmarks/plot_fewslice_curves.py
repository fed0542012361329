"""Plot the few-slice loop's curves, supervised against M³HL, as an SVG.

Reads the rows of ``benchmarks/results/fewslice_m3hl_step.json`` (written by
``benchmarks/fewslice_m3hl_step.py``) and draws, for painting rule a, the mean
Dice (RV, Myo, LV ×100) on the unpainted slices of the 5 validation volumes at
every check of the fine-tune: the teacher alone (what the M³HL student is
taught on the unpainted slices), the student alone and the segmentation shown
(the student blended with the start model; its share as the loop chose it
when the runs were made). The supervised loop's teacher teaches nothing, so
it is not drawn. Iteration 0 is the start model,
which all three are before the first step. One line per run and seed; the top
row unshifted, the bottom row under the gamma-1.8 contrast change.

    python benchmarks/plot_fewslice_curves.py   # -> docs/images/fewslice_curves.svg
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from plot_acdc_curves import H, PAD, W, _panel

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "fewslice_m3hl_step.json"

# (label, colour, dash, runs unshifted, runs under gamma)
GROUPS = (
    ("supervised (the default)", "#1f77b4", "",
     ("v5_supervised",), ("v5_supervised_gamma",)),
    ("M³HL, the paper's step (EMA teacher 0.99)", "#d62728", "5,3",
     ("v5_m3hl_mode_default", "v5_m3hl_mode_default_s2", "v5_m3hl_mode_default_s3"), ()),
    ("M³HL, the mode's default (frozen teacher, CE-only mix, painted slices unmixed)", "#2ca02c", "",
     ("v5_m3hl_frozen_dicenone_sup1", "v5_m3hl_frozen_dicenone_sup1_s2", "v5_m3hl_frozen_dicenone_sup1_s3"),
     ("v5_m3hl_gamma",)),
)
# (key, title, y range): the supervised loop has no teacher that teaches, so it has no teacher curve
CURVES = (("teacher", "M³HL teacher alone (its pseudo-labels)", (40, 95)), ("student", "Student alone", (40, 95)),
          ("shown", "Shown (blended with the start model)", (78, 94)))


def curve(run: dict, key: str, rule: str = "a") -> list[tuple[int, float]]:
    """[(iteration, mean Dice over the run's volumes)] from iteration 0 (the start model)."""
    rows = [r for r in run["rows"] if r["rule"] == rule]
    if not rows:
        return []
    pts = [(0, float(np.mean([r["base"] for r in rows])))]
    for i, c in enumerate(rows[0]["checks"]):
        pts.append((c["iteration"], float(np.mean([r["checks"][i][key] for r in rows]))))
    return pts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=str(RESULTS))
    ap.add_argument("--out", default=str(ROOT / "docs" / "images" / "fewslice_curves.svg"))
    args = ap.parse_args(argv)
    if Path(args.out).resolve() == Path(args.json).resolve():
        raise SystemExit(f"--out {args.out} is the results file it reads; give another path for the SVG")
    runs = json.loads(Path(args.json).read_text())["runs"]
    missing = [n for g in GROUPS for n in (*g[3], *g[4]) if n not in runs]
    if missing:
        raise SystemExit(f"runs missing from {args.json}: {', '.join(missing)}")
    xmax = 100
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{3 * W}" height="{2 * H + 40 + 18 * len(GROUPS)}" '
           'font-family="sans-serif">', '<rect width="100%" height="100%" fill="white"/>']
    for row, (shift_idx, shift_label) in enumerate(((3, "unshifted"), (4, "gamma 1.8"))):
        svg.append(f'<g transform="translate(0,{row * (H + 10)})">')
        for col, (key, title, (ymin, ymax)) in enumerate(CURVES):
            series = []
            for label, colour, dash, *names in GROUPS:
                if key == "teacher" and not label.startswith("M³HL"):
                    continue
                for name in names[shift_idx - 3]:
                    pts = curve(runs[name], key)
                    if pts:
                        series.append((name, colour, pts, dash))
            svg += _panel(col * W, f"{title}, {shift_label}", series, xmax, ymin, ymax, [])
        svg.append("</g>")
    y = 2 * H + 24
    for label, colour, dash, *_ in GROUPS:
        svg.append(f'<line x1="{PAD}" x2="{PAD + 24}" y1="{y}" y2="{y}" stroke="{colour}" stroke-width="2" '
                   f'stroke-dasharray="{dash}"/>')
        svg.append(f'<text x="{PAD + 30}" y="{y + 4}" font-size="11">{label}; one line per seed</text>')
        y += 18
    svg.append(f'<text x="{3 * W - PAD}" y="{2 * H + 28}" text-anchor="end" font-size="11">mean Dice (%) on the '
               'unpainted slices, 5 validation volumes, rule a; iteration 0 = the start model</text>')
    svg.append("</svg>")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(svg) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
