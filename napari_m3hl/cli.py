"""Command line: ``m3hl train | predict | evaluate`` (also ``python -m napari_m3hl``)."""
from __future__ import annotations

import argparse
import json
import platform
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from . import __version__
from . import events as ev
from .errors import M3HLInputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.replace("x", ",").split(",") if v)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model with M³HL (or the supervised baseline)",
        epilog="Several GPUs or machines: launch the same command with torchrun, e.g. "
               "'torchrun --nproc_per_node 4 -m napari_m3hl train --preset la_vnet3d --data /data/LA' "
               "(one process per GPU; --batch-size is per process, the global batch is batch × processes; "
               "several nodes: --nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:29400). See docs/cluster.md.")
    p.add_argument("--preset", default="acdc_unet2d", help="preset name in models/ or a YAML path (default acdc_unet2d)")
    p.add_argument("--variant", default=None, help="preset variant: paper or reference (default: the preset's default)")
    p.add_argument("--data", default="phantom",
                   help="'phantom', an ACDC folder (with train_slices.list), an LA folder (with cases/), or a NIfTI image")
    p.add_argument("--labels", default=None, help="with a NIfTI image: its partly painted label map (NIfTI)")
    p.add_argument("--labeled", type=int, default=None,
                   help="labeled patients (ACDC, default 7) or cases (LA, default 8) or slices per phantom volume (default 2)")
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--patch-size", type=_ints, default=None, help="e.g. 256,256 or 112,112,80")
    p.add_argument("--block-size", type=_ints, default=None, help="mask block size, e.g. 64,64")
    p.add_argument("--mask-ratio", type=float, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--lam", type=float, default=None, help="λ, weight of the high-low feature loss")
    p.add_argument("--alpha", type=float, default=None, help="α, weight of pseudo-labelled regions")
    p.add_argument("--mode", choices=["m3hl", "supervised"], default=None)
    p.add_argument("--no-hl", action="store_true", help="ablation: M³ only (no feature consistency)")
    p.add_argument("--no-mix", action="store_true", help="ablation: HL only (supervised loss instead of L_mix)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="auto (default), cuda, mps or cpu")
    p.add_argument("--val", action="store_true", help="validate on the data set's validation volumes and keep best.pt")
    p.add_argument("--val-every", type=int, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other TrainConfig field, e.g. --set teacher_mode=train (YAML value syntax)")
    p.add_argument("--resume", default=None, help="continue from this checkpoint (last.pt)")
    p.add_argument("--init", default=None, help="start from this checkpoint's or model file's weights (fine-tuning)")
    p.add_argument("--out", default="runs/m3hl", help="output folder (checkpoints, run.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    d = p.add_argument_group("distributed (under torchrun, see docs/cluster.md)")
    d.add_argument("--sync-bn", action="store_true",
                   help="BatchNorm statistics over the global batch (SyncBatchNorm, GPUs only); default: per process")
    d.add_argument("--scale-lr", action="store_true", help="multiply the learning rate by the number of processes")
    d.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="how long a process waits for a missing one before the job fails (default 1800)")


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="segment NIfTI or h5 volumes with a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--input", required=True, help="a .nii/.nii.gz/.h5 file or a folder of them")
    p.add_argument("--output", required=True, help="folder for <name>.nii.gz label maps")
    p.add_argument("--which", choices=["student", "teacher"], default="student")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a checkpoint on validation volumes (Dice, Jaccard, HD95, ASD)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="an ACDC folder (val.list + volumes/), an LA folder, or 'phantom'")
    p.add_argument("--which", choices=["student", "teacher"], default="student")
    p.add_argument("--device", default="auto")
    p.add_argument("--limit", type=int, default=None, help="score only the first N volumes")
    p.add_argument("--list", default=None, dest="names_file",
                   help="a file of volume names to score instead of val.list (e.g. test.list)")
    p.add_argument("--spacing", type=float, nargs="+", default=None,
                   help="voxel spacing in mm (D H W) for distances in mm; default: pixels, as the papers")
    p.add_argument("--empty", choices=["paper", "strict"], default="paper",
                   help="how a class missing from the prediction scores (see docs/metrics)")
    p.add_argument("--json", default=None, help="write the per-case and summary metrics here")


def _add_suggest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("suggest", help="rank the unlabeled slices of a NIfTI volume: which to label next")
    p.add_argument("--checkpoint", required=True, help="a 2D checkpoint (with its EMA teacher for 'disagreement')")
    p.add_argument("--image", required=True, help="a 3D .nii/.nii.gz volume")
    p.add_argument("--labels", default=None, help="its partial labels (.nii/.nii.gz); labeled slices are left out")
    from .suggest import METHODS  # numpy only: cheap at parser build

    p.add_argument("--score", choices=METHODS, default=None,
                   help="uncertainty score (default: the measured default, see docs/benchmarks.md; entropy "
                        "for a model file without a teacher)")
    p.add_argument("--which", choices=["student", "teacher"], default=None,
                   help="whose uncertainty entropy and margin measure: the network you segment with "
                        "(default: suggest.DEFAULT_NETWORK)")
    p.add_argument("--spread", action=argparse.BooleanOptionalAction, default=None,
                   help="rank by score × distance to the nearest labeled slice (default: suggest.DEFAULT_SPREAD)")
    p.add_argument("--top", type=int, default=5, help="how many slices to list")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="write every slice's score and the ranking here")


def _add_phantom(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("phantom", help="write synthetic cardiac MR phantom volumes (+ full labels) as NIfTI")
    p.add_argument("--output", required=True, help="folder for phantom_<seed>.nii.gz and phantom_<seed>_labels.nii.gz")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--count", type=int, default=1, help="volumes with seeds seed, seed+1, ...")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m3hl", description="M³HL semi-supervised cardiac MR segmentation")
    parser.add_argument("--version", action="version", version=f"napari-m3hl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_predict(sub)
    _add_evaluate(sub)
    _add_suggest(sub)
    _add_phantom(sub)
    return parser


# ----------------------------------------------------------------- helpers
def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
    """One-line progress bar on stderr: iteration, losses, images/s, ETA."""

    def __init__(self, enabled: bool, stream=sys.stderr) -> None:
        self.enabled = enabled
        self.stream = stream
        self.last = 0.0
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.period = 0.5 if self.tty else 15.0  # a log file gets a line every 15 s

    def update(self, e: ev.Progress) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < self.period and e.iteration < e.total_iterations and self.last:
            return
        self.last = now
        frac = e.iteration / e.total_iterations
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        losses = " ".join(f"{k}={v:.3f}" for k, v in e.losses.items())
        line = (f"\r[{bar}] {e.iteration}/{e.total_iterations} {losses} lr={e.lr:.2g} "
                f"{e.images_per_s:.1f} img/s elapsed {_fmt_time(e.elapsed_s)} ETA {_fmt_time(e.eta_s)}")
        self.stream.write(line.ljust(120) if self.tty else line[1:] + "\n")
        self.stream.flush()

    def newline(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")


def _versions() -> dict[str, str]:
    import torch

    return {"napari_m3hl": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _overrides(args: argparse.Namespace) -> dict:
    import yaml

    o = {
        "iterations": args.iterations, "batch_size": args.batch_size, "patch_size": args.patch_size,
        "block_size": args.block_size, "mask_ratio": args.mask_ratio, "lr": args.lr, "lam": args.lam,
        "alpha": args.alpha, "mode": args.mode, "seed": args.seed, "device": args.device, "val_every": args.val_every,
    }
    if args.no_hl:
        o["use_hl"] = False
    if args.no_mix:
        o["use_mix"] = False
    for item in args.set:
        if "=" not in item:
            raise M3HLInputError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        o[k.strip()] = yaml.safe_load(v)
    return o


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_preset
    from .distributed import explain_failure, init_distributed, launched_by_torchrun, shutdown

    config = load_preset(args.preset, args.variant, **_overrides(args))
    run = _train_on
    if launched_by_torchrun():  # a failing rank's traceback goes into torchrun's failure report
        from torch.distributed.elastic.multiprocessing.errors import record

        run = record(_train_on)
    ctx = init_distributed(config.device, sync_bn=args.sync_bn, timeout_s=args.dist_timeout)
    try:
        return run(args, config, ctx)
    except RuntimeError as exc:
        message = explain_failure(ctx, exc)
        if message is None:
            raise
        print(f"m3hl train: error: {message}", file=sys.stderr)
        return 1
    finally:
        shutdown(ctx)


def _train_on(args: argparse.Namespace, config, ctx) -> int:
    """``cmd_train`` on one process of ``ctx`` (rank 0 alone writes run.json and the bar)."""
    from .data import load_train_data, load_val_volumes
    from .distributed import describe
    from .trainer import TrainControl, train

    if args.scale_lr:
        config = config.replace(lr=config.lr * ctx.world_size)
    source = str(args.data)
    counts = {}
    if args.labeled is not None:
        counts = {"labeled_patients": args.labeled, "labeled_cases": args.labeled, "labeled_slices_per_volume": args.labeled}
    data = load_train_data(source, args.labels, num_classes=config.num_classes, **counts)
    if data.ndim != config.ndim or data.num_classes != config.num_classes:
        raise M3HLInputError(
            f"--data {source} is {data.ndim}D with {data.num_classes} classes but preset {config.preset} is "
            f"{config.ndim}D with {config.num_classes} classes; choose the matching --preset"
        )
    config = config.replace(class_names=tuple(data.class_names))
    val = load_val_volumes(source, config.ndim) if args.val and ctx.is_main else None
    out = Path(args.out)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "command": "m3hl " + " ".join(sys.argv[1:]) if sys.argv and "m3hl" in sys.argv[0] else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": config.to_dict(), "seed": config.seed,
        "data": {"source": str(args.data), "labels": args.labels, "n_labeled": len(data.labeled),
                 "n_unlabeled": len(data.unlabeled), "n_val": len(val or [])},
        "resume": args.resume, "init": args.init, "versions": _versions(),
        "distributed": describe(ctx, config.batch_size, config.lr),
    }
    if ctx.is_main:
        (out / "run.json").write_text(json.dumps(manifest, indent=2))
    if ctx.is_main and ctx.enabled:
        print(f"{ctx.world_size} processes ({ctx.backend}): batch {config.batch_size} per process, global batch "
              f"{config.batch_size * ctx.world_size}, lr {config.lr:g}" + (", SyncBatchNorm" if ctx.sync_bn else ""),
              file=sys.stderr)
    bar = ProgressBar(not args.quiet and ctx.is_main)
    t0 = time.perf_counter()
    finished = None
    control = TrainControl()

    def on_sigint(signum, frame):  # first Ctrl-C: finish the step and save last.pt; second: abort
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\nstopping after this step (Ctrl-C again to abort without saving)...", file=sys.stderr)
        control.stop()

    previous = signal.signal(signal.SIGINT, on_sigint) if threading.current_thread() is threading.main_thread() else None
    try:
        events = train(config, data, out, resume_from=args.resume, init_from=args.init, val_volumes=val, control=control,
                       dist=ctx)
        finished = _consume(events, config, bar, quiet=not ctx.is_main)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    bar.newline()
    if not ctx.is_main:
        return 0
    manifest.update({"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.perf_counter() - t0, 1),
                     "iterations_done": finished.iteration if finished else None,
                     "stopped_early": finished.stopped if finished else None,
                     "checkpoint": finished.checkpoint if finished else None,
                     "best_checkpoint": finished.best_checkpoint if finished else None,
                     "metrics": finished.metrics if finished else {}})
    (out / "run.json").write_text(json.dumps(manifest, indent=2))
    print(f"checkpoint: {finished.checkpoint}" + (f"  best: {finished.best_checkpoint}" if finished.best_checkpoint else ""))
    return 0


def _consume(events, config, bar: ProgressBar, quiet: bool = False):
    """Print the trainer's events (nothing when ``quiet``); return the final ``TrainFinished``."""
    finished = None
    for e in events:
        if quiet and not isinstance(e, ev.TrainFinished):
            continue
        if isinstance(e, ev.TrainStarted):
            print(f"training {config.arch} ({config.preset}/{config.variant}, mode {config.mode}) on {e.device}: "
                  f"{e.n_labeled} labeled, {e.n_unlabeled} unlabeled samples, iterations {e.start_iteration}→{e.total_iterations}",
                  file=sys.stderr)
        elif isinstance(e, ev.Progress):
            bar.update(e)
        elif isinstance(e, ev.Validation):
            bar.newline()
            print(f"validation @{e.iteration}: mean Dice {100 * e.mean_dice:.2f}"
                  + (" (best)" if e.best else "") + "  " + " ".join(f"{k} {100 * v:.2f}" for k, v in e.per_class.items()),
                  file=sys.stderr)
        elif isinstance(e, ev.TrainFinished):
            finished = e
    return finished


def _input_files(path: Path) -> list[Path]:
    if not path.exists():
        raise M3HLInputError(f"--input {path} does not exist")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.name.endswith(NIFTI_SUFFIXES + (".h5",)))
    if not files:
        raise M3HLInputError(f"--input folder {path} holds no .nii, .nii.gz or .h5 file")
    return files


def _stem(path: Path) -> str:
    name = path.name
    for suf in (".nii.gz", ".nii", ".h5"):
        if name.endswith(suf):
            return name[: -len(suf)]
    return path.stem


def cmd_predict(args: argparse.Namespace) -> int:
    from .checkpoint import image_interp, load_model
    from .inference import predict_volume_2d, predict_volume_3d
    from .io import affine_from_spacing, load_h5_volume, load_la_case, load_nifti, normalize_intensity, save_nifti_labels
    from .runtime import resolve_device, tune_malloc

    tune_malloc()
    device = resolve_device(args.device)
    model, ckpt = load_model(args.checkpoint, args.which, device)
    patch = tuple(ckpt["patch_size"])
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    def predict(vol: np.ndarray, normalized: bool) -> np.ndarray:
        """vol: (Z, Y, X) = (D, H, W); returns labels of the same shape."""
        if len(patch) == 2:
            image = vol if normalized else normalize_intensity(vol)
            return predict_volume_2d(model, image, patch=patch, device=device, batch_size=args.batch_size,
                                     resize_input=image_interp(ckpt))
        xyz = np.ascontiguousarray(vol.transpose(2, 1, 0))  # the 3D models work in (X, Y, Z), z-scored
        if not normalized:
            xyz = ((xyz - xyz.mean()) / (xyz.std() + 1e-8)).astype(np.float32)
        out = predict_volume_3d(model, xyz, patch=patch, device=device, num_classes=ckpt["num_classes"])
        return np.ascontiguousarray(out.transpose(2, 1, 0))

    for f in _input_files(Path(args.input)):
        t0 = time.perf_counter()
        if f.name.endswith(".h5"):  # already normalised as the training data
            if len(patch) == 2:
                image, _ = load_h5_volume(f)
            else:
                image = load_la_case(f, need_label=False)[0].transpose(2, 1, 0)
            labels = predict(image, normalized=True)
            affine, header = affine_from_spacing((1.0, 1.0, 1.0)), None
        else:
            vol = load_nifti(f)
            if vol.data.ndim == 4:  # (T, Z, Y, X): each frame on its own
                labels = np.stack([predict(frame, normalized=False) for frame in vol.data])
            else:
                labels = predict(vol.data, normalized=False)
            affine, header = vol.affine, vol.header
        dest = save_nifti_labels(labels, out / f"{_stem(f)}.nii.gz", affine, header)
        counts = ", ".join(f"{n}: {int((labels == c).sum())} vox" for c, n in enumerate(ckpt["class_names"]) if c)
        print(f"{f} -> {dest} ({time.perf_counter() - t0:.1f} s; {counts})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .checkpoint import image_interp, load_model
    from .data import load_val_volumes
    from .inference import predict_volume_2d, predict_volume_3d
    from .metrics import evaluate_case, format_table, summarize
    from .runtime import resolve_device, tune_malloc

    tune_malloc()
    device = resolve_device(args.device)
    model, ckpt = load_model(args.checkpoint, args.which, device)
    patch = tuple(ckpt["patch_size"])
    volumes = load_val_volumes(args.data, ndim=len(patch), limit=args.limit, names_file=args.names_file)
    if not volumes:
        raise M3HLInputError(f"no validation volume found in {args.data}")
    cases, per_case = [], {}
    for name, image, label in volumes:
        if len(patch) == 2:
            pred = predict_volume_2d(model, image, patch=patch, device=device, resize_input=image_interp(ckpt))
        else:
            pred = predict_volume_3d(model, image, patch=patch, device=device, num_classes=ckpt["num_classes"])
        m = evaluate_case(pred, label, ckpt["num_classes"], spacing=args.spacing, empty_convention=args.empty)
        cases.append(m)
        per_case[name] = {ckpt["class_names"][c]: vars(v) for c, v in m.items()}
    summary = summarize(cases, ckpt["class_names"])
    unit = "mm" if args.spacing else "px"
    print(format_table(summary, distance_unit=unit))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"checkpoint": str(args.checkpoint), "data": str(args.data),
                                               "which": args.which, "unit": unit, "empty_convention": args.empty,
                                               "summary": summary, "cases": per_case}, indent=2, default=float))
    return 0


def cmd_suggest(args: argparse.Namespace) -> int:
    from .checkpoint import image_interp, load_checkpoint, model_from_checkpoint
    from .io import load_nifti, normalize_intensity
    from .runtime import resolve_device, tune_malloc
    from .suggest import DEFAULT_METHOD, DEFAULT_NETWORK, DEFAULT_SPREAD, analyse_volume

    tune_malloc()
    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.checkpoint)
    if len(ckpt["patch_size"]) != 2:
        raise M3HLInputError(f"{args.checkpoint} holds a 3D model; slice suggestions need a 2D (slice-wise) model")
    vol = load_nifti(args.image)
    if vol.data.ndim != 3:
        raise M3HLInputError(f"{args.image} has shape {vol.data.shape}; suggest takes one 3D volume (split a cine first)")
    labeled: list[int] = []
    if args.labels:
        lab = load_nifti(args.labels).data
        if lab.shape != vol.data.shape:
            raise M3HLInputError(f"labels {args.labels} have shape {lab.shape} (Z, Y, X) but the image has "
                                 f"{vol.data.shape}; give the labels drawn on this image")
        labeled = [int(z) for z in np.flatnonzero(lab.reshape(lab.shape[0], -1).any(axis=1))]
    teacher = model_from_checkpoint(ckpt, "teacher", device) if "teacher" in ckpt else None
    method = args.score or DEFAULT_METHOD
    if args.score is None and method == "disagreement" and teacher is None:
        method = "entropy"  # the default needs a teacher; a model file has none
        print(f"{args.checkpoint} has no teacher network: ranking by entropy instead of disagreement")
    network = args.which or (DEFAULT_NETWORK if teacher is not None else "student")
    if teacher is None and (method == "disagreement" or network == "teacher"):
        raise M3HLInputError(f"{args.checkpoint} has no teacher network; use --score entropy or margin "
                             "with --which student")
    student = model_from_checkpoint(ckpt, "student", device)
    a = analyse_volume(student, normalize_intensity(vol.data), teacher, method, tuple(ckpt["patch_size"]),
                       resize_input=image_interp(ckpt), device=device, network=network)
    spread = DEFAULT_SPREAD if args.spread is None else args.spread
    ranking = a.ranking(labeled, spread)
    what = (method if method == "disagreement" else f"the {network}'s {method}") + (
        " × distance to the labeled slices" if spread and labeled else "")
    print(f"{len(ranking)} unlabeled of {len(a.scores)} slices; most uncertain by {what}:")
    for rank, z in enumerate(ranking[: args.top], 1):
        print(f"  {rank}. slice {z}  {method} {a.scores[z]:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"image": str(args.image), "checkpoint": str(args.checkpoint),
                                               "score": method, "network": network, "spread": spread,
                                               "labeled": labeled, "ranking": ranking,
                                               "scores": [float(x) for x in a.scores]}, indent=2))
    return 0


def cmd_phantom(args: argparse.Namespace) -> int:
    from .phantom import save_phantom_nifti

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for seed in range(args.seed, args.seed + args.count):
        img, lab = out / f"phantom_{seed}.nii.gz", out / f"phantom_{seed}_labels.nii.gz"
        save_phantom_nifti(img, seed=seed, labels_path=lab)
        print(f"{img}  {lab}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"train": cmd_train, "predict": cmd_predict, "evaluate": cmd_evaluate, "suggest": cmd_suggest,
                "phantom": cmd_phantom}[args.command](args)
    except M3HLInputError as exc:
        print(f"m3hl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"m3hl {args.command}: interrupted", file=sys.stderr)
        return 130
