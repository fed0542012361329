"""Median time of one M³HL training step and one supervised step.

ACDC setting: 2D U-Net, 256×256, batch 24 and 8, on the current device
(``--device``). Besides the two steps it times the bare network passes an
M³HL step needs (teacher forward on the B/2 unlabeled images without grad,
student forward + backward on the B mixed images, SGD step) and reports
``m3hl_over_passes`` = M³HL step / those passes: the cost of the mixing,
losses, pseudo-labels (with connected components) and the EMA update.
Batches are made on the device from random tensors so data loading is not
timed. Writes ``benchmarks/results/train_step.json``.

    python benchmarks/train_step.py [--device auto] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from napari_m3hl.config import load_preset
from napari_m3hl.losses import seg_loss
from napari_m3hl.networks import build_network
from napari_m3hl.runtime import resolve_device, tune_malloc
from napari_m3hl.teacher import ema_update, init_teacher
from napari_m3hl.trainer import m3hl_losses, supervised_losses


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench(batch: int, device: torch.device, repeats: int, variant: str) -> dict:
    cfg = load_preset("acdc_unet2d", variant, batch_size=batch, device=str(device))
    torch.manual_seed(0)
    student = build_network(cfg.arch, 1, cfg.num_classes).to(device)
    teacher = build_network(cfg.arch, 1, cfg.num_classes).to(device)
    init_teacher(teacher, student, "copy")
    opt = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    half = batch // 2
    img_l = torch.rand(half, 1, 256, 256, device=device)
    lab_l = torch.randint(0, 4, (half, 256, 256), device=device)
    img_u = torch.rand(half, 1, 256, 256, device=device)
    amp = device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if amp else torch.autocast("cpu", enabled=False)

    def m3hl_step():
        res = m3hl_losses(cfg, student, teacher, img_l, lab_l, img_u, gen, autocast)
        opt.zero_grad(set_to_none=True)
        res.losses["total"].backward()
        opt.step()
        ema_update(teacher, student, 0.99)

    def sup_step():
        res = supervised_losses(cfg, student, img_l, lab_l, autocast)
        opt.zero_grad(set_to_none=True)
        res.losses["total"].backward()
        opt.step()

    mixed = torch.rand(batch // 2, 1, 256, 256, device=device)
    lab_mixed = torch.randint(0, 4, (batch // 2, 256, 256), device=device)

    def passes():
        teacher.train(cfg.teacher_mode == "train")
        with torch.no_grad(), autocast():
            teacher(img_u)
        student.train()
        with autocast():
            out = student(mixed)
        opt.zero_grad(set_to_none=True)
        seg_loss(out.logits, lab_mixed).backward()
        opt.step()

    t_m3hl = _median_time(m3hl_step, device, repeats)
    t_sup = _median_time(sup_step, device, repeats)
    t_pass = _median_time(passes, device, repeats)
    return {
        "batch": batch, "variant": variant, "m3hl_step_s": round(t_m3hl, 4), "supervised_step_s": round(t_sup, 4),
        "network_passes_s": round(t_pass, 4), "m3hl_over_passes": round(t_m3hl / t_pass, 3),
        "m3hl_images_per_s": round(batch / t_m3hl, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[24, 8])
    ap.add_argument("--variant", default="paper")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step.json"))
    args = ap.parse_args()
    tune_malloc()
    device = resolve_device(args.device)
    rows = [bench(b, device, args.repeats, args.variant) for b in args.batches]
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    result = {"device": str(device), "device_name": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(),
              "load_average_1min": round(os.getloadavg()[0], 2), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"| batch | M³HL step (s) | supervised step (s) | network passes (s) | M³HL / passes |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['m3hl_step_s']} | {r['supervised_step_s']} | {r['network_passes_s']} | {r['m3hl_over_passes']} |")


if __name__ == "__main__":
    main()
