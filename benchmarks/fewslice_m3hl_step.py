"""Why the M³HL step hurts a strong start model in the few-slice loop: one
fine-tune per (variant, volume), scored at every check.

The few-slice loop's M³HL mode (:mod:`napari_m3hl.fewslice.loop`) lost to the
supervised fine-tune (docs/benchmarks.md, "M³HL in the few-slice loop"): the
student alone fell to 5–45 mean Dice in the first 25 iterations. This script
takes the step apart on ACDC validation volumes: each ``--variant`` is a
``FewSliceOptions`` change (``opt.KEY=VALUE``), a ``TrainConfig`` change of the
prepared job (``cfg.KEY=VALUE``, e.g. ``cfg.use_hl=false``: no feature terms;
``cfg.use_mix=false``: supervised loss on the painted slices plus the feature
terms) or ``near=K`` (diagnostic only: the unlabeled set cut to the slices at
most K from a painted one, so each mixed image joins two neighbouring slices).
``--shift`` applies a deterministic scanner-like change to the image
(``gamma``: intensity^1.8; ``bias``: a smooth 0.4–1.6 multiplicative field;
``rot90``: a quarter turn in-plane; ``res``: 0.7× in-plane resampling of the
image and of the label alike).

Per check: the student alone, the teacher alone and the segmentation shown
(blended with the start model) on the unpainted slices (mean 3D Dice of RV,
Myo, LV ×100), and the loss terms averaged per 10 iterations. Rows accumulate
in ``benchmarks/results/fewslice_m3hl_step.json`` under ``--name``.

    python benchmarks/fewslice_m3hl_step.py --name frozen --volumes 1 \\
        --variant opt.mode=m3hl --variant opt.ema_decay=1.0
    python benchmarks/fewslice_m3hl_step.py --report
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
from napari_m3hl.training import events as ev  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "fewslice_m3hl_step.json"


def apply_shift(image: np.ndarray, label: np.ndarray, shift: str) -> tuple[np.ndarray, np.ndarray]:
    """(image, label) under a deterministic scanner-like change; the image is
    first scaled to [0, 1]. See the module docstring for the shifts."""
    img = np.asarray(image, np.float32)
    x = (img - img.min()) / max(float(img.max() - img.min()), 1e-8)
    if shift == "gamma":
        return (x ** 1.8).astype(np.float32), label
    if shift == "bias":
        h, w = x.shape[1:]
        yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
        return (x * (1.0 + 0.4 * xx + 0.2 * yy * xx)[None]).astype(np.float32), label
    if shift == "rot90":
        return (np.ascontiguousarray(np.rot90(x, 1, axes=(1, 2))),
                np.ascontiguousarray(np.rot90(label, 1, axes=(1, 2))))
    if shift == "res":
        import torch.nn.functional as F

        size = tuple(int(round(s * 0.7)) for s in x.shape[1:])
        xi = F.interpolate(torch.from_numpy(x)[:, None], size=size, mode="bilinear", align_corners=False)
        # The label is resampled as the image is (each class's indicator bilinearly, then the most
        # likely class), so it stays on the anatomy the resampled image shows. Torch's "nearest"
        # picks source pixel floor(i / 0.7), up to 0.7 pixel off that grid: against such a label
        # the ground truth itself, resampled, scored only 91-94 Dice on these volumes.
        classes = int(label.max()) + 1
        onehot = F.one_hot(torch.from_numpy(label.astype(np.int64)), classes).permute(0, 3, 1, 2).float()
        li = F.interpolate(onehot, size=size, mode="bilinear", align_corners=False).argmax(1)
        return xi[:, 0].numpy(), li.numpy().astype(label.dtype)
    raise ValueError(f"unknown shift {shift!r}")


def parse_variant(items: list[str]) -> tuple[dict, dict, int]:
    opt, cfg, near = {}, {}, 0
    for item in items:
        key, value = item.split("=", 1)
        if key.startswith("opt."):
            opt[key[4:]] = yaml.safe_load(value)
        elif key.startswith("cfg."):
            cfg[key[4:]] = yaml.safe_load(value)
        elif key == "near":
            near = int(value)
        else:
            raise SystemExit(f"--variant {item}: use opt.KEY=VALUE, cfg.KEY=VALUE or near=K")
    return opt, cfg, near


def run_one(name: str, image: np.ndarray, label: np.ndarray, rule: str, start: str, items: list[str]) -> dict:
    opt, cfg, near = parse_variant(items)
    sel = painted_for(label, rule)
    painted = np.zeros_like(label)
    painted[sel] = label[sel]
    off = np.setdiff1d(np.arange(label.shape[0]), sel)
    t0 = time.perf_counter()
    job = fs.prepare(start, image, painted, fs.FewSliceOptions(**opt))
    if cfg:
        job.config = job.config.replace(**cfg)
    if near:
        u = job.data.unlabeled
        u.index = [(v, z) for v, z in u.index if min(abs(z - s) for s in sel) <= near]
    checks, losses, verdict = [], {}, None
    for e in fs.run(job):
        if isinstance(e, ev.Progress):
            for k, v in e.losses.items():
                losses.setdefault(k, []).append(float(v))
        elif isinstance(e, fs.Check):
            c = {"iteration": e.iteration, "shown": 100 * float(np.mean(per_class(e.labels, label, off)))}
            c.update({net: 100 * float(np.mean(per_class(lab, label, off))) for net, lab in e.networks.items()})
            checks.append(c)
        elif isinstance(e, fs.FewSliceResult):
            verdict = e.verdict
    base = 100 * float(np.mean(per_class(job.base, label, off)))
    row = {"volume": name, "rule": rule, "variant": items, "base": base, "checks": checks,
           "suspect": bool(verdict.suspect), "verdict": verdict.message,
           "seconds": time.perf_counter() - t0, "load": os.getloadavg()[0],
           "losses": {k: [float(np.mean(v[j:j + 10])) for j in range(0, len(v), 10)] for k, v in losses.items()}}
    print(f"{name} {rule} {' '.join(items) or 'supervised default'}: start {base:.1f} | " + " | ".join(
        f"{c['iteration']}: student {c['student']:.1f} teacher {c['teacher']:.1f} shown {c['shown']:.1f}"
        for c in checks) + f" ({row['seconds']:.0f} s){' SAFEGUARD: ' + verdict.message if verdict.suspect else ''}", flush=True)
    return row


def first_batch(name: str, image: np.ndarray, label: np.ndarray, rule: str, start: str) -> dict:
    """The start model (eval mode) on one batch as the M³HL step builds it
    (seed 0): mean foreground Dice ×100 and loss on the painted slices unmixed,
    and on the mixed images against their mixed targets (the frozen teacher's
    pseudo-labels where unlabeled). The gap is what the step asks the student
    to learn first."""
    from napari_m3hl.io.checkpoint import load_model
    from napari_m3hl.method.augment import prepare_batch_2d
    from napari_m3hl.method.losses import mix_loss, seg_loss
    from napari_m3hl.method.mixing import block_masks, mix
    from napari_m3hl.method.teacher import pseudo_labels

    sel = painted_for(label, rule)
    painted = np.zeros_like(label)
    painted[sel] = label[sel]
    job = fs.prepare(start, image, painted, fs.FewSliceOptions(mode="m3hl"))
    cfg, patch = job.config, tuple(job.config.patch_size)
    model, _ = load_model(start)
    model.eval()
    g = torch.Generator().manual_seed(0)
    lab = [job.data.labeled[i % len(job.data.labeled)] for i in range(4)]
    unl = [(job.data.unlabeled[i % len(job.data.unlabeled)][0], None) for i in range(0, 8, 2)]
    il, yl = prepare_batch_2d(lab, patch, g, image_interp=cfg.image_interp)
    iu, _ = prepare_batch_2d(unl, patch, g, image_interp=cfg.image_interp)

    def fg_dice(pred: torch.Tensor, ref: torch.Tensor) -> float:
        return 100 * float(np.mean([2 * ((pred == c) & (ref == c)).sum().item()
                                    / max(1, ((pred == c).sum() + (ref == c).sum()).item()) for c in (1, 2, 3)]))

    with torch.no_grad():
        out = model(il).logits
        pl = pseudo_labels(model(iu).logits.float(), lcc=True)
        m = block_masks(2, patch, cfg.block_size, cfg.mask_ratio, generator=g)
        mixed = torch.cat([mix(iu[:2], il[:2], m), mix(il[2:], iu[2:], m)])
        target = torch.cat([mix(pl[:2], yl[:2], m), mix(yl[2:], pl[2:], m)])
        om = model(mixed).logits
        row = {"volume": name, "rule": rule, "dice_unmixed": fg_dice(out.argmax(1), yl),
               "loss_unmixed": float(seg_loss(out, yl)), "dice_mixed": fg_dice(om.argmax(1), target),
               "loss_mixed": float(mix_loss(om[:2], target[:2], m, cfg.alpha, 1.0)
                                   + mix_loss(om[2:], target[2:], m, 1.0, cfg.alpha))}
    print(f"{name} {rule} start model on one batch: painted slices {row['dice_unmixed']:.1f} Dice (loss "
          f"{row['loss_unmixed']:.2f}), mixed images {row['dice_mixed']:.1f} Dice (mix loss {row['loss_mixed']:.2f})")
    return row


def report(results: dict) -> str:
    lines = ["| run | volume (shift) | rule | start | student at 25 / 50 / 75 / 100 | shown at 100 | safeguard | loss terms, first → last 10 it |",
             "|---|---|---|---|---|---|---|---|"]
    for name, run in results["runs"].items():
        for r in run["rows"]:
            stud = " / ".join(f"{c['student']:.1f}" for c in r["checks"])
            loss = ", ".join(f"{k} {v[0]:.2f} → {v[-1]:.2f}" for k, v in r["losses"].items() if k != "total")
            safe = "?" if "suspect" not in r else ("fired: the start model shown" if r["suspect"] else "-")
            vol = r["volume"] + (f" ({run['shift']})" if run.get("shift") else "")
            lines.append(f"| {name} | {vol} | {r['rule']} | {r['base']:.1f} | {stud} | {r['checks'][-1]['shown']:.1f} | {safe} | {loss} |")
    return "\n".join(lines)


def summary(results: dict, min_rows: int = 3) -> str:
    """Per run (with at least ``min_rows`` rows) and rule: the mean start, the
    mean shown at the last check (the safeguard's start model where it
    fired), Δ mean and range, volumes below their start, the student alone,
    median seconds."""
    lines = ["| run | rule | volumes | start | shown | Δ mean | Δ range | below start | student alone | median s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, run in results["runs"].items():
        for rule in ("a", "b"):
            rows = [r for r in run["rows"] if r["rule"] == rule]
            if len(rows) < min_rows:
                continue
            shown = [r["base"] if r.get("suspect") else r["checks"][-1]["shown"] for r in rows]
            d = [x - r["base"] for x, r in zip(shown, rows)]
            tag = f" ({run['shift']})" if run.get("shift") else ""
            lines.append(f"| {name}{tag} | {rule} | {len(rows)} | {np.mean([r['base'] for r in rows]):.1f} | "
                         f"{np.mean(shown):.1f} | {np.mean(d):+.1f} | {min(d):+.1f} … {max(d):+.1f} | "
                         f"{sum(x < 0 for x in d)} | {np.mean([r['checks'][-1]['student'] for r in rows]):.1f} | "
                         f"{np.median([r['seconds'] for r in rows]):.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "acdc"))
    ap.add_argument("--start", default=str(ROOT / "models" / "acdc70_unet2d.pt"))
    ap.add_argument("--name")
    ap.add_argument("--volumes", default="1", help="comma-separated indices into val.list")
    ap.add_argument("--rules", default="a")
    ap.add_argument("--variant", action="append", default=[], help="opt.KEY=VALUE, cfg.KEY=VALUE or near=K")
    ap.add_argument("--shift", default="", choices=["", "gamma", "bias", "rot90", "res"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(OUT))
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--first-batch", action="store_true",
                    help="no training: the start model on one unmixed and one mixed batch per volume")
    args = ap.parse_args()
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    if not args.report:
        if not args.name:
            raise SystemExit("--name is required for a run")
        torch.set_num_threads(args.threads)
        names = read_list(Path(args.data) / "val.list")
        if args.first_batch:
            rows = []
            for i in (int(x) for x in args.volumes.split(",")):
                image, label = load_h5_volume(Path(args.data) / "volumes" / f"{names[i]}.h5")
                if args.shift:
                    image, label = apply_shift(image, label, args.shift)
                rows += [first_batch(names[i], image, label, r, args.start) for r in args.rules.split(",")]
            fresh = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
            fresh.setdefault("first_batch", {})[args.name] = rows
            path.write_text(json.dumps(fresh, indent=1))
            return
        run = {"variant": args.variant, "shift": args.shift, "threads": args.threads, "rows": []}
        for i in (int(x) for x in args.volumes.split(",")):
            image, label = load_h5_volume(Path(args.data) / "volumes" / f"{names[i]}.h5")
            if args.shift:
                image, label = apply_shift(image, label, args.shift)
            for rule in args.rules.split(","):
                run["rows"].append(run_one(names[i], image, label, rule, args.start, args.variant))
        fresh = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
        fresh["runs"][args.name] = run
        path.write_text(json.dumps(fresh, indent=1))
        results = fresh
    print(report(results))
    print()
    print(summary(results))


if __name__ == "__main__":
    main()
