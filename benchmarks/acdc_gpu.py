"""The deciding ACDC rows on one GPU, with one command (issue 10, part 4).

Rows (the paper's input 256×256, batch 24, blocks 64×64; every row of a
group with seeds 1, 2, 3):

* ``sup7``: supervised only, the 7 labeled patients (poly learning rate);
* ``m3hl_fast``: M³HL, the ``fast`` variant (supervised warm start, poly);
* ``m3hl_reference``: M³HL, the authors' released settings (the preset's
  default variant before this run);
* ``sup70``: supervised, all 70 patients (the ceiling; poly learning rate).

The budget is set by time, not by iterations: ``benchmarks/train_step.py``
first times a supervised and an M³HL step on the device (and the making of a
batch from disk), then every 7-patient row gets the same number of
iterations N7 and the 70-patient rows ``--ratio70`` × N7, chosen so that all
rows, run at the same time (one process each), fit ``--window`` seconds even
if the device ran their steps one after another (measured: three rows at a
time ran 1.65× faster than that). ``sup7``, ``m3hl_fast`` and ``sup70``
always run; ``m3hl_reference`` is added while N7 stays at least
``--min-iterations``.

Each row is one ``benchmarks/acdc.py --run-one`` process (validation on the
20 validation volumes every tenth of its run, pseudo-label quality curve,
best student and last EMA teacher scored on the device). Results:
``benchmarks/results/acdc/<method>_gpu_s<seed>.json``; with ``--out`` the
per-row JSONs, the logs, the step timing and, for each group, the best
seed's ``best.pt``/``last.pt`` (half precision) are copied there for
``scripts/ship_model.py``.

``--plan`` prints the plan (groups, seeds, iterations, the serial-time
estimate and every row's command) as one ``PLAN {json}`` line and runs
nothing; the step costs then come from ``--cost`` (a ``train_step.py`` JSON,
by default the H200 measurement in ``benchmarks/results/train_step_gpu.json``)
instead of a calibration on the device. ``--capture`` and
``--data-on-device`` pass the ``TrainConfig`` fields of the same names to
every row (docs/benchmarks.md, "GPU path").

    python benchmarks/acdc_gpu.py --plan --window 300                      # what a window would run (any machine)
    python benchmarks/acdc_gpu.py --pack .gpu_data --window 300 --out $OUT
    python benchmarks/acdc_gpu.py --data ../shared/data/acdc --iterations 4 --groups sup7 --device cpu   # smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
PER_METHOD = BENCH / "results" / "acdc"
GROUPS = {  # name -> (acdc.py method, extra --set, labeled patients)
    "sup7": ("sup7", ["lr_schedule=poly"], 7),
    "m3hl_fast": ("m3hl_fast", [], 7),
    "m3hl_reference": ("m3hl_reference", [], 7),
    "sup70": ("sup70", ["lr_schedule=poly"], 70),
}
PRIORITY = ["sup7", "m3hl_fast", "sup70", "m3hl_reference"]


def cost_from_json(path: Path, capture: str = "off", data_on_device: str = "auto") -> dict:
    """Seconds per step (supervised, M³HL) and per batch from a ``train_step.py``
    JSON (its batch-24 row): the ``captured`` M³HL step when ``capture`` is on
    and the JSON has it, the batch from the device-held set when
    ``data_on_device`` is not ``off`` and the JSON has it."""
    rows = json.loads(Path(path).read_text())["rows"]
    row = next((r for r in rows if r.get("batch") == 24), rows[0])
    med = row["median_s"]
    m3hl = med["captured"] if capture != "off" and "captured" in med else med["fast"]
    batch = row.get("data_batch_s") or 0.0
    if data_on_device != "off" and row.get("data_batch_device_s") is not None:
        batch = row["data_batch_device_s"]
    return {"m3hl": m3hl, "sup": med["supervised_fast"], "batch": batch}


def calibrate(data: str, device: str, out: Path, capture: str = "off", data_on_device: str = "auto") -> dict:
    """Seconds per step (supervised, M³HL) and per batch, from train_step.py on ``device``."""
    dest = out / "train_step_gpu.json"
    cmd = [sys.executable, str(BENCH / "train_step.py"), "--device", device, "--batches", "24", "--repeats", "10",
           "--no-compile", "--data", data, "--out", str(dest), "--variant", "reference"]
    print("calibrate:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=240)
    return cost_from_json(dest, capture, data_on_device)


def plan(cost: dict, window: float, ratio70: float, min_it: int, seeds: dict[str, int], groups: list[str],
         required: int = 3) -> tuple[int, list[str]]:
    """(N7, groups): the first ``required`` groups always run; each later one is
    added while N7 stays at least ``min_it``. N7 is chosen so that every
    chosen row fits ``window`` seconds even if the device ran them serially."""
    c_sup = cost["sup"] + cost["batch"] / 2
    c_m3 = cost["m3hl"] + cost["batch"]
    per_it = {"sup7": c_sup, "m3hl_fast": 0.25 * c_sup + 0.75 * c_m3, "m3hl_reference": c_m3,
              "sup70": ratio70 * c_sup}

    def n_for(chosen: list[str]) -> int:
        return int(window / sum(seeds[g] * per_it[g] for g in chosen))

    chosen = groups[:required]
    for g in groups[required:]:
        if n_for(chosen + [g]) < min_it:
            break
        chosen = chosen + [g]
    return max(50, min(n_for(chosen) // 50 * 50, 30000)), chosen


def serial_seconds(cost: dict, n7: int, n70: int, groups: list[str], seeds: dict[str, int]) -> float:
    """Training seconds of the chosen rows if the device ran their steps one after another."""
    c_sup, c_m3 = cost["sup"] + cost["batch"] / 2, cost["m3hl"] + cost["batch"]
    per_it = {"sup7": c_sup, "m3hl_fast": 0.25 * c_sup + 0.75 * c_m3, "m3hl_reference": c_m3, "sup70": c_sup}
    return sum(seeds[g] * per_it[g] * (n70 if GROUPS[g][2] == 70 else n7) for g in groups)


def command(group: str, seed: int, iterations: int, args: argparse.Namespace, runs: Path) -> tuple[str, list[str]]:
    """(row key, the ``benchmarks/acdc.py --run-one`` command of one row)."""
    method, sets, _ = GROUPS[group]
    suffix = f"gpu_s{seed}"
    cmd = [sys.executable, str(BENCH / "acdc.py"), "--run-one", method, "--budget", "gpu", "--data", args.data,
           "--out", str(runs), "--seed", str(seed), "--suffix", suffix, "--iterations", str(iterations),
           "--val-every", str(max(1, iterations // 10)), "--threads", "1"]
    for s in sets + (["pl_eval_every=%d" % max(1, iterations // 10)] if method.startswith("m3hl") else []):
        cmd += ["--set", s]
    if args.device != "auto":
        cmd += ["--set", f"device={args.device}"]
    cmd += ["--set", f"capture={args.capture}", "--set", f"data_on_device={args.data_on_device}"]
    return f"{method}_{suffix}", cmd


def launch(group: str, seed: int, iterations: int, args: argparse.Namespace, runs: Path) -> tuple[str, subprocess.Popen]:
    key, cmd = command(group, seed, iterations, args, runs)
    log = runs / f"{key}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return key, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _score(r: dict) -> float:
    t = (r.get("teacher_last") or {}).get("summary", {}).get("mean", {}).get("dice", 0.0)
    return max(r["summary"]["mean"]["dice"], t)


def collect(keys: list[str], runs: Path, out: Path, elapsed: dict) -> None:
    """Copy results, logs and each group's best seed's checkpoints (half precision) to ``out``."""
    import torch

    from napari_m3hl.io.checkpoint import save_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    results = {k: json.loads((PER_METHOD / f"{k}.json").read_text()) for k in keys if (PER_METHOD / f"{k}.json").is_file()}
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        for k in keys:
            for p in (PER_METHOD / f"{k}.json", runs / f"{k}.log"):
                if p.is_file():
                    tar.add(p, arcname=p.name)
    summary = {"elapsed_s": elapsed, "rows": {}}
    for k, r in results.items():
        summary["rows"][k] = {"student_best": r["summary"]["mean"]["dice"], "iterations": r["iterations"],
                              "teacher_last": (r.get("teacher_last") or {}).get("summary", {}).get("mean", {}).get("dice"),
                              "train_wall_s": r["train_wall_s"]}
    for group in ("sup70", "m3hl_fast", "m3hl_reference"):  # the candidates for models/ (sup7 is not shipped)
        cands = [k for k in results if re.fullmatch(rf"{GROUPS[group][0]}_gpu_s\d+", k)]
        if not cands:
            continue
        best = max(cands, key=lambda k: _score(results[k]))
        summary.setdefault("picked", {})[group] = best
        with tarfile.open(out / f"ckpt_{group}.tar", "w") as tar:
            for name in ("best.pt", "last.pt"):
                src = runs / best / name
                if not src.is_file():
                    continue
                ck = torch.load(src, map_location="cpu", weights_only=True)
                ck.pop("optimizer", None)
                ck.pop("rng", None)
                for net in ("student", "teacher"):
                    if net in ck:
                        ck[net] = {n: v.half() if v.is_floating_point() else v for n, v in ck[net].items()}
                ck.pop("weights_sha256", None)
                tmp = out / f"_{name}"
                save_checkpoint(tmp, ck)
                tar.add(tmp, arcname=f"{best}/{name}")
                tmp.unlink()
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2), flush=True)


def report(groups: list[str] | None = None) -> str:
    """Markdown table from the per-row JSONs: per group, mean and range over
    seeds of the best student's and the last EMA teacher's metrics."""
    lines = ["| Row | seeds | iterations | Dice (%), best student: mean (range) | Jaccard (%) | HD95 (px) | "
             "ASD (px) | Dice RV / Myo / LV | Dice (%), EMA teacher @last: mean (range) | train min per row |",
             "|---|---:|---:|---|---:|---:|---:|---|---|---:|"]
    for g in groups or list(GROUPS):
        rows = [json.loads(p.read_text()) for p in sorted(PER_METHOD.glob(f"{GROUPS[g][0]}_gpu_s*.json"))
                if re.fullmatch(rf"{GROUPS[g][0]}_gpu_s\d+", p.stem)]  # not a continued run (_cont)
        if not rows:
            continue

        def mean(vals: list[float]) -> float:
            return sum(vals) / len(vals)

        def rng(vals: list[float]) -> str:
            return f"{100 * mean(vals):.2f} ({100 * min(vals):.2f}–{100 * max(vals):.2f})"

        m = [r["summary"]["mean"] for r in rows]
        cls = {c: mean([next(x["dice"]["mean"] for x in r["summary"]["classes"] if x["name"] == c) for r in rows])
               for c in ("RV", "Myo", "LV")}
        teach = [r["teacher_last"]["summary"]["mean"]["dice"] for r in rows if r.get("teacher_last")]
        teach = teach if any(teach) else []  # 0.0: a supervised row's teacher before its BatchNorm fix
        its = sorted({r["iterations"] for r in rows})
        early = any(r.get("stopped_early") for r in rows)
        lines.append(
            f"| {rows[0]['label'].split(' [')[0]} | {len(rows)} | {'/'.join(map(str, its))}{' (stopped)' if early else ''} | "
            f"{rng([x['dice'] for x in m])} | {100 * mean([x['jaccard'] for x in m]):.2f} | "
            f"{mean([x['hd95'] for x in m]):.2f} | {mean([x['asd'] for x in m]):.2f} | "
            f"{100 * cls['RV']:.1f} / {100 * cls['Myo']:.1f} / {100 * cls['LV']:.1f} | "
            f"{rng(teach) if teach else '— (not scored: its BatchNorm statistics were never updated, fixed since)'} | "
            f"{mean([r['train_wall_s'] for r in rows]) / 60:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "acdc"))
    ap.add_argument("--pack", default=None, help="a folder written by acdc_transfer.py pack; unpacked to /tmp first")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--window", type=float, default=300.0, help="seconds of training for all rows together")
    ap.add_argument("--ratio70", type=float, default=3.0, help="iterations of the 70-patient rows per 7-patient one")
    ap.add_argument("--min-iterations", type=int, default=2500)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seeds70", type=int, default=None, help="seeds of the 70-patient row (default --seeds)")
    ap.add_argument("--groups", nargs="+", default=PRIORITY, choices=list(GROUPS))
    ap.add_argument("--iterations", type=int, default=None, help="fixed N7, no timing (smoke tests)")
    ap.add_argument("--grace", type=float, default=1.6, help="rows still running after grace × window are stopped")
    ap.add_argument("--total", type=float, default=1e9, help="seconds this command may take in all (the device's limit)")
    ap.add_argument("--margin", type=float, default=75.0, help="seconds kept after the soft deadline to score and collect")
    ap.add_argument("--out", default=None, help="copy results and the picked checkpoints here")
    ap.add_argument("--report", action="store_true", help="only print the table of the results present")
    ap.add_argument("--plan", "--dry-run", dest="plan", action="store_true",
                    help="print the plan (PLAN {json}) from --cost and run nothing")
    ap.add_argument("--cost", default=str(BENCH / "results" / "train_step_gpu.json"),
                    help="train_step.py JSON whose step costs --plan uses (no calibration)")
    ap.add_argument("--capture", default="off", choices=["off", "auto", "cuda-graph", "compile"],
                    help="TrainConfig.capture of every row (whole-step capture; not yet measured on a GPU)")
    ap.add_argument("--data-on-device", default="auto", choices=["auto", "on", "off"],
                    help="TrainConfig.data_on_device of every row (auto: the training set on the GPU)")
    args = ap.parse_args(argv)
    if args.report:
        print(report())
        return 0
    t0 = time.time()
    if args.pack and not args.plan:
        sys.path.insert(0, str(BENCH))
        from acdc_transfer import unpack

        args.data = "/tmp/acdc_gpu"
        unpack(Path(args.pack), Path(args.data))
    out = Path(args.out) if args.out else ROOT / "runs" / "acdc_gpu_out"
    runs = ROOT / "runs" / "acdc_gpu"
    seeds = {g: (args.seeds70 or args.seeds) if GROUPS[g][2] == 70 else args.seeds for g in GROUPS}
    if args.iterations:
        n7, groups = args.iterations, list(args.groups)
        cost = (cost_from_json(Path(args.cost), args.capture, args.data_on_device)
                if args.plan and Path(args.cost).is_file() else None)
    else:
        if args.plan:
            cost = cost_from_json(Path(args.cost), args.capture, args.data_on_device)
        else:
            out.mkdir(parents=True, exist_ok=True)
            cost = calibrate(args.data, args.device, out, args.capture, args.data_on_device)
        n7, groups = plan(cost, args.window, args.ratio70, args.min_iterations, seeds, list(args.groups))
    n70 = min(30000, int(n7 * args.ratio70) // 50 * 50 or n7)
    if args.plan:
        cmds = [command(g, s, n70 if GROUPS[g][2] == 70 else n7, args, runs)[1]
                for g in groups for s in range(1, seeds[g] + 1)]
        summary = {"cost_s": cost, "cost_from": None if cost is None else args.cost, "window_s": args.window,
                   "n7": n7, "n70": n70, "groups": groups, "seeds": {g: seeds[g] for g in groups},
                   "processes": len(cmds),
                   "serial_s": None if cost is None else round(serial_seconds(cost, n7, n70, groups, seeds), 1),
                   "soft_deadline_s": round(args.grace * args.window, 1),
                   "commands": [" ".join(c) for c in cmds]}
        print("PLAN " + json.dumps(summary, indent=2), flush=True)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    print(f"plan: cost {cost}, N7 {n7}, N70 {n70}, groups {groups}, seeds {args.seeds}", flush=True)
    runs.mkdir(parents=True, exist_ok=True)
    t_train = time.time()
    procs = [launch(g, s, n70 if GROUPS[g][2] == 70 else n7, args, runs) for g in groups for s in range(1, seeds[g] + 1)]
    # rows still training at the soft deadline are asked to stop (SIGTERM: they save, score and write their
    # result, marked stopped_early); whatever still runs at the hard deadline is killed
    soft = min(t_train + args.grace * args.window, t0 + args.total - args.margin)
    hard = t0 + args.total - 20
    done: dict[str, float] = {}
    asked = False
    while len(done) < len(procs):
        time.sleep(2)
        for key, p in procs:
            if key not in done and p.poll() is not None:
                done[key] = round(time.time() - t_train, 1)
                print(f"done {key}: exit {p.returncode} after {done[key]} s", flush=True)
        if not asked and time.time() > soft:
            asked = True
            for key, p in procs:
                if key not in done:
                    p.terminate()
                    print(f"asked {key} to stop (soft deadline)", flush=True)
        if time.time() > hard:
            for key, p in procs:
                if key not in done:
                    p.kill()
                    done[key] = -1.0
                    print(f"killed {key} at the hard deadline", flush=True)
    collect([k for k, _ in procs], runs, out, {"total": round(time.time() - t0, 1), "rows": done})
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
