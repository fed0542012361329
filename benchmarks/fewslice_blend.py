"""What to show after a few-slice fine-tune: the network alone, its EMA teacher, a
shorter budget, or a blend with the start model? Computed from cached probabilities.

``--cache`` runs the few-slice loop (``napari_m3hl.fewslice.loop.prepare`` + ``run``,
the product's path, with the options given by ``--set``) on the ACDC validation
volumes under both painting rules of ``benchmarks/fewslice.py``, and stores per
volume and rule, as uint8 (probability × 255) NumPy files under ``--cache-dir``
(outside the repository): the start model's class probabilities, the student's
and the EMA teacher's at every check, those of weight-space interpolations
between start and fine-tuned weights, and the fine-tuned checkpoint.
``--report`` scores candidate segmentations on the unpainted slices (3D Dice
per class, mean of RV/Myo/LV, as ``benchmarks/fewslice.py``), writes
``benchmarks/results/fewslice_blend.json`` and prints the table of
docs/benchmarks.md:

* ``start``: the start model alone; ``student``/``teacher``: the fine-tuned
  networks alone (at 100 iterations unless ``@N``);
* ``blend w``: ``argmax(w·p_start + (1 − w)·p_student)``, the average of class
  probabilities (``FewSliceOptions.start_blend``);
* ``weights α``: one network with weights ``(1 − α)·θ_start + α·θ_tuned``
  (BatchNorm statistics interpolated too);
* ``+lcc``: largest 3D connected component per class kept.

``--table`` scores cache folders (shifts, seeds) under the default's share rule
into a JSON key (``--key``); ``--compare`` sets two or more such keys (the
supervised default, M³HL modes) side by side; ``--ensemble`` scores the start model
with both modes' students, from pairs of caches of the same volumes and seed.

    python benchmarks/fewslice_blend.py --cache --cache-dir /tmp/fsx/def --start-blend 0
    python benchmarks/fewslice_blend.py --report --cache-dir /tmp/fsx/def
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Sequence
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from fewslice import painted_for  # noqa: E402

from napari_m3hl.fewslice import loop as fs  # noqa: E402
from napari_m3hl.io.checkpoint import load_checkpoint  # noqa: E402
from napari_m3hl.method.components import largest_component_per_class  # noqa: E402
from napari_m3hl.data.cached import read_list  # noqa: E402
from napari_m3hl.io.h5 import load_h5_volume  # noqa: E402
from napari_m3hl.metrics.binary import dice  # noqa: E402
from napari_m3hl.metrics.quality import mean_dice, painted_dice  # noqa: E402
from napari_m3hl.fewslice.trust import BlendChoice, settle_blend, start_share  # noqa: E402
from napari_m3hl.inference.predictor import Predictor  # noqa: E402

ALPHAS = (0.25, 0.5, 0.75)
WEIGHTS = (0.3, 0.4, 0.5, 0.6, 0.7)
GRID = tuple(round(0.1 * i, 1) for i in range(11))  # blend weights scored


def _q(p: np.ndarray) -> np.ndarray:
    return np.round(p * 255).astype(np.uint8)


def _probs(ckpt: dict, which: str, image: np.ndarray, tta: bool = False) -> np.ndarray:
    return Predictor.from_checkpoint(ckpt, which, blend=False, tta=tta).predict(image, return_probs=True)[1]


def cache_case(name: str, image: np.ndarray, label: np.ndarray, sel: list[int], start: str,
               options: fs.FewSliceOptions, out: Path, lean: bool = False, tta: bool = False) -> None:
    """Fine-tune on the slices ``sel`` of one volume and store probabilities (uint8) in ``out/{name}.npz``
    (``lean``: the start model's and the student's at each check only; ``tta``: also the start model's
    and the last student's under flip test-time augmentation, ``start tta`` and ``student tta``)."""
    painted = np.zeros_like(label)
    painted[sel] = label[sel]
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    job = fs.prepare(start, image, painted, options)
    store = {"label": label, "painted": np.asarray(sel), "start": _q(job.base_probs)}
    tmp = out / "tmp"
    for e in fs.run(job, out_dir=tmp):
        if isinstance(e, fs.Check):
            ck = load_checkpoint(tmp / "last.pt")
            for which in ("student",) if lean else ("student", "teacher"):
                store[f"{which}@{e.iteration}"] = _q(_probs(ck, which, job.image))
    tuned = load_checkpoint(tmp / "last.pt")
    if tta:
        store["start tta"] = _q(_probs(fs.blend_partner(load_checkpoint(start)), "student", job.image, tta=True))
        store["student tta"] = _q(_probs(tuned, "student", job.image, tta=True))
    s0 = {k: v.float() if v.is_floating_point() else v for k, v in load_checkpoint(start)["student"].items()}
    s1 = {k: v.float() if v.is_floating_point() else v for k, v in tuned["student"].items()}
    for a in () if lean else ALPHAS:
        mixed = {k: (1 - a) * s0[k] + a * s1[k] if s0[k].is_floating_point() else s1[k] for k in s0}
        store[f"weights{a}"] = _q(_probs({**tuned, "student": mixed}, "student", job.image))
    store["seconds"] = np.array([time.perf_counter() - t0, load0])
    np.savez_compressed(out / f"{name}.npz", **store)
    shutil.copy(tmp / "last.pt", out / f"{name}.pt")
    print(f"{name} painted {sel}: {time.perf_counter() - t0:.0f} s (load {load0:.1f})", flush=True)


def _score(lab: np.ndarray, ref: np.ndarray, off: np.ndarray) -> list[float]:
    return [float(dice(lab[off] == c, ref[off] == c)) for c in (1, 2, 3)]


def _clean(prob: np.ndarray) -> np.ndarray:
    """The argmax of class probabilities (C, D, H, W), each class's largest 3D component kept."""
    return largest_component_per_class(prob.argmax(0).astype(np.uint8)[None], 4)[0]


def loop_view(p: dict[str, np.ndarray], ref: np.ndarray, sel: np.ndarray) -> tuple[float | None, float | None]:
    """What the few-slice loop sees of one cached volume when it settles the share: the start model's
    mean Dice (0..1) on the painted slices ``sel`` of ``ref`` (before training) and the student's
    change, 1 − mean Dice between its cleaned segmentations of the unpainted slices at its last two
    checks (after; None with one check). ``p``: the cache's probabilities (``start``, ``student@N``)."""
    its = sorted(int(k.split("@")[1]) for k in p if k.startswith("student@"))
    off = np.setdiff1d(np.arange(ref.shape[0]), sel)
    painted = np.zeros_like(ref)
    painted[sel] = ref[sel]
    score = painted_dice(_clean(p["start"]), painted, ("bg", "RV", "Myo", "LV"))[0]
    change = 1.0 - mean_dice(_clean(p[f"student@{its[-1]}"])[off], _clean(p[f"student@{its[-2]}"])[off], 4) \
        if len(its) > 1 and off.size else None
    return score, change


def score_case(path: Path, rules: dict[str, tuple[float, ...]] | None = None) -> dict[str, list[float]]:
    """Per candidate segmentation: Dice RV, Myo, LV on the unpainted slices; under ``painted start``
    the start model's Dice on the painted slices (what the loop can see before it trains) and under
    ``student change`` 1 − Dice of the student's (cleaned) segmentations of the unpainted slices at
    its last two checks (what it sees after). ``rules``: name -> (start_blend, start_blend_untrusted,
    start_blend_stable, stable_change, trust_low, trust_high), the start model's share as the loop
    settles it from those two (:func:`napari_m3hl.fewslice.trust.settle_blend`), scored with and
    without cleaning (``+lcc``), and the share under ``name weight``. With flip-TTA probabilities in
    the cache (``--tta``): ``start tta``, ``student tta`` and each rule's share of the two."""
    z = np.load(path)
    ref, sel = z["label"], z["painted"]
    off = np.setdiff1d(np.arange(ref.shape[0]), sel)
    p = {k: z[k].astype(np.float32) / 255 for k in z.files if k not in ("label", "painted", "seconds")}
    its = sorted(int(k.split("@")[1]) for k in p if k.startswith("student@"))
    last = its[-1]
    cands = {"start": p["start"], "student": p[f"student@{last}"]}
    if f"teacher@{last}" in p:
        cands["teacher"] = p[f"teacher@{last}"]
        cands["blend 0.5 teacher"] = 0.5 * p["start"] + 0.5 * p[f"teacher@{last}"]
    cands.update({f"student@{i}": p[f"student@{i}"] for i in its[:-1]})
    cands.update({f"weights {a}": p[f"weights{a}"] for a in ALPHAS if f"weights{a}" in p})
    cands.update({f"blend {w:g}": w * p["start"] + (1 - w) * p[f"student@{last}"] for w in GRID})
    cands.update({f"blend 0.5 @{i}": 0.5 * p["start"] + 0.5 * p[f"student@{i}"] for i in its[:-1]})
    score, change = loop_view(p, ref, sel)
    weights = {}
    for name, (trusted, untrusted, stable, stable_change, low, high) in (rules or {}).items():
        first = BlendChoice(start_share(score, trusted, min(untrusted, trusted), low, high), score)
        weights[name] = settle_blend(first, change, trusted, untrusted, stable, stable_change, low, high).weight
    cands.update({name: w * p["start"] + (1 - w) * p[f"student@{last}"] for name, w in weights.items()})
    if len(its) > 1:
        cands.update({f"{name}, students @{its[-2]} + @{last}":
                      w * p["start"] + (1 - w) * (p[f"student@{last}"] + p[f"student@{its[-2]}"]) / 2
                      for name, w in weights.items()})
    if "student tta" in p:
        cands.update({"start tta": p["start tta"], "student tta": p["student tta"]})
        cands.update({f"{name}, tta": w * p["start tta"] + (1 - w) * p["student tta"] for name, w in weights.items()})
    out = {}
    for k, prob in cands.items():
        lab = prob.argmax(0).astype(np.uint8)
        out[k] = _score(lab, ref, off)
        if k in ("start", "student", "blend 0.5", "blend 0.55", "blend 0.6", "start tta", "student tta") or \
                any(k.startswith(name) for name in weights):
            out[k + " +lcc"] = _score(largest_component_per_class(lab[None], 4)[0], ref, off)
    out["painted start"] = [score]
    out["student change"] = [change]
    out.update({f"{name} weight": [w] for name, w in weights.items()})
    return out


def default_rule() -> dict[str, tuple[float, ...]]:
    """The few-slice default's share rule (``FewSliceOptions``), as a ``score_case`` rule."""
    o = fs.FewSliceOptions()
    return {"share from the painted slices and the student's change (default)":
            (o.start_blend, o.start_blend_untrusted, o.start_blend_stable, o.stable_change, o.trust_low,
             o.trust_high)}


def previous_rule() -> dict[str, tuple[float, ...]]:
    """The rule before the student's change counted (2026-12-05): the share from the painted slices alone."""
    o = fs.FewSliceOptions()
    return {"share from the painted slices (before)": (o.start_blend, o.start_blend_untrusted,
                                                       o.start_blend_untrusted, 0.0, o.trust_low, o.trust_high)}


def report(cache: Path, json_path: Path, name: str) -> str:
    cases = {f.stem: score_case(f, default_rule()) for f in sorted(cache.glob("*.npz"))}
    results = json.loads(json_path.read_text()) if json_path.is_file() else {"runs": {}}
    opts = json.loads((cache / "options.json").read_text()) if (cache / "options.json").is_file() else {}
    results["runs"][name] = {"options": opts, "cases": cases}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1))
    rules = [r for r in ("a", "b") if any(n.endswith(f"_{r}") for n in cases)]
    lines = ["| segmentation shown | " + " | ".join(f"rule {r}: mean | {r}: vols < −1 / > +1 vs start | {r}: worst Δ"
                                                 for r in rules) + " |", "|---|" + "---:|---|---:|" * len(rules)]
    keys = [k for k in next(iter(cases.values())) if k not in ("painted start", "student change")
            and not k.endswith(" weight")]
    for k in keys:
        cells = []
        for rule in rules:
            rows = [v for n, v in cases.items() if n.endswith(f"_{rule}")]
            x = np.array([np.mean(v[k]) for v in rows])
            d = 100 * (x - np.array([np.mean(v["start"]) for v in rows]))
            cells += [f"{100 * x.mean():.1f}", f"{(d < -1).sum()} / {(d > 1).sum()}", f"{d.min():+.1f}"]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    n = {r: sum(1 for c in cases if c.endswith(f"_{r}")) for r in "ab"}
    return f"{name}: {n['a']} volumes rule a, {n['b']} rule b\n" + "\n".join(lines)


def _seed_row(label: str, weight: float, rule: str, start: list, alone: list, shown: list) -> str:
    d_alone = 100 * (np.array(alone) - np.array(start))
    d_shown = 100 * (np.array(shown) - np.array(start))
    return (f"| {label} | {weight:g} | {rule} | {len(start)} | {100 * np.mean(start):.1f} | {100 * np.mean(alone):.1f} | "
            f"{100 * np.mean(shown):.1f} | {(d_alone < -1).sum()} / {(d_shown < -1).sum()} | {d_alone.min():+.1f} / "
            f"{d_shown.min():+.1f} | {(d_shown > 1).sum()} |")


def seeds_table(cache_run: dict, fewslice_runs: dict[str, dict], weights: tuple[float, ...] = (0.5, 0.6)) -> str:
    """Per seed and rule: start model, fine-tuned network alone, and the blend shown. From the
    cached run at each of ``weights``; from runs of ``benchmarks/fewslice.py`` at their own
    ``start_blend`` (``tuned`` is the blend shown, ``network`` the network alone). Last, per rule and
    weight, the mean over seeds on the volumes every seed ran."""
    lines = ["| seed (run) | start_blend | rule | volumes | start | network alone | blend shown | "
             "vols < −1: alone / blend | worst Δ: alone / blend | vols > +1 (blend) |",
             "|---|---:|---|---:|---:|---:|---:|---|---|---:|"]
    series: list[tuple[str, float, dict[str, tuple[float, float, float]]]] = []  # (label, weight, case -> values)
    seed = cache_run.get("options", {}).get("seed", "?")
    for w in weights:
        series.append((f"{seed} (cache)", w, {n: (np.mean(v["start"]), np.mean(v["student"]), np.mean(v[f"blend {w}"]))
                                             for n, v in cache_run["cases"].items()}))
    for name, run in fewslice_runs.items():
        series.append((f"{run['options'].get('seed')} ({name})", float(run["options"].get("start_blend", 0.0)),
                       {f"{r['volume']}_{r['rule']}": (np.mean(r["base"]), np.mean(r["network"]), np.mean(r["tuned"]))
                        for r in run["rows"] if "network" in r}))
    for label, w, cases in series:
        for rule in ("a", "b"):
            vals = [v for n, v in cases.items() if n.endswith(f"_{rule}")]
            if vals:
                lines.append(_seed_row(label, w, rule, *zip(*vals)))
    common = set.intersection(*(set(c) for _, _, c in series)) if series else set()
    for w in sorted({w for _, w, _ in series}):
        for rule in ("a", "b"):
            names = sorted(n for n in common if n.endswith(f"_{rule}"))
            per_seed = [100 * np.mean([c[n] for n in names], axis=0) for _, ws, c in series if ws == w and names]
            if len(per_seed) > 1:
                v = np.array(per_seed)
                lines.append(f"| mean (range) of {len(v)} seeds, the {len(names)} volumes all ran | {w:g} | {rule} | "
                             f"{len(names)} | {v[:, 0].mean():.1f} | {v[:, 1].mean():.1f} ({v[:, 1].min():.1f}–"
                             f"{v[:, 1].max():.1f}) | {v[:, 2].mean():.1f} ({v[:, 2].min():.1f}–{v[:, 2].max():.1f}) | | | |")
    return "\n".join(lines)


def volumes(args: argparse.Namespace):
    """(name, image, label) of the first ``--volumes`` validation volumes under ``--shift``, then the phantoms."""
    import tempfile

    from fewslice_m3hl_step import apply_shift

    from napari_m3hl.data.phantom import save_phantom_nifti
    from napari_m3hl.io.nifti import load_nifti

    for n in read_list(Path(args.data) / "val.list")[:args.volumes]:
        image, label = load_h5_volume(Path(args.data) / "volumes" / f"{n}.h5")
        yield (n, *apply_shift(image, label, args.shift)) if args.shift else (n, image, label)
    for seed in args.phantoms:
        with tempfile.TemporaryDirectory() as tmp:
            img, lab = Path(tmp) / "p.nii.gz", Path(tmp) / "p_labels.nii.gz"
            save_phantom_nifti(img, seed=seed, labels_path=lab)
            yield f"phantom{seed}", load_nifti(img).data, np.rint(load_nifti(lab).data).astype(np.uint8)


def shift_table(dirs: list[Path], unshifted: Path | None) -> tuple[str, dict]:
    """One row per cache folder (a shift, or none, for one seed; grouped by folder name over
    seeds): start model, fine-tuned network alone, the share from the painted slices alone
    (:func:`previous_rule`) and the default's rule (:func:`default_rule`: also the student's
    change), all cleaned as the loop shows them (largest 3D component per class); Δ against the
    start per volume; and, with ``unshifted`` (the unshifted folder), the mean Δ on the volumes
    the shift costs the start model 3 points or more."""
    rules = previous_rule() | default_rule()
    before, name = rules
    base = {f.stem: np.mean(score_case(f)["start +lcc"]) for f in sorted(unshifted.glob("*.npz"))} if unshifted else {}
    groups: dict[str, list[dict]] = {}
    for d in dirs:
        cases = {f.stem: score_case(f, rules) for f in sorted(d.glob("*.npz"))}
        for rl in ("a", "b"):
            sel = {n: v for n, v in cases.items() if n.endswith(f"_{rl}")}
            if sel:
                groups.setdefault(f"{d.name} ({rl})", []).append(sel)
    lines = ["| volumes (rule) | seeds | n | start | network alone | share from the painted slices | **and the "
             "student's change (default)** | share used (range) | worst Δ: before / now | vols < −1: before / now | "
             "where the shift costs ≥ 3: n, Δ before / now |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|---|---|"]
    out = {}
    for g, seeds in groups.items():
        m = lambda k: np.array([[100 * np.mean(v[k]) for v in sel.values()] for sel in seeds])  # noqa: E731
        start, alone, prev, got = m("start +lcc"), m("student +lcc"), m(f"{before} +lcc"), m(f"{name} +lcc")
        w = np.array([[v[f"{name} weight"][0] for v in sel.values()] for sel in seeds])
        dp, dr = prev - start, got - start
        costly = [i for i, n in enumerate(seeds[0]) if n in base and 100 * base[n] - start[0, i] >= 3]
        cost = (f"{len(costly)}, {dp[:, costly].mean():+.1f} / {dr[:, costly].mean():+.1f}"
                if costly and not g.startswith("none") else "")
        spread = lambda x: f"{x.mean(1).mean():.2f}" + (  # noqa: E731
            f" ({x.mean(1).min():.2f}–{x.mean(1).max():.2f})" if len(x) > 1 else "")
        lines.append(f"| {g} | {len(seeds)} | {start.shape[1]} | {start.mean():.1f} | {spread(alone)} | {spread(prev)} | "
                     f"**{spread(got)}** | {w.mean():.2f} ({w.min():.2f}–{w.max():.2f}) | {dp.min():+.1f} / "
                     f"{dr.min():+.1f} | {(dp < -1).sum()} / {(dr < -1).sum()} | {cost} |")
        out[g] = {"start": start.tolist(), "alone": alone.tolist(), "before": prev.tolist(), "rule": got.tolist(),
                  "share": w.tolist(), "student_change": [[v["student change"][0] for v in sel.values()] for sel in seeds],
                  "cases": list(seeds[0])}
    return "\n".join(lines), out


def ensemble_case(sup: Path, m3hl: Path) -> dict[str, list[float]]:
    """One volume fine-tuned twice (the supervised default's cache ``sup``, the M³HL mode's ``m3hl``,
    same volume, rule and seed): Dice RV, Myo, LV on the unpainted slices, cleaned, of each mode's shown
    segmentation (its settled share), the two students averaged, and the start model with both
    students (equal thirds; or the supervised run's settled share for the start model and the rest
    split evenly between the students). ``start`` for the Δ."""
    a, b = np.load(sup), np.load(m3hl)
    if not np.array_equal(a["painted"], b["painted"]):
        raise SystemExit(f"{sup.name}: the two caches painted different slices")
    ref, sel = a["label"], a["painted"]
    off = np.setdiff1d(np.arange(ref.shape[0]), sel)
    f = lambda z, k: z[k].astype(np.float32) / 255  # noqa: E731
    last = lambda z: max((k for k in z.files if k.startswith("student@")), key=lambda k: int(k.split("@")[1]))  # noqa: E731
    p0, ps, pm = f(a, "start"), f(a, last(a)), f(b, last(b))
    (name,) = default_rule()
    ws = score_case(sup, default_rule())[f"{name} weight"][0]
    wm = score_case(m3hl, default_rule())[f"{name} weight"][0]
    cands = {"start": p0, "supervised (shown)": ws * p0 + (1 - ws) * ps, "M³HL (shown)": wm * p0 + (1 - wm) * pm,
             "the two students": (ps + pm) / 2, "start and both students, thirds": (p0 + ps + pm) / 3,
             "start (supervised share) and both students": ws * p0 + (1 - ws) / 2 * (ps + pm)}
    return {k: _score(_clean(v), ref, off) for k, v in cands.items()}


def ensemble_table(pairs: list[tuple[Path, Path]]) -> tuple[str, dict]:
    """:func:`ensemble_case` over the cases both folders of each (supervised, M³HL) pair hold, one pair
    per seed: per candidate the mean ×100 over the seeds (range of the seeds' means), Δ against the start
    per (volume, seed): worst, below the start, more than 1 below."""
    per_seed = []
    for sup, m3 in pairs:
        names = sorted({f.stem for f in sup.glob("*.npz")} & {f.stem for f in m3.glob("*.npz")})
        per_seed.append({n: ensemble_case(sup / f"{n}.npz", m3 / f"{n}.npz") for n in names})
    lines = ["| segmentation (rule) | seeds | n | mean (seeds' range) | worst Δ | below start | more than 1 below |",
             "|---|---:|---:|---|---:|---:|---:|"]
    out = {}
    for rule in ("a", "b"):
        sel = [{n: v for n, v in seed.items() if n.endswith(f"_{rule}")} for seed in per_seed]
        sel = [x for x in sel if x]
        if not sel:
            continue
        common = sorted(set.intersection(*(set(x) for x in sel)))
        for k in next(iter(sel[0].values())):
            x = np.array([[100 * np.mean(seed[n][k]) for n in common] for seed in sel])
            d = x - np.array([[100 * np.mean(seed[n]["start"]) for n in common] for seed in sel])
            spread = f" ({x.mean(1).min():.2f}–{x.mean(1).max():.2f})" if len(sel) > 1 else ""
            lines.append(f"| {k} ({rule}) | {len(sel)} | {len(common)} | {x.mean():.2f}{spread} | {d.min():+.1f} | "
                         f"{(d < 0).sum()} | {(d < -1).sum()} |")
            out[f"{k} ({rule})"] = {"dice": x.tolist(), "cases": common}
    return "\n".join(lines), out


def mode_table(results: dict, keys: Sequence[str]) -> str:
    """Two or more ``--table`` keys side by side (the first usually the supervised default, the
    others M³HL modes), one line per row (shift and rule) every key holds, over the seeds all hold
    (the first ``k`` of each) and the volumes all hold (matched by name): mean Dice ×100 on the
    unpainted slices of the start model, each key's network alone and shown (the settled share,
    cleaned, before the safeguard); the shown minus the start per volume over all seeds (range,
    below the start, more than 1 below); the share used and the student's change at the last check
    (medians). Columns list the keys' values in the order given, separated by " / "."""
    rows = [results[k]["rows"] for k in keys]
    lines = [f"| volumes (rule) | seeds | n | start | network alone: {' / '.join(keys)} | **shown** | Δ range | "
             "below start | more than 1 below | share used (median) | student's change (median) |",
             "|---|---:|---:|---:|---|---|---|---|---|---|---|"]
    for row in [r for r in rows[-1] if all(r in x for x in rows)]:
        rs = [x[row] for x in rows]
        k = min(len(r["rule"]) for r in rs)
        cases = [c for c in rs[0]["cases"] if all(c in r["cases"] for r in rs)]
        # seeds × volumes of one key, its volumes in the order of ``cases``
        arr = lambda r, key: np.array(r[key][:k], dtype=float)[:, [r["cases"].index(c) for c in cases]]  # noqa: E731
        start = arr(rs[0], "start")
        deltas = [arr(r, "rule") - arr(r, "start") for r in rs]
        seeds = lambda x: f"{x.mean():.2f}" + (f" ({x.mean(1).min():.2f}–{x.mean(1).max():.2f})" if k > 1 else "")  # noqa: E731
        med = lambda r, key: np.median([x for x in np.ravel(arr(r, key)) if np.isfinite(x)])  # noqa: E731
        def cols(f) -> str:
            return " / ".join(f(r, d) for r, d in zip(rs, deltas))

        alone = cols(lambda r, d: seeds(arr(r, "alone")))
        shown = cols(lambda r, d: seeds(arr(r, "rule")))
        span = cols(lambda r, d: f"{d.min():+.1f} … {d.max():+.1f}")
        below, below1 = cols(lambda r, d: str((d < 0).sum())), cols(lambda r, d: str((d < -1).sum()))
        share = cols(lambda r, d: f"{med(r, 'share'):.2f}")
        change = cols(lambda r, d: f"{100 * med(r, 'student_change'):.1f} %")
        lines.append(f"| {row} | {k} | {len(cases)} | {start.mean():.1f} | {alone} | **{shown}** | {span} | {below} | "
                     f"{below1} | {share} | {change} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", action="store_true", help="run the fine-tunes and cache probabilities")
    ap.add_argument("--report", action="store_true", help="score the cache, write the JSON, print the table")
    ap.add_argument("--cache-dir", default=None, help="a folder outside the repository")
    ap.add_argument("--name", default=None, help="run name in the JSON (default: the cache folder's name)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "acdc"))
    ap.add_argument("--start", default=str(ROOT / "models" / "acdc70_unet2d.pt"))
    ap.add_argument("--volumes", type=int, default=20)
    ap.add_argument("--rules", nargs="+", default=["a", "b"], choices=["a", "b"])
    ap.add_argument("--shift", default="", choices=["", "gamma", "bias", "rot90", "res"],
                    help="a scanner-like change of every volume (benchmarks/fewslice_m3hl_step.py)")
    ap.add_argument("--phantoms", nargs="*", type=int, default=[], metavar="SEED",
                    help="also the phantom volumes of these seeds (the demo's NIfTI, rule a: its two slices)")
    ap.add_argument("--table", nargs="*", default=[], metavar="DIR",
                    help="cache folders (a shift or none, one seed each; same-named folders are seeds of one row): "
                         "the table of docs/benchmarks.md, 'How much of the start model to keep'")
    ap.add_argument("--unshifted", default=None, help="with --table: the unshifted folder of seed 1337")
    ap.add_argument("--key", default="share_rule",
                    help="with --table: the JSON key its rows go under (e.g. share_rule_m3hl_mode for --set mode=m3hl "
                         "caches); rows the key already holds under the same share rule and not scored now stay")
    ap.add_argument("--compare", nargs="+", default=None, metavar="KEY",
                    help="print two or more --table keys of --json side by side (the supervised default first, "
                         "then M³HL modes)")
    ap.add_argument("--ensemble", nargs="+", default=None, metavar="SUP_DIR=M3HL_DIR",
                    help="score the start model with both modes' students, one supervised=M³HL cache pair per seed "
                         "(JSON key ensemble)")
    ap.add_argument("--lean", action="store_true", help="cache the start model and the student only")
    ap.add_argument("--tta", action="store_true", help="also cache both under flip test-time augmentation")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a FewSliceOptions field")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "fewslice_blend.json"))
    ap.add_argument("--seeds", nargs="*", default=[], metavar="RUN",
                    help="with --report: runs of benchmarks/results/fewslice.json (other seeds, the default blend) "
                         "for the per-seed table")
    args = ap.parse_args()
    if args.ensemble:
        text, rows = ensemble_table([tuple(Path(x) for x in p.split("=", 1)) for p in args.ensemble])
        results = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {"runs": {}}
        results["ensemble"] = rows
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(text)
        return
    if args.compare:
        if len(args.compare) < 2:
            ap.error("--compare needs two or more --table keys")
        print(mode_table(json.loads(Path(args.json).read_text()), args.compare))
        return
    if args.table:
        text, rows = shift_table([Path(d) for d in args.table], Path(args.unshifted) if args.unshifted else None)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        results = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {"runs": {}}
        kept = results.get(args.key, {})
        # Under the same share rule the rows scored now replace theirs and the others stay.
        if kept.get("rule") == json.loads(json.dumps(default_rule())):
            rows = kept["rows"] | rows
        results[args.key] = {"rule": default_rule(), "rows": rows}
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(text)
        return
    if not args.cache_dir:
        ap.error("--cache-dir is needed with --cache or --report")
    cache = Path(args.cache_dir)
    if args.cache:
        import yaml

        torch.set_num_threads(args.threads)
        options = fs.FewSliceOptions(**{k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)})
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "options.json").write_text(json.dumps(vars(options) | {"shift": args.shift}))
        for n, image, label in volumes(args):
            done: dict[tuple, str] = {}
            for rule in args.rules:
                sel = painted_for(label, rule)
                f = cache / f"{n}_{rule}.npz"
                if tuple(sel) in done:  # both rules paint the same slices: one (deterministic) fine-tune
                    shutil.copy(cache / f"{done[tuple(sel)]}.npz", f)
                elif not f.is_file():
                    cache_case(f"{n}_{rule}", image, label, sel, args.start, options, cache, args.lean, args.tta)
                done[tuple(sel)] = f"{n}_{rule}"
    if args.report:
        print(report(cache, Path(args.json), args.name or cache.name))
        if args.seeds:
            runs = json.loads((ROOT / "benchmarks" / "results" / "fewslice.json").read_text())["runs"]
            cached = json.loads(Path(args.json).read_text())["runs"][args.name or cache.name]
            print()
            print(seeds_table(cached, {n: runs[n] for n in args.seeds}))


if __name__ == "__main__":
    main()
