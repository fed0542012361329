"""Steps per second of M³HL training on 1, 2, ... processes (torchrun + DDP).

Sibling of ``train_step.py``: here the whole trainer loop is timed
(``trainer.train`` with the DDP student, batch making, gradient all-reduce,
BatchNorm buffer broadcast, loss all-reduce and the EMA update), on phantom
data, for each process count in ``--nprocs``. Each count is one
``torchrun --standalone`` job; rank 0 times ``--steps`` iterations after
``--warmup`` and reports the median step time.

Reported per process count N: ``steps_per_s`` (iterations per second; every
process makes one step per iteration), ``global_images_per_s`` (steps/s ×
the global batch, batch × N) and ``scaling_efficiency`` = global images/s at
N / (N × global images/s at 1). The load average of the machine is recorded
beside every timing: on a shared machine other work competes for the cores.

    python benchmarks/train_step_ddp.py                       # CPU, gloo, 1 and 2 processes, 1 thread each
    python benchmarks/train_step_ddp.py --device cuda --nprocs 1 2 4 8 --patch 256 --batch 24   # GPUs, NCCL

Writes ``benchmarks/results/train_step_ddp.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> int:
    import torch

    from napari_m3hl.training import events as ev
    from napari_m3hl.config import load_preset
    from napari_m3hl.data.phantom_source import phantom_train_data
    from napari_m3hl.training.distributed import init_distributed, shutdown
    from napari_m3hl.training.trainer import train

    torch.set_num_threads(args.threads)
    ctx = init_distributed(args.device)
    b = args.block or args.patch // 4
    config = load_preset("acdc_unet2d", "reference", iterations=args.warmup + args.steps, batch_size=args.batch,
                         patch_size=(args.patch, args.patch), block_size=(b, b), device=args.device, seed=0,
                         checkpoint_every=0)
    data = phantom_train_data(n_volumes=4, labeled_slices_per_volume=4, seed=0)
    stamps, loads = [], []
    for e in train(config, data, None, dist=ctx):
        if isinstance(e, ev.Progress):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            loads.append(os.getloadavg()[0])
    shutdown(ctx)
    if ctx.rank == 0:
        steps = [t1 - t0 for t0, t1 in zip(stamps[args.warmup - 1:], stamps[args.warmup:])]
        Path(args.result).write_text(json.dumps({"step_s": steps, "loadavg_1min": loads[args.warmup:],
                                                 "world_size": ctx.world_size, "backend": ctx.backend}))
    return 0


def run_count(n: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), __file__,
               "--worker", "--result", str(result), "--device", args.device, "--threads", str(args.threads),
               "--patch", str(args.patch), "--batch", str(args.batch), "--steps", str(args.steps),
               "--warmup", str(args.warmup)] + (["--block", str(args.block)] if args.block else [])
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "OMP_NUM_THREADS": str(args.threads)}
        load_before = os.getloadavg()
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        r = json.loads(result.read_text())
    step = statistics.median(r["step_s"])
    return {"nprocs": n, "backend": r["backend"], "median_step_s": round(step, 4),
            "steps_per_s": round(1 / step, 3), "global_batch": args.batch * n,
            "global_images_per_s": round(args.batch * n / step, 2), "step_s": [round(s, 4) for s in r["step_s"]],
            "loadavg_before": list(load_before), "loadavg_1min_during": r["loadavg_1min"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--patch", type=int, default=128, help="square patch side (ACDC setting: 256)")
    p.add_argument("--batch", type=int, default=8, help="batch per process (ACDC setting: 24)")
    p.add_argument("--block", type=int, default=None, help="mask block side (default patch/4: the 4×4 grid)")
    p.add_argument("--steps", type=int, default=12, help="timed iterations")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1, help="alternate the process counts this many times")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step_ddp.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    import torch

    runs = []
    for rep in range(args.repeats):
        for n in args.nprocs:
            r = run_count(n, args)
            r["repeat"] = rep
            runs.append(r)
            print(f"{n} process(es): {r['steps_per_s']:.2f} steps/s, {r['global_images_per_s']:.1f} images/s "
                  f"(load {r['loadavg_before'][0]:.1f})", flush=True)
    best = {n: max((r for r in runs if r["nprocs"] == n), key=lambda r: r["steps_per_s"]) for n in args.nprocs}
    base = best[args.nprocs[0]]["global_images_per_s"] / args.nprocs[0]
    summary = [{"nprocs": n, "steps_per_s": r["steps_per_s"], "global_images_per_s": r["global_images_per_s"],
                "scaling_efficiency": round(r["global_images_per_s"] / (n * base), 3)} for n, r in best.items()]
    out = {"setting": {"model": "unet2d (acdc_unet2d, reference)", "patch": [args.patch, args.patch],
                       "batch_per_process": args.batch, "device": args.device, "threads_per_process": args.threads,
                       "steps": args.steps, "warmup": args.warmup, "data": "phantom"},
           "machine": {"nproc": len(os.sched_getaffinity(0)), "torch": torch.__version__,
                       "python": platform.python_version(), "platform": platform.platform(),
                       "cuda_devices": torch.cuda.device_count()},
           "summary": summary, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    for s in summary:
        print(s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
