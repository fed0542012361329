"""Ship a trained ACDC benchmark result as a model file: ``models/<name>.pt``
(half precision, one network) and its card ``models/<name>.yaml``, holding the
numbers ``m3hl evaluate`` gives for the shipped file, the commands that train,
ship and evaluate it, and the file's size and SHA-256.

The result is one of ``benchmarks/acdc.py``'s rows, named by its key (the
method, plus ``@suffix`` for a run with ``--set`` overrides), whose JSON lies
in ``benchmarks/results/acdc/``:

    python scripts/ship_model.py m3hl_reference --name acdc7_m3hl_unet2d --which teacher
    python scripts/ship_model.py sup70 --name acdc70_unet2d --which teacher
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from acdc import BUDGETS, DEFAULT_DATA, METHODS, PER_METHOD  # noqa: E402  (benchmarks/acdc.py)


def user_command(r: dict) -> str:
    """The benchmark command line that trains result ``r``'s row."""
    if r["budget"] == "gpu":  # benchmarks/acdc_gpu.py runs these rows, 3 seeds at a time
        return (f"python benchmarks/acdc_gpu.py --pack .gpu_data --iterations {r['config']['iterations']} "
                f"--groups {r['method']} --seeds 3  # this model: seed {r['config']['seed']}")
    cmd = f"python benchmarks/acdc.py --budget {r['budget']} --methods {r['method']}"
    if METHODS.get(r["method"], (None, "x"))[1] is None:
        cmd += f" --ablation-variant {r['variant']}"
    for k, v in (r.get("extra_overrides") or {}).items():
        cmd += f" --set {k}={v}"
    if "@" in r["key"]:
        cmd += f" --suffix {r['key'].split('@', 1)[1]}"
    if r["iterations"] != BUDGETS[r["budget"]]["iterations"]:
        cmd += f" --iterations {r['iterations']}"
    return cmd + " --merge"


def _teacher_choice(r: dict) -> str:
    t = r.get("teacher_last")
    if not t:
        return "none: the EMA teacher of the final iteration (run --score-teacher KEY first to compare)"
    return (f"two candidates of the run scored on the 20 validation volumes: the best student (best.pt, iteration "
            f"{r['selection']['best_iteration']}, mean Dice {100 * r['summary']['mean']['dice']:.2f}; the papers' "
            f"choice) and the EMA teacher of the last iteration ({100 * t['summary']['mean']['dice']:.2f}); "
            "the EMA teacher is shipped")


def ship(key: str, name: str, data: str, description: str, which: str = "student") -> int:
    """Save the best student of result ``key`` as ``models/<name>.pt`` (half
    precision, student only) with a card ``models/<name>.yaml`` holding the
    numbers that ``m3hl evaluate`` gives for the shipped file."""
    import hashlib

    import numpy as np
    import yaml

    from napari_m3hl.io.checkpoint import load_model, make_payload, save_checkpoint
    from napari_m3hl.config import TrainConfig
    from napari_m3hl.data import load_val_volumes
    from napari_m3hl.metrics.binary import dice
    from napari_m3hl.inference.predictor import Predictor

    r = json.loads((PER_METHOD / f"{key.replace('@', '_')}.json").read_text())
    src = r["best_checkpoint"] if which == "student" else str(Path(r["best_checkpoint"]).with_name("last.pt"))
    model, ckpt = load_model(src, which)
    cfg = TrainConfig.from_dict(ckpt["config"])
    dest = ROOT / "models" / f"{name}.pt"
    rel = dest.relative_to(ROOT)
    data_rel = os.path.relpath(data, ROOT)
    eval_cmd = f"m3hl evaluate --checkpoint {rel} --data {data_rel} --no-clean"  # the papers' protocol
    ship_cmd = f"python scripts/ship_model.py {key} --name {name}" + (" --which teacher" if which == "teacher" else "")
    weights = ("best student by validation mean Dice (best.pt, as the papers select)" if which == "student" else
               "EMA teacher at the last iteration (last.pt), chosen over the best student on validation (see selection)")
    base = {"recipe": r["label"], "benchmark_key": key, "iteration": int(ckpt["iteration"]), "weights": weights}
    save_checkpoint(dest, make_payload(cfg, model, iteration=int(ckpt["iteration"]), half=True, metrics={}, card=base))
    js = Path("/tmp") / f"{name}_eval.json"
    subprocess.run([sys.executable, "-m", "napari_m3hl", "evaluate", "--checkpoint", str(dest), "--data", data,
                    "--device", "cpu", "--no-clean", "--json", str(js)], check=True, cwd=ROOT)
    ev_res = json.loads(js.read_text())
    summary = ev_res["summary"]
    metrics = {"mean": {k: round(float(v), 4) for k, v in summary["mean"].items()},
               "per_class": {c["name"]: {m: round(float(c[m]["mean"]), 4) for m in ("dice", "jaccard", "hd95", "asd")}
                             for c in summary["classes"]}}
    # the two volumes the regression test uses
    shipped = Predictor.from_checkpoint(dest, clean=False)
    two = []
    for _, image, label in load_val_volumes(data, limit=2):
        pred = shipped.predict(image)
        two.append(float(np.mean([dice(pred == c, label == c) for c in (1, 2, 3)])))
    labeled = r["labeled_patients"]
    card = {
        "name": name,
        "description": description,
        "file": str(rel),
        "architecture": "unet2d (SSL4MIS 2D U-Net, 16/32/64/128/256 channels, 1.81 M parameters)",
        "classes": list(ckpt["class_names"]),
        "input": {"patch_size": list(cfg.patch_size),
                  "preprocessing": "each short-axis slice min-max [0, 1] per volume (NIfTI input: percentile "
                                   "0.5-99.5 scaling), resized bilinearly to the patch size; the argmax is resized "
                                   "back nearest-neighbour"},
        "data": {"source": "ACDC (shared preprocessed form, ../shared/data/acdc)",
                 "labeled": f"{labeled} training patients ({r['n_labeled_slices']} slices"
                            + (", the first 136 of train_slices.list: the papers' 10 % protocol)" if labeled == 7 else ")"),
                 "unlabeled_slices_used": r["n_unlabeled_slices"] if r["config"]["mode"] == "m3hl" else 0,
                 "weights": weights,
                 "selection": "best student by mean validation Dice over the 20 validation volumes "
                              f"(every {r['config']['val_every']} iterations)" if which == "student" else
                              _teacher_choice(r)},
        "recipe": {"method": r["label"], "mode": cfg.mode, "variant": r["variant"], "lr": cfg.lr,
                   "lr_schedule": cfg.lr_schedule, "batch_size": cfg.batch_size, "iterations": r["iterations"],
                   "best_iteration": int(ckpt["iteration"]), "seed": cfg.seed, "low_tap": cfg.low_tap,
                   "teacher_init": cfg.teacher_init, "teacher_mode": cfg.teacher_mode, "lam": cfg.lam,
                   "mix_weight": cfg.mix_weight, "image_interp": cfg.image_interp,
                   "block_size": list(cfg.block_size), "ema_decay": cfg.ema_decay, "use_mix": cfg.use_mix,
                   "use_hl": cfg.use_hl},
        "commands": {"train": user_command(r), "ship": ship_cmd, "evaluate": eval_cmd},
        "training": {"wall_minutes": round(r["train_wall_s"] / 60, 1), "machine": r["machine"], "date": r["date"]},
        "validation": {"command": eval_cmd, "volumes": summary["n_cases"],
                       "units": "Dice/Jaccard fraction; HD95/ASD pixels; a class missing from the prediction "
                                "scores 0 (the papers' convention)",
                       "note": "the same 20 validation volumes selected the checkpoint (the ACDC test patients "
                               "are not in the shared data), so these numbers are optimistic",
                       **metrics,
                       "first_two_volumes_mean_dice": round(float(np.mean(two)), 4)},
        "size_mb": round(dest.stat().st_size / 2**20, 2),
        "sha256": None,
        "date": _dt.date.today().isoformat(),
        "torch": r["machine"]["torch"],
    }
    save_checkpoint(dest, make_payload(cfg, model, iteration=int(ckpt["iteration"]), half=True,
                                       metrics=metrics, card={**base, "validation_mean_dice": metrics["mean"]["dice"]}))
    if cfg.mode == "supervised":  # the M³HL-only settings mean nothing here
        for k in ("variant", "low_tap", "teacher_init", "teacher_mode", "lam", "mix_weight", "block_size",
                  "ema_decay", "use_mix", "use_hl"):
            card["recipe"].pop(k, None)
    dest.chmod(0o644)  # save_checkpoint's temporary file is private (0600); a shipped model is not
    card["size_mb"] = round(dest.stat().st_size / 2**20, 2)
    card["sha256"] = hashlib.sha256(dest.read_bytes()).hexdigest()
    header = (f"# Model card for {rel} (loads with napari_m3hl.io.checkpoint.load_model).\n"
              "# Not a training preset: no 'variants' key on purpose.\n")
    (ROOT / "models" / f"{name}.yaml").write_text(header + yaml.safe_dump(card, sort_keys=False, allow_unicode=True))
    print(f"shipped {rel} ({card['size_mb']} MB): validation mean Dice {100 * metrics['mean']['dice']:.2f}; "
          f"first two volumes {100 * np.mean(two):.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("key", help="the benchmark result to ship (benchmarks/results/acdc/<key>.json)")
    p.add_argument("--name", required=True, help="the model file's name (no suffix)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="ACDC folder whose validation volumes score the file")
    p.add_argument("--description", default="", help="one line for the card")
    p.add_argument("--which", choices=["student", "teacher"], default="student",
                   help="the best student (best.pt, as the papers) or the EMA teacher of last.pt")
    args = p.parse_args(argv)
    return ship(args.key, args.name, args.data, args.description, args.which)


if __name__ == "__main__":
    raise SystemExit(main())
