"""Time one M³HL training step: plain fp32, each speed-up alone, all together,
the bare network passes, and the step written the way the authors' released
code does it.

ACDC setting: 2D U-Net, 256×256, batch 24 (and 8), preset variant
``reference`` by default (the preset's default, and the settings of the
authors' script). All rows are timed round-robin in one process (one step of
each row in turn, ``--repeats`` rounds, median per row), so the machine's
load falls alike on every row and the ratios hold even on a shared machine.

Rows (``--device cpu``; on CUDA the same plus ``compiled`` and ``captured``):

- ``fp32``: fp32, contiguous (NCHW) networks and batches: the plain step;
- ``channels_last``: fp32, NHWC networks and batches;
- ``bf16``: bf16 autocast, NCHW;
- ``fast``: what the trainer does by default (``precision=auto``,
  ``channels_last``): bf16 where the device computes it natively;
- ``passes_fast`` / ``passes_fp32``: only the network passes a step needs
  (teacher forward on the B/2 unlabeled images without grad, student
  forward + backward on B/2 images, SGD step), in the fast / fp32 setting;
- ``authors``: the step as the released M³HL code writes it (fp32, NCHW;
  teacher and student run once per half, pseudo-labels' largest components
  with scikit-image on the CPU per slice and class, EMA by rebuilding the
  teacher's state_dict); same losses, so it does the same maths;
- ``supervised_fp32`` / ``supervised_fast``: a supervised step (B/2 labeled);
- ``captured`` (CUDA only): the ``fast`` step captured whole in one CUDA graph
  (``TrainConfig.capture="cuda-graph"``: teacher, pseudo-labels with their
  components in fixed rounds, mixing, student, losses, backward, SGD, EMA).

Batches come from random tensors already on the device. Separately, the time
to make one real batch (ACDC slices from disk through the augmentation, what
the training loop waits for each step) is measured when ``--data`` exists,
and with it the projected time of the paper budget (30,000 iterations); so is
the time with the set held on the device (``data_on_device``: the upload
once, then each step's two batches gathered and augmented there).
Writes ``benchmarks/results/train_step.json`` (``--out``).

    python benchmarks/train_step.py [--device auto] [--repeats 5] [--batches 24 8]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from napari_m3hl.config import load_preset
from napari_m3hl.method.losses import high_level_loss, low_level_loss, mix_loss, seg_loss
from napari_m3hl.method.mixing import block_masks, mix
from napari_m3hl.method.networks import build_network
from napari_m3hl.runtime import resolve_device, resolve_precision, set_threads, tune_malloc
from napari_m3hl.method.teacher import ema_update, init_teacher
from napari_m3hl.method.step import StepSetup, m3hl_losses, supervised_losses
from napari_m3hl.training.trainer import _make_batch

ROOT = Path(__file__).resolve().parents[1]
PAPER_ITERATIONS = 30000
ROWS = {  # name -> (precision, channels_last)
    "fp32": ("fp32", False),
    "channels_last": ("fp32", True),
    "bf16": ("bf16", False),
    "fast": ("auto", True),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class _Models:
    """Student, teacher and optimiser of one row (same seed for every row)."""

    def __init__(self, cfg, device: torch.device, fmt: torch.memory_format, compile_: bool = False) -> None:
        torch.manual_seed(0)
        self.student = build_network(cfg.arch, 1, cfg.num_classes).to(device, memory_format=fmt)
        self.teacher = build_network(cfg.arch, 1, cfg.num_classes).to(device, memory_format=fmt)
        init_teacher(self.teacher, self.student, "copy")
        self.opt = torch.optim.SGD(self.student.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=1e-4)
        self.run_s, self.run_t = ((torch.compile(self.student), torch.compile(self.teacher)) if compile_
                                  else (self.student, self.teacher))


def _inputs(batch: int, size: int, device: torch.device, fmt: torch.memory_format):
    g = torch.Generator().manual_seed(1)
    half = batch // 2
    img_l = torch.rand(half, 1, size, size, generator=g).to(device).contiguous(memory_format=fmt)
    lab_l = torch.randint(0, 4, (half, size, size), generator=g).to(device)
    img_u = torch.rand(half, 1, size, size, generator=g).to(device).contiguous(memory_format=fmt)
    return img_l, lab_l, img_u


def make_rows(cfg, batch: int, device: torch.device, with_compile: bool) -> dict:
    """name -> zero-argument function running one step of that row."""
    size = cfg.patch_size[0]
    fns = {}
    gen = torch.Generator().manual_seed(0)
    rows = dict(ROWS)
    if with_compile:
        rows["compiled"] = ("auto", True)
    for name, (precision, cl) in rows.items():
        rcfg = cfg.replace(precision=precision, channels_last=cl, compile=name == "compiled")
        setup = StepSetup.from_config(rcfg, device)
        m = _Models(rcfg, device, setup.memory_format, compile_=rcfg.compile)
        img_l, lab_l, img_u = _inputs(batch, size, device, setup.memory_format)

        def step(m=m, setup=setup, rcfg=rcfg, img_l=img_l, lab_l=lab_l, img_u=img_u):
            res = m3hl_losses(rcfg, m.run_s, m.run_t, img_l, lab_l, img_u, gen, setup.autocast)
            m.opt.zero_grad(set_to_none=True)
            res.losses["total"].backward()
            m.opt.step()
            ema_update(m.teacher, m.student, rcfg.ema_decay)

        fns[name] = step
    for name in ("fp32", "fast"):
        precision, cl = ROWS[name]
        rcfg = cfg.replace(precision=precision, channels_last=cl)
        setup = StepSetup.from_config(rcfg, device)
        m = _Models(rcfg, device, setup.memory_format)
        img_l, lab_l, img_u = _inputs(batch, size, device, setup.memory_format)

        def passes(m=m, setup=setup, rcfg=rcfg, mixed=img_l, lab=lab_l, img_u=img_u):
            m.teacher.train(rcfg.teacher_mode == "train")
            with torch.no_grad(), setup.autocast():
                m.teacher(img_u)
            m.student.train()
            with setup.autocast():
                out = m.student(mixed)
            m.opt.zero_grad(set_to_none=True)
            seg_loss(out.logits, lab).backward()
            m.opt.step()

        def sup(m=m, setup=setup, rcfg=rcfg, img_l=img_l, lab_l=lab_l):
            res = supervised_losses(rcfg, m.student, img_l, lab_l, setup.autocast)
            m.opt.zero_grad(set_to_none=True)
            res.losses["total"].backward()
            m.opt.step()

        fns[f"passes_{name}"] = passes
        fns[f"supervised_{name}"] = sup
    fns["authors"] = authors_step(cfg.replace(precision="fp32", channels_last=False), batch, device)
    if device.type == "cuda":
        fns["captured"] = captured_row(cfg, batch, device)
    return fns


def _skimage_largest_cc(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per slice and class: to the CPU, ``skimage.measure.label`` (full
    connectivity), keep the largest component, back to the device."""
    from skimage.measure import label

    out = []
    for i in range(labels.shape[0]):
        seg = labels[i]
        acc = np.zeros(tuple(seg.shape), dtype=np.int64)
        for c in range(1, num_classes):
            m = (seg == c).cpu().numpy()
            comp = label(m)
            if comp.max() == 0:
                acc += m * c
                continue
            acc += (comp == np.argmax(np.bincount(comp.ravel())[1:]) + 1) * c
        out.append(acc)
    return torch.from_numpy(np.stack(out)).to(labels.device)


def _state_dict_ema(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """EMA as a rebuilt state dict loaded back into the teacher."""
    s, t = student.state_dict(), teacher.state_dict()
    teacher.load_state_dict({k: decay * t[k] + (1 - decay) * s[k] for k in s})


def authors_step(cfg, batch: int, device: torch.device):
    """One step as the released code does it (see the module docstring)."""
    m = _Models(cfg, device, torch.contiguous_format)
    img_l, lab_l, img_u = _inputs(batch, cfg.patch_size[0], device, torch.contiguous_format)
    gen = torch.Generator().manual_seed(0)
    n = batch // 4
    tap = cfg.low_tap

    def step():
        la, lb, ya, yb, ua, ub = img_l[:n], img_l[n:], lab_l[:n], lab_l[n:], img_u[:n], img_u[n:]
        m.teacher.train(cfg.teacher_mode == "train")
        with torch.no_grad():
            t_a, t_b = m.teacher(ua), m.teacher(ub)
            pa = _skimage_largest_cc(torch.softmax(t_a.logits, 1).argmax(1), cfg.num_classes)
            pb = _skimage_largest_cc(torch.softmax(t_b.logits, 1).argmax(1), cfg.num_classes)
        mask = block_masks(n, tuple(cfg.patch_size), cfg.block_size, cfg.mask_ratio, generator=gen, device=device)
        m.student.train()
        s_u = m.student(mix(ua, la, mask))
        s_l = m.student(mix(lb, ub, mask))
        loss = cfg.mix_weight * (mix_loss(s_u.logits, mix(pa, ya, mask), mask, cfg.alpha, 1.0)
                                 + mix_loss(s_l.logits, mix(yb, pb, mask), mask, 1.0, cfg.alpha))
        low = low_level_loss((s_u.features[tap], s_l.features[tap]), (t_a.features[tap], t_b.features[tap]))
        high = high_level_loss((s_u.features["high"], s_l.features["high"]), (t_a.features["high"], t_b.features["high"]))
        loss = loss + cfg.lam * (low + high)
        m.opt.zero_grad()
        loss.backward()
        m.opt.step()
        _state_dict_ema(m.teacher, m.student, cfg.ema_decay)

    return step


def captured_row(cfg, batch: int, device: torch.device):
    """The ``captured`` row (CUDA only): the fast step as one CUDA graph
    (:class:`napari_m3hl.training.capture.GraphStep` over ``step_function``;
    the block mask, learning rate, α and EMA decay enter as tensors)."""
    from napari_m3hl.training.capture import GraphStep, ensure_momentum_buffers, graph_autocast, step_function

    rcfg = cfg.replace(precision="auto", channels_last=True, capture="cuda-graph")
    setup = StepSetup.from_config(rcfg, device)
    m = _Models(rcfg, device, setup.memory_format)
    ensure_momentum_buffers(m.opt)
    img_l, lab_l, img_u = _inputs(batch, rcfg.patch_size[0], device, setup.memory_format)
    fn = step_function(rcfg, m.student, m.teacher, m.opt, graph_autocast(setup), m3hl=True, ema_buffers=rcfg.teacher_bn)
    graph = GraphStep(fn, lambda: m.opt.zero_grad(set_to_none=True))
    gen = torch.Generator().manual_seed(0)
    n = batch // 4
    scalars = {k: torch.tensor(v, device=device) for k, v in (("lr", rcfg.lr), ("alpha", rcfg.alpha),
                                                                ("decay", rcfg.ema_decay))}

    def step():
        mask = block_masks(n, tuple(rcfg.patch_size), rcfg.block_size, rcfg.mask_ratio, generator=gen, device=device)
        graph({"img_l": img_l, "lab_l": lab_l, "img_u": img_u, "mask": mask, **scalars})

    return step


def data_batch_device_time(cfg, data_root: Path, device: torch.device, repeats: int) -> tuple[float, float] | None:
    """(seconds to upload the 7-patient training set once, median seconds to
    make one step's two batches from it): :mod:`napari_m3hl.data.device`, the
    set held on ``device`` and each batch gathered and augmented there."""
    if not (data_root / "train_slices.list").is_file():
        return None
    from napari_m3hl.data import load_train_data
    from napari_m3hl.data.device import device_sets

    data = load_train_data(str(data_root), labeled_patients=7)
    t = time.perf_counter()
    sets = device_sets(data.labeled, data.unlabeled, cfg.replace(data_on_device="on"), device)
    _sync(device)
    upload = time.perf_counter() - t
    half = cfg.batch_size // 2
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        sets[0].batch(rng.integers(0, len(sets[0]), half).tolist(), gen)
        sets[1].batch(rng.integers(0, len(sets[1]), half).tolist(), gen)
        _sync(device)
        times.append(time.perf_counter() - t)
    return upload, statistics.median(times[1:])


def time_rows(fns: dict, device: torch.device, repeats: int, warmup: int = 2):
    """Round-robin timing: each round runs every row once. Returns wall
    seconds and this process's CPU seconds (``time.process_time``) per row
    and round: on a shared CPU the CPU seconds of a 1-thread run hardly move
    with the other jobs' load, the wall seconds do."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return times, cpu


def data_batch_time(cfg, data_root: Path, device: torch.device, repeats: int) -> float | None:
    """Median seconds to make one step's two batches (B/2 labeled + B/2
    unlabeled ACDC slices read from disk, augmented, on ``device``), fresh
    slices each time so the loader's cache does not hide the reads."""
    if not (data_root / "train_slices.list").is_file():
        return None
    from napari_m3hl.data import load_train_data

    data = load_train_data(str(data_root), labeled_patients=7)
    half = cfg.batch_size // 2
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    fmt = StepSetup.from_config(cfg, device).memory_format
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        _make_batch([data.labeled[int(i)] for i in rng.integers(0, len(data.labeled), half)], cfg, gen, device, fmt)
        _make_batch([(data.unlabeled[int(i)][0], None) for i in rng.integers(0, len(data.unlabeled), half)],
                    cfg, gen, device, fmt)
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def bench(batch: int, device: torch.device, repeats: int, variant: str, data_root: Path, with_compile: bool) -> dict:
    cfg = load_preset("acdc_unet2d", variant, batch_size=batch, device=str(device))
    fns = make_rows(cfg, batch, device, with_compile)
    load_before = os.getloadavg()[0]
    times, cpu = time_rows(fns, device, repeats)
    wall = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    # ratios from CPU seconds on a CPU device (robust to other jobs), wall seconds on a GPU
    med = cpu_med if device.type == "cpu" else wall
    row = {"batch": batch, "variant": variant, "size": list(cfg.patch_size),
           "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
           "ratios_from": "cpu_s" if device.type == "cpu" else "median_s",
           "median_s": {k: round(v, 4) for k, v in wall.items()},
           "all_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
           "cpu_s": {k: round(v, 4) for k, v in cpu_med.items()},
           "all_cpu_s": {k: [round(x, 4) for x in v] for k, v in cpu.items()}}
    ratios = {f"{k}_over_fp32": round(med[k] / med["fp32"], 3) for k in ROWS if k != "fp32"}
    ratios["fast_over_passes_fast"] = round(med["fast"] / med["passes_fast"], 3)
    ratios["fp32_over_passes_fp32"] = round(med["fp32"] / med["passes_fp32"], 3)
    ratios["fast_over_authors"] = round(med["fast"] / med["authors"], 3)
    ratios["fp32_over_authors"] = round(med["fp32"] / med["authors"], 3)
    if "compiled" in med:
        ratios["compiled_over_fast"] = round(med["compiled"] / med["fast"], 3)
    if "captured" in med:
        ratios["captured_over_fast"] = round(med["captured"] / med["fast"], 3)
        ratios["captured_over_passes_fast"] = round(med["captured"] / med["passes_fast"], 3)
    row["ratios"] = ratios
    best = min(wall["fast"], wall.get("compiled", float("inf")), wall.get("captured", float("inf")))
    d = data_batch_time(cfg, data_root, device, max(repeats, 5))
    if d is not None:
        row["data_batch_s"] = round(d, 4)
        row["data_wait_share"] = round(d / (d + best), 4)  # synchronous loader: the step waits this long
        row["data_wait_share_cpu"] = round(d / (d + med["fast"]), 4) if device.type == "cpu" else None
    on_device = data_batch_device_time(cfg, data_root, device, max(repeats, 5))
    if on_device is not None:
        row["data_upload_s"], row["data_batch_device_s"] = (round(v, 4) for v in on_device)
        d = min(d, on_device[1]) if device.type == "cuda" else d  # the trainer's choice (data_on_device=auto)
    if batch == 24 and tuple(cfg.patch_size) == (256, 256):
        row["paper_budget_projected_min"] = round((best + (d or 0.0)) * PAPER_ITERATIONS / 60, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[24, 8])
    ap.add_argument("--variant", default="reference")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: every core, as the CLI)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="add a torch.compile row (default: on CUDA only)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "acdc"),
                    help="ACDC root for the data-loading time (skipped when absent)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step.json"))
    args = ap.parse_args()
    tune_malloc()
    threads = set_threads("cli") if args.threads is None else args.threads
    torch.set_num_threads(threads)
    device = resolve_device(args.device)
    with_compile = device.type == "cuda" if args.compile is None else args.compile
    rows = [bench(b, device, args.repeats, args.variant, Path(args.data), with_compile) for b in args.batches]
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    result = {"device": str(device), "device_name": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M"), "cpu_count": os.cpu_count(),
              "fast_autocast": str(resolve_precision("auto", device)), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    names = list(rows[0]["median_s"])
    print("| batch | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for r in rows:
        print(f"| {r['batch']} wall | " + " | ".join(f"{r['median_s'][k]:.3f}" for k in names) + " |")
        print(f"| {r['batch']} cpu | " + " | ".join(f"{r['cpu_s'][k]:.3f}" for k in names) + " |")
    for r in rows:
        print(r["batch"], json.dumps(r["ratios"]), "data", r.get("data_batch_s"), r.get("data_wait_share"),
              "data on device", r.get("data_batch_device_s"), "upload", r.get("data_upload_s"),
              "paper budget min", r.get("paper_budget_projected_min"), "load", r["load_average_1min"])


if __name__ == "__main__":
    main()
