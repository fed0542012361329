"""Which slice should the clinician label next? Suggestion vs random vs evenly spaced.

Simulates the plugin's loop on real ACDC validation volumes (their labels act
as the clinician): each volume starts with its middle slice labeled; M³HL
trains on the labeled slices with the rest of the volumes as unlabeled data;
then every round one more slice per volume is labeled, chosen by a strategy,
and training continues from the previous weights, teacher and optimiser
(the widget's "Train on"). After each round the mean Dice over RV/Myo/LV on
the whole volumes is recorded for the student and for its EMA teacher (the
two networks the widget's Network setting offers).

Strategies: ``entropy``, ``margin`` (of the student), ``teacher-entropy``
(entropy of the EMA teacher), ``teacher-entropy-spread`` (the same × distance
to the nearest labeled slice), ``teacher-total-entropy`` (the teacher's
entropy summed over its heart region) and ``disagreement`` (our suggestion scores,
``napari_m3hl.fewslice.suggest``), ``random`` (seeded), ``even`` (the slice farthest
from every labeled slice). Writes ``benchmarks/results/active_learning.json``
and ``docs/images/active_learning.svg``; prints a markdown table.

    python benchmarks/active_learning.py --data ../shared/data/acdc --volumes 10 --rounds 4 --seeds 1337 1 2

Single rounds are noisy (a 200-iteration top-up at lr 0.01 can move the
student's Dice by tens of points; the EMA teacher is far steadier), so the
summary that decides is the teacher's mean Dice over all rounds after the
first and over the seeds (``mean_dice_after_round0``), with the per-seed
values beside it. ``--report`` rebuilds the summaries, tables and plot from
the JSON without training.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from napari_m3hl.io.checkpoint import trained_models
from napari_m3hl.config import load_preset
from napari_m3hl.labels import ACDC_CLASSES
from napari_m3hl.data.volumes import PartlyLabeledVolume
from napari_m3hl.data.acdc import acdc_val_volumes
from napari_m3hl.metrics.binary import dice
from napari_m3hl.inference.predictor import Predictor
from napari_m3hl.runtime import tune_malloc
from napari_m3hl.fewslice.suggest import rank_slices, slice_scores
from napari_m3hl.training.trainer import train

STRATEGIES = ("entropy", "teacher-entropy", "teacher-entropy-spread", "teacher-total-entropy", "disagreement", "margin",
              "random", "even")
#: strategy → (suggestion score, network it scores, rank by score × distance to the labeled slices)
SCORES = {"entropy": ("entropy", "student", False), "teacher-entropy": ("entropy", "teacher", False),
          "teacher-entropy-spread": ("entropy", "teacher", True),
          "teacher-total-entropy": ("total-entropy", "teacher", False),
          "disagreement": ("disagreement", "student", False), "margin": ("margin", "student", False)}


def _even_choice(depth: int, labeled: list[int]) -> int:
    """The unlabeled slice farthest from every labeled slice (ties: lowest index)."""
    cand = [z for z in range(depth) if z not in labeled]
    return max(cand, key=lambda z: (min(abs(z - l) for l in labeled), -z))


def run_strategy(strategy: str, vols: list, args: argparse.Namespace, workdir: Path, seed: int,
                 round0: Path | None = None) -> list[dict]:
    """Rounds of label-one-more-slice-per-volume and train on; one row per round.

    ``round0``: a checkpoint of round 0 (the same for every strategy: same
    labeled slices, same seed) to start from instead of training it again.
    """
    rng = np.random.default_rng(seed)
    labeled = {i: [img.shape[0] // 2] for i, (_, img, _) in enumerate(vols)}
    ckpt = None
    total_its = 0
    rows = []
    for rnd in range(args.rounds + 1):
        masks = []
        for i, (_, img, lab) in enumerate(vols):
            m = np.zeros_like(lab)
            m[labeled[i]] = lab[labeled[i]]
            masks.append(m)
        data = PartlyLabeledVolume.from_volumes([v[1] for v in vols], masks, num_classes=4).train_data(ACDC_CLASSES)
        total_its += args.initial_iterations if rnd == 0 else args.round_iterations
        cfg = load_preset("acdc_unet2d", args.variant, iterations=total_its, patch_size=(args.size, args.size),
                          block_size=(args.size // 4, args.size // 4), batch_size=args.batch, lr=args.lr,
                          seed=seed, device="cpu", checkpoint_every=0)
        t0 = time.perf_counter()
        if rnd == 0 and round0 is not None and round0.is_file():
            shutil.copyfile(round0, workdir / "last.pt")
        else:
            for _ in train(cfg, data, workdir, resume_from=ckpt):
                pass
            if rnd == 0 and round0 is not None:
                shutil.copyfile(workdir / "last.pt", round0)
        ckpt = workdir / "last.pt"
        student, teacher = (Predictor.from_network(net, cfg, which)
                            for net, which in zip(trained_models(ckpt), ("student", "teacher")))
        dices, t_dices, choices = [], [], {}
        for i, (name, img, lab) in enumerate(vols):
            pred_s, probs_s = student.predict(img, return_probs=True)
            pred_t, probs_t = teacher.predict(img, return_probs=True)
            dices.append(np.mean([dice(pred_s == c, lab == c) for c in (1, 2, 3)]))
            t_dices.append(np.mean([dice(pred_t == c, lab == c) for c in (1, 2, 3)]))
            if rnd == args.rounds or len(labeled[i]) >= img.shape[0]:
                continue
            if strategy in SCORES:
                method, network, spread = SCORES[strategy]
                scored, other = (probs_t, probs_s) if network == "teacher" else (probs_s, probs_t)
                scores = slice_scores(scored, other if method == "disagreement" else None, method)
                choices[i] = rank_slices(scores, labeled[i], spread)[0]
            elif strategy == "random":
                choices[i] = int(rng.choice([z for z in range(img.shape[0]) if z not in labeled[i]]))
            else:
                choices[i] = _even_choice(img.shape[0], labeled[i])
        rows.append({"round": rnd, "labeled_slices": int(sum(len(v) for v in labeled.values())),
                     "iterations": total_its, "mean_dice": float(np.mean(dices)),
                     "teacher_mean_dice": float(np.mean(t_dices)),
                     "per_volume_dice": [float(d) for d in dices],
                     "picked": [choices.get(i) for i in range(len(vols))],  # slice added next, per volume
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"seed {seed} {strategy:12s} round {rnd}: {rows[-1]['labeled_slices']} slices, Dice {100 * rows[-1]['mean_dice']:.2f} "
              f"(EMA teacher {100 * rows[-1]['teacher_mean_dice']:.2f})",
              flush=True)
        for i, z in choices.items():
            labeled[i].append(z)
    return rows


def _panel(result: dict, key: str, title: str, x_off: float, w: float, h: float) -> list[str]:
    """One SVG panel: ``key`` Dice (``"mean_dice"`` student, ``"teacher_mean_dice"``) vs labeled slices."""
    lo, hi, n = (("min_dice", "max_dice", "seeds") if key == "mean_dice"
                 else ("teacher_min_dice", "teacher_max_dice", "teacher_seeds"))
    ys = [100 * r[k] for rows in result["strategies"].values() for r in rows for k in (key, lo, hi) if k in r]
    y0, y1 = max(0.0, 5 * (min(ys) // 5)), min(100.0, 5 * (max(ys) // 5) + 5)
    series = {k: [(r["labeled_slices"], 100 * r[key]) for r in rows if key in r]
              for k, rows in result["strategies"].items()}
    xs = [x for pts in series.values() for x, _ in pts]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    m = 50
    sx = lambda x: x_off + m + (x - x0) / (x1 - x0) * (w - 1.5 * m)  # noqa: E731
    sy = lambda y: h - m - (y - y0) / max(y1 - y0, 1e-9) * (h - 2 * m)  # noqa: E731
    out = [f'<text x="{x_off + w / 2}" y="20" text-anchor="middle" font-weight="bold">{title}</text>',
           f'<line x1="{x_off + m}" y1="{h - m}" x2="{x_off + w - m / 2}" y2="{h - m}" stroke="black"/>',
           f'<line x1="{x_off + m}" y1="{m}" x2="{x_off + m}" y2="{h - m}" stroke="black"/>',
           f'<text x="{x_off + w / 2}" y="{h - 15}" text-anchor="middle">labeled slices (all volumes)</text>',
           f'<text x="{x_off + 15}" y="{h / 2}" transform="rotate(-90 {x_off + 15} {h / 2})" '
           f'text-anchor="middle">mean Dice (%)</text>']
    for x in sorted(set(xs)):
        out.append(f'<text x="{sx(x):.1f}" y="{h - m + 15}" text-anchor="middle">{x}</text>')
    step = 5 if y1 - y0 <= 30 else 10
    for y in np.arange(y0 + (-y0) % step, y1 + 1e-9, step):
        out.append(f'<text x="{x_off + m - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.0f}</text>')
        out.append(f'<line x1="{x_off + m}" y1="{sy(y):.1f}" x2="{x_off + w - m / 2}" y2="{sy(y):.1f}" stroke="#ddd"/>')
    for i, (name, pts) in enumerate(series.items()):
        c = COLOURS.get(name, "#000000")
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="'
                   + " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts) + '"/>')
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{c}"/>' for x, y in pts]
        for r in result["strategies"][name]:  # range over the seeds, slightly offset per strategy
            if lo in r and r.get(n, 1) > 1:
                x = sx(r["labeled_slices"]) + (i - len(series) / 2) * 3
                out.append(f'<line x1="{x:.1f}" y1="{sy(100 * r[lo]):.1f}" x2="{x:.1f}" '
                           f'y2="{sy(100 * r[hi]):.1f}" stroke="{c}" stroke-opacity="0.5"/>')
        out.append(f'<text x="{x_off + w - 175}" y="{h - m - 10 - 15 * (len(series) - 1 - i)}" fill="{c}">{name}</text>')
    return out


COLOURS = {"entropy": "#d62728", "teacher-entropy": "#ff7f0e", "teacher-entropy-spread": "#bcbd22",
           "teacher-total-entropy": "#9467bd", "disagreement": "#1f77b4", "margin": "#17becf",
           "random": "#7f7f7f", "even": "#2ca02c"}


def plot(result: dict, path: Path) -> None:
    """A small SVG chart (no plotting dependency): mean Dice vs labeled slices per
    strategy, EMA teacher (left) and student (right); bars span the seeds."""
    w, h = 460, 380
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{2 * w}" height="{h}" fill="white"/>']
    out += _panel(result, "teacher_mean_dice", "EMA teacher", 0, w, h)
    out += _panel(result, "mean_dice", "student (note the wider Dice axis)", w, w, h)
    out.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "acdc"))
    ap.add_argument("--volumes", type=int, default=6, help="validation volumes used (the first N of val.list)")
    ap.add_argument("--rounds", type=int, default=4, help="slices added per volume")
    ap.add_argument("--initial-iterations", type=int, default=500)
    ap.add_argument("--round-iterations", type=int, default=200)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--variant", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337],
                    help="training/random seeds; results of earlier seeds in --out are kept and averaged")
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "active_learning.json"))
    ap.add_argument("--plot", default=str(Path(__file__).resolve().parents[1] / "docs" / "images" / "active_learning.svg"))
    ap.add_argument("--report", action="store_true", help="only rebuild the summaries, plot and tables from --out")
    args = ap.parse_args()
    if args.report:
        if not Path(args.out).is_file():
            raise SystemExit(f"--report: no results at {args.out}; run the benchmark first (or pass --out)")
        report(json.loads(Path(args.out).read_text()), Path(args.out), Path(args.plot))
        return
    tune_malloc()
    root = Path(args.data)
    if not (root / "val.list").is_file():
        raise SystemExit(f"no ACDC validation data at {root} (needs val.list and volumes/)")
    vols = acdc_val_volumes(root)[: args.volumes]
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "plot", "seeds", "strategies", "data", "report")}
    if result.get("settings") not in (None, settings):
        raise SystemExit(f"{out} holds results for other settings {result['settings']}; use another --out")
    result.update({"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
                   "torch": torch.__version__, "settings": settings,
                   "volumes": [name for name, _, _ in vols]})
    runs = result.setdefault("runs", {})
    for seed in args.seeds:
        shared = tempfile.TemporaryDirectory()
        round0 = Path(shared.name) / "round0.pt"
        for s in args.strategies:
            with tempfile.TemporaryDirectory() as tmp:
                runs.setdefault(str(seed), {})[s] = run_strategy(s, vols, args, Path(tmp), seed, round0)
            result["strategies"] = average_runs(runs)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2))
        shared.cleanup()
    report(result, out, Path(args.plot))


def report(result: dict, out: Path, plot_path: Path) -> None:
    """Summaries into ``result`` (written to ``out``), the plot and the markdown tables."""
    result["strategies"] = average_runs(result["runs"])
    result["mean_dice_after_round0"] = {
        key: {s: mean_after_round0(rows, key) for s, rows in result["strategies"].items()}
        for key in ("teacher_mean_dice", "mean_dice")}
    result["mean_dice_after_round0_per_seed"] = {
        key: {seed: {s: mean_after_round0(rows, key) for s, rows in by_s.items()} for seed, by_s in result["runs"].items()}
        for key in ("teacher_mean_dice", "mean_dice")}
    result["slices_to_reach"] = {
        key: {f"{t:.2f}": {s: slices_to_reach(rows, t, key) for s, rows in result["strategies"].items()}
              for t in (0.70, 0.75, 0.80, 0.85)}
        for key in ("teacher_mean_dice", "mean_dice")}
    out.write_text(json.dumps(result, indent=2))
    plot(result, plot_path)
    for key, name in (("teacher_mean_dice", "EMA teacher"), ("mean_dice", "student")):
        print(f"\n{name}: mean Dice (%)\n")
        print(markdown_table(result, key))
        print()
        print(reach_table(result, key))
        print()
        print(seed_table(result, key))


def average_runs(runs: dict[str, dict[str, list[dict]]]) -> dict[str, list[dict]]:
    """Per strategy and round: mean student Dice over the seeds that ran it (with
    min, max and count), and the mean EMA-teacher Dice over the seeds that recorded it."""
    out: dict[str, list[dict]] = {}
    names = sorted({s for by_s in runs.values() for s in by_s}, key=lambda s: STRATEGIES.index(s))
    for s in names:
        seeds = [by_s[s] for by_s in runs.values() if s in by_s]
        rows = []
        for r in range(min(len(x) for x in seeds)):
            d = [x[r]["mean_dice"] for x in seeds]
            row = {"round": r, "labeled_slices": seeds[0][r]["labeled_slices"], "mean_dice": float(np.mean(d)),
                   "min_dice": float(np.min(d)), "max_dice": float(np.max(d)), "seeds": len(d)}
            t = [x[r]["teacher_mean_dice"] for x in seeds if "teacher_mean_dice" in x[r]]
            if t:
                row.update({"teacher_mean_dice": float(np.mean(t)), "teacher_min_dice": float(np.min(t)),
                            "teacher_max_dice": float(np.max(t)), "teacher_seeds": len(t)})
            rows.append(row)
        out[s] = rows
    return out


def mean_after_round0(rows: list[dict], key: str = "mean_dice") -> float | None:
    """Mean Dice (fraction) over the rounds after round 0: the area under the curve,
    less noisy than any single round. ``key``: ``"mean_dice"`` (student) or
    ``"teacher_mean_dice"``; None where the rows lack it."""
    vals = [r[key] for r in rows[1:] if key in r]
    return float(np.mean(vals)) if vals and len(vals) == len(rows) - 1 else None


def slices_to_reach(rows: list[dict], dice: float, key: str = "mean_dice") -> int | None:
    """Fewest labeled slices (all volumes) at which the mean Dice (``key``) reached
    ``dice`` (a fraction); None: never."""
    for r in rows:
        if r.get(key, -1.0) >= dice:
            return int(r["labeled_slices"])
    return None


def reach_table(result: dict, key: str = "mean_dice",
                thresholds: tuple[float, ...] = (0.70, 0.75, 0.80, 0.85)) -> str:
    """Labeled slices each strategy needed to reach each mean Dice (— : not within the rounds)."""
    names = list(result["strategies"])
    lines = ["| mean Dice reached | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for t in thresholds:
        cells = [slices_to_reach(result["strategies"][s], t, key) for s in names]
        lines.append(f"| ≥ {100 * t:.0f} % | " + " | ".join("—" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


def markdown_table(result: dict, key: str = "mean_dice") -> str:
    """Mean Dice (%, ``key``) per strategy (columns) after each round (rows), ± half the seed range."""
    names = list(result["strategies"])
    lo, hi, n = (("min_dice", "max_dice", "seeds") if key == "mean_dice"
                 else ("teacher_min_dice", "teacher_max_dice", "teacher_seeds"))

    def cell(r: dict) -> str:
        if key not in r:
            return "—"
        return f"{100 * r[key]:.1f}" + (f" ± {50 * (r[hi] - r[lo]):.1f}" if lo in r and r.get(n, 1) > 1 else "")

    def mean_cell(rows: list[dict]) -> str:
        v = mean_after_round0(rows, key)
        return "—" if v is None else f"**{100 * v:.1f}**"

    lines = ["| labeled slices | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for r in range(min(len(v) for v in result["strategies"].values())):
        slices = result["strategies"][names[0]][r]["labeled_slices"]
        lines.append(f"| {slices} | " + " | ".join(cell(result["strategies"][s][r]) for s in names) + " |")
    lines.append("| **mean after round 0** | " + " | ".join(mean_cell(result["strategies"][s]) for s in names) + " |")
    return "\n".join(lines)


def seed_table(result: dict, key: str = "mean_dice") -> str:
    """Mean Dice (%, ``key``) after round 0 per seed (rows) and strategy (columns):
    whether a strategy's lead holds seed by seed."""
    names = list(result["strategies"])
    lines = ["| seed | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for seed, by_s in result["runs"].items():
        vals = [mean_after_round0(by_s[s], key) if s in by_s else None for s in names]
        lines.append(f"| {seed} | " + " | ".join("—" if v is None else f"{100 * v:.1f}" for v in vals) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
