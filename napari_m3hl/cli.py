"""Command line: ``m3hl train | predict | evaluate | suggest | phantom`` (also ``python -m napari_m3hl``); the parser, ``train`` and ``main``."""
from __future__ import annotations

import argparse
import platform
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from . import __version__
from . import cli_checks as checks
from . import events as ev
from .cli_commands import cmd_evaluate, cmd_phantom, cmd_predict, cmd_suggest
from .errors import M3HLInputError


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 256,256 or 112,112,80, got {text!r}") from None


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _fewslice_summary() -> str:
    from .fewslice import FewSliceOptions

    return FewSliceOptions().summary()


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model with M³HL (or the supervised baseline)",
        epilog="Several GPUs or machines: launch the same command with torchrun, e.g. "
               "'torchrun --nproc_per_node 4 -m napari_m3hl train --preset la_vnet3d --data /data/LA' "
               "(one process per GPU; --batch-size is per process, the global batch is batch × processes; "
               "several nodes: --nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:29400). See docs/cluster.md.")
    p.add_argument("--preset", default=None, help="preset name in models/ or a YAML path (default acdc_unet2d)")
    p.add_argument("--variant", default=None, help="preset variant: paper or reference (default: the preset's default)")
    p.add_argument("--data", default="phantom",
                   help="'phantom', an ACDC folder (with train_slices.list), an LA folder (with cases/), or a NIfTI image")
    p.add_argument("--labels", default=None,
                   help="with a NIfTI image: its partly painted label map (NIfTI). Alone, this fine-tunes --init (default: "
                        f"the shipped 70-patient ACDC model) with the few-slice defaults ({_fewslice_summary()}; the "
                        "model's own input size; --iterations/--lr/--batch-size/--mode override) and writes "
                        "segmentation.nii.gz with the painted slices kept; with --preset/--variant/--patch-size/"
                        "--block-size/--set it trains with the preset's schedule instead")
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
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None,
                   help="autocast: auto (default) = bf16 on GPUs and on CPUs with native bf16, else fp32")
    p.add_argument("--val", action="store_true", help="validate on the data set's validation volumes and keep best.pt")
    p.add_argument("--val-every", type=int, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other TrainConfig field, e.g. --set teacher_mode=train (YAML value syntax)")
    p.add_argument("--resume", default=None,
                   help="continue from this checkpoint (last.pt) with its settings (patch, block, ...)")
    p.add_argument("--init", default=None, help="start from this checkpoint's or model file's weights (fine-tuning)")
    p.add_argument("--out", default="runs/m3hl", help="output folder (checkpoints, run.json); must be new or empty")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
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
    p.add_argument("--output", required=True,
                   help="folder for <name>.nii.gz label maps, or a .nii.gz file name for a single input")
    p.add_argument("--overwrite", action="store_true", help="replace existing label maps (never an input)")
    p.add_argument("--which", choices=["student", "teacher"], default="student")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=_positive, default=8)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a checkpoint on validation volumes (Dice, Jaccard, HD95, ASD)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="an ACDC folder (val.list + volumes/), an LA folder, or 'phantom'")
    p.add_argument("--which", choices=["student", "teacher"], default="student")
    p.add_argument("--device", default="auto")
    p.add_argument("--limit", type=_positive, default=None, help="score only the first N volumes")
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
    p.add_argument("--top", type=_positive, default=5, help="how many slices to list")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="write every slice's score and the ranking here")


def _add_phantom(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("phantom", help="write synthetic cardiac MR phantom volumes (+ full labels) as NIfTI")
    p.add_argument("--output", required=True, help="folder for phantom_<seed>.nii.gz and phantom_<seed>_labels.nii.gz")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--count", type=_positive, default=1, help="volumes with seeds seed, seed+1, ...")
    p.add_argument("--overwrite", action="store_true", help="replace phantom files already in --output")


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
    """Settings given on the command line (None: not given), ``--set`` included."""
    import yaml

    o = {
        "iterations": args.iterations, "batch_size": args.batch_size, "patch_size": args.patch_size,
        "block_size": args.block_size, "mask_ratio": args.mask_ratio, "lr": args.lr, "lam": args.lam,
        "alpha": args.alpha, "mode": args.mode, "seed": args.seed, "device": args.device, "val_every": args.val_every,
        "precision": args.precision,
    }
    if args.no_hl:
        o["use_hl"] = False
    if args.no_mix:
        o["use_mix"] = False
    for item in args.set:
        if "=" not in item:
            raise M3HLInputError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            o[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError:
            raise M3HLInputError(f"--set {item}: {v!r} is not a valid value (YAML syntax, e.g. 8, 0.5, [64,64], true)") from None
    return o


def _train_config(args: argparse.Namespace):
    """The run's config: the preset + options, or for ``--resume`` the checkpoint's settings + options."""
    from .checkpoint import load_checkpoint
    from .config import TrainConfig, load_preset

    given = _overrides(args)
    if not args.resume:
        return load_preset(args.preset or "acdc_unet2d", args.variant, **given)
    if args.preset or args.variant:
        raise M3HLInputError("--resume continues a run with the settings stored in its checkpoint; drop --preset/--variant")
    ckpt = load_checkpoint(args.resume)
    settings = checks.resume_settings(ckpt, args.resume)
    settings.pop("device", None)  # the machine may have changed: auto unless --device
    fixed = checks.explicit_differences(settings, given, ("arch", "num_classes", "in_channels", "patch_size", "block_size"))
    if fixed:
        raise M3HLInputError(
            f"--resume {args.resume}: a resumed run keeps its {', '.join(fixed)}; drop those options, or start a "
            f"new run from its weights with --init {args.resume}"
        )
    changed = checks.explicit_differences(settings, given, sorted(given))
    if changed:
        print(f"resuming with changed settings: {', '.join(changed)}", file=sys.stderr)
    config = TrainConfig.from_dict({**settings, **{k: v for k, v in given.items() if v is not None}})
    config.validate()
    return config


def _check_start(args: argparse.Namespace, config) -> None:
    """Checkpoints for --init/--resume are readable and fit the preset (before anything is written)."""
    from .checkpoint import check_compatible, load_checkpoint

    for option, path in (("--init", args.init), ("--resume", args.resume)):
        if path:
            ckpt = load_checkpoint(path)
            check_compatible(ckpt, config.arch, config.num_classes, config.in_channels, source=f"{option} {path}")
    if args.init and args.resume:
        raise M3HLInputError("give --resume (continue a run) or --init (start from its weights), not both")


def cmd_train(args: argparse.Namespace) -> int:
    """``m3hl train``, alone or as one process of a torchrun job."""
    from .distributed import explain_failure, init_distributed, launched_by_torchrun, shutdown
    from .runtime import set_threads

    set_threads("cli")  # an OMP_NUM_THREADS set by torchrun wins
    # every check before the process group forms: all ranks see the folder before rank 0 writes into it
    checks.check_run_folder(Path(args.out), args.resume, args.overwrite)
    from .cli_fewslice import cmd_train_fewslice, wants_fewslice

    if wants_fewslice(args):  # one painted volume: the few-slice loop, not a preset's 30,000 iterations
        return cmd_train_fewslice(args, ProgressBar(not args.quiet))
    config = _train_config(args)
    _check_start(args, config)
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

    out = Path(args.out)
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
    if ctx.is_main:
        checks.check_writable_dir(out, "--out")
        if args.overwrite and not args.resume:
            removed = checks.clear_run_files(out)
            if removed:
                print(f"--overwrite: removed the earlier run's {', '.join(removed)} from {out}", file=sys.stderr)
    manifest = {
        "command": "m3hl " + " ".join(sys.argv[1:]) if sys.argv and "m3hl" in sys.argv[0] else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": config.to_dict(), "seed": config.seed,
        "data": {"source": str(args.data), "labels": args.labels, "n_labeled": len(data.labeled),
                 "n_unlabeled": len(data.unlabeled), "n_val": len(val or [])},
        "resume": args.resume, "init": args.init, "versions": _versions(),
        "distributed": describe(ctx, config.batch_size, config.lr),
    }
    if ctx.is_main and ctx.enabled:
        print(f"{ctx.world_size} processes ({ctx.backend}): batch {config.batch_size} per process, global batch "
              f"{config.batch_size * ctx.world_size}, lr {config.lr:g}" + (", SyncBatchNorm" if ctx.sync_bn else ""),
              file=sys.stderr)
    bar = ProgressBar(not args.quiet and ctx.is_main)
    t0 = time.perf_counter()
    control = TrainControl()
    state = _RunState()

    def on_sigint(signum, frame):  # first Ctrl-C: finish the step and save last.pt; second: abort
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\nstopping after this step (Ctrl-C again to abort without saving)...", file=sys.stderr)
        control.stop()

    def started() -> None:  # the trainer has checked its inputs: the run is real, record it
        if ctx.is_main:
            checks.write_json(out / "run.json", manifest, "--out")

    previous = signal.signal(signal.SIGINT, on_sigint) if threading.current_thread() is threading.main_thread() else None
    try:
        events = train(config, data, out, resume_from=args.resume, init_from=args.init, val_volumes=val, control=control,
                       dist=ctx)
        _consume(events, config, bar, state, started, quiet=not ctx.is_main)
    except FloatingPointError:
        bar.newline()
        if not ctx.is_main:
            return 1
        last = f"the last checkpoint before it is {state.checkpoint}" if state.checkpoint else \
            "no checkpoint of this run was saved before it"
        print(f"m3hl train: error: training diverged at iteration {state.iteration + 1} (the loss became NaN or "
              f"infinite) with learning rate {config.lr:g}; lower --lr (e.g. {config.lr / 10:g}). {last}; "
              f"the diverged weights are {out / 'diverged.pt'}", file=sys.stderr)
        manifest.update({"diverged_at": state.iteration + 1, "checkpoint": state.checkpoint})
        checks.write_json(out / "run.json", manifest, "--out")
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    bar.newline()
    if not ctx.is_main:
        return 0
    finished = state.finished
    manifest.update({"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.perf_counter() - t0, 1),
                     "iterations_done": finished.iteration if finished else None,
                     "stopped_early": finished.stopped if finished else None,
                     "checkpoint": finished.checkpoint if finished else None,
                     "best_checkpoint": finished.best_checkpoint if finished else None,
                     "metrics": finished.metrics if finished else {}})
    if state.pl_curve:
        manifest["pseudo_label_curve"] = state.pl_curve
    checks.write_json(out / "run.json", manifest, "--out")
    if finished is not None:
        print(f"checkpoint: {finished.checkpoint}" + (f"  best: {finished.best_checkpoint}" if finished.best_checkpoint else ""))
    return 0


class _RunState:
    """What the CLI has seen of a run: last iteration, last checkpoint, the final event."""

    def __init__(self) -> None:
        self.iteration = 0
        self.checkpoint: str | None = None
        self.finished: ev.TrainFinished | None = None
        self.pl_curve: list[dict] = []  # pseudo-label quality against hidden labels (pl_eval_every)


def _consume(events, config, bar: ProgressBar, state: _RunState, on_start=None, quiet: bool = False) -> None:
    """Print the trainer's events (nothing when ``quiet``, e.g. ranks > 0); record them in ``state``."""
    for e in events:
        if quiet and isinstance(e, (ev.TrainStarted, ev.Validation, ev.PseudoLabelQuality)):
            if isinstance(e, ev.TrainStarted) and on_start is not None:
                on_start()
            continue
        if isinstance(e, ev.TrainStarted):
            state.iteration = e.start_iteration
            if on_start is not None:
                on_start()
            print(f"training {config.arch} ({config.preset}/{config.variant}, mode {config.mode}) on {e.device}: "
                  f"{e.n_labeled} labeled, {e.n_unlabeled} unlabeled samples, iterations {e.start_iteration}→{e.total_iterations}",
                  file=sys.stderr)
        elif isinstance(e, ev.Progress):
            state.iteration = e.iteration
            bar.update(e)
        elif isinstance(e, ev.CheckpointSaved):
            state.checkpoint = e.path
        elif isinstance(e, ev.Validation):
            bar.newline()
            print(f"validation @{e.iteration}: mean Dice {100 * e.mean_dice:.2f}"
                  + (" (best)" if e.best else "") + "  " + " ".join(f"{k} {100 * v:.2f}" for k, v in e.per_class.items()),
                  file=sys.stderr)
        elif isinstance(e, ev.PseudoLabelQuality):
            state.pl_curve.append({"iteration": e.iteration, **{k: round(v, 4) for k, v in e.scores.items()}})
            bar.newline()
            print(f"pseudo-labels @{e.iteration}: mean Dice {100 * e.scores['pl_mean']:.2f} "
                  f"(student {100 * e.scores['student_mean']:.2f}) on hidden labels", file=sys.stderr)
        elif isinstance(e, ev.TrainFinished):
            state.finished = e


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every failure ends as one line on stderr (status 2: bad
    input, 1: the command failed, 130: interrupted). ``M3HL_DEBUG=1`` shows
    the traceback of an unexpected error."""
    import os

    args = build_parser().parse_args(argv)
    name = f"m3hl {args.command}"
    try:
        return {"train": cmd_train, "predict": cmd_predict, "evaluate": cmd_evaluate, "suggest": cmd_suggest,
                "phantom": cmd_phantom}[args.command](args)
    except M3HLInputError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"{name}: error: out of memory; use smaller inputs, a smaller --batch-size or --patch-size, "
              "or close other programs", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"{name}: error: cannot access{where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a bug: one line, the traceback on request
        if os.environ.get("M3HL_DEBUG"):
            raise
        print(f"{name}: internal error: {exc.__class__.__name__}: {exc} (set M3HL_DEBUG=1 for the traceback and "
              "please report it)", file=sys.stderr)
        return 1
