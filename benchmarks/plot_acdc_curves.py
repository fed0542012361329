"""Plot the ACDC rows' curves as an SVG (no plotting library needed).

Left: the student's validation mean Dice (20 validation volumes) against the
iteration, one line per row and seed. Right: the pseudo-label Dice of the
M³HL rows (the EMA teacher's pseudo-labels on 64 fixed unlabeled training
slices, scored against their hidden labels, never used for training) and of
the student on the same slices.

    python benchmarks/plot_acdc_curves.py --keys 'sup7_gpu_s*' 'm3hl_fast_gpu_s*' --out docs/images/acdc_gpu_curves.svg
"""
from __future__ import annotations

import argparse
import fnmatch
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PER_METHOD = ROOT / "benchmarks" / "results" / "acdc"
COLOURS = {"sup7": "#1f77b4", "m3hl_fast": "#d62728", "m3hl_reference": "#2ca02c", "sup70": "#7f7f7f"}
W, H, PAD = 420, 300, 48


def _panel(x0: int, title: str, series: list[tuple[str, str, list[tuple[int, float]], str]],
           xmax: int, ymin: float, ymax: float, marks: list[tuple[int, str]]) -> list[str]:
    """SVG elements of one panel: series = (label, colour, [(x, y)], dash)."""
    def px(x: float) -> float:
        return x0 + PAD + (W - 1.5 * PAD) * x / xmax

    def py(y: float) -> float:
        return H - PAD + (PAD * 1.5 - H) * (y - ymin) / (ymax - ymin)

    out = [f'<text x="{x0 + W / 2}" y="18" text-anchor="middle" font-size="13">{title}</text>',
           f'<rect x="{px(0)}" y="{py(ymax)}" width="{px(xmax) - px(0)}" height="{py(ymin) - py(ymax)}" '
           'fill="none" stroke="#444"/>']
    step = 10 if ymax - ymin > 25 else 5
    y = (int(ymin) // step + 1) * step
    while y < ymax:
        out.append(f'<line x1="{px(0)}" x2="{px(xmax)}" y1="{py(y)}" y2="{py(y)}" stroke="#ddd"/>')
        out.append(f'<text x="{px(0) - 4}" y="{py(y) + 4}" text-anchor="end" font-size="10">{y}</text>')
        y += step
    for i in range(0, xmax + 1, max(1, xmax // 5)):
        out.append(f'<text x="{px(i)}" y="{H - PAD + 14}" text-anchor="middle" font-size="10">{i}</text>')
    out.append(f'<text x="{x0 + W / 2}" y="{H - 12}" text-anchor="middle" font-size="11">iteration</text>')
    for x, label in marks:
        out.append(f'<line x1="{px(x)}" x2="{px(x)}" y1="{py(ymin)}" y2="{py(ymax)}" stroke="#999" '
                   'stroke-dasharray="2,3"/>')
        out.append(f'<text x="{px(x) + 3}" y="{py(ymax) + 12}" font-size="9" fill="#666">{label}</text>')
    for _, colour, pts, dash in series:
        path = " ".join(f"{px(x):.1f},{py(max(ymin, y)):.1f}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.4" '
                   f'stroke-dasharray="{dash}"/>')
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", nargs="+", default=["sup7_gpu_s*", "m3hl_fast_gpu_s*"], help="result file patterns")
    ap.add_argument("--out", default=str(ROOT / "docs" / "images" / "acdc_gpu_curves.svg"))
    args = ap.parse_args(argv)
    rows = [json.loads(p.read_text()) for p in sorted(PER_METHOD.glob("*.json"))
            if any(fnmatch.fnmatch(p.stem, k) for k in args.keys)]
    if not rows:
        raise SystemExit(f"no result matches {args.keys} in {PER_METHOD}")
    xmax = max(r["iterations"] for r in rows)
    val, pl, marks, legend = [], [], [], {}
    for r in rows:
        colour = COLOURS.get(r["method"], "#000")
        legend[r["method"]] = (colour, r["label"].split(" [")[0])
        val.append((r["key"], colour, [(h["iteration"], 100 * h["mean_dice"]) for h in r["history"]], ""))
        curve = r.get("pseudo_label_curve") or []
        if curve:
            pl.append((r["key"], colour, [(c["iteration"], 100 * c["pl_mean"]) for c in curve], ""))
            pl.append((r["key"], colour, [(c["iteration"], 100 * c["student_mean"]) for c in curve], "4,3"))
            warm = r["config"].get("warm_frac", 0) * r["config"]["iterations"] or r["config"].get("warm_start", 0)
            if warm and (int(warm), "warm start ends") not in marks:
                marks.append((int(warm), "warm start ends"))
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W}" height="{H + 30}" font-family="sans-serif">',
           '<rect width="100%" height="100%" fill="white"/>']
    svg += _panel(0, "Validation mean Dice (%), student", val, xmax, 55, 92, marks)
    svg += _panel(W, "Pseudo-label Dice (%) on unlabeled slices", pl, xmax, 55, 92, marks)
    x = PAD
    for colour, label in legend.values():
        svg.append(f'<line x1="{x}" x2="{x + 18}" y1="{H + 16}" y2="{H + 16}" stroke="{colour}" stroke-width="2"/>')
        svg.append(f'<text x="{x + 22}" y="{H + 20}" font-size="11">{label}</text>')
        x += 30 + 6.2 * len(label)
    svg.append(f'<text x="{x}" y="{H + 20}" font-size="11">right: solid = teacher, '
               'dashed = student</text>')
    svg.append("</svg>")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(svg) + "\n")
    print(f"wrote {out} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
