"""``m3hl train`` on a data set (or as one process of a torchrun job): the
run's config (preset or ``--resume``), the checks before anything is written,
the progress bar (tqdm), Ctrl-C (finish the step, save ``last.pt``),
divergence, and ``run.json``. One painted volume goes to :mod:`napari_m3hl.cli.fewslice`.
"""
from __future__ import annotations

import argparse
import platform
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from napari_m3hl import __version__
from napari_m3hl.cli import checks
from napari_m3hl.training import events as ev
from napari_m3hl.errors import M3HLInputError

format_interval = tqdm.format_interval  # seconds -> "[H:]MM:SS"


class ProgressBar:
    """The training progress on stderr, drawn from the trainer's ``Progress`` events.

    On a terminal: a tqdm bar (redrawn at most twice a second) with the
    iteration, the losses, the learning rate, images/s, and the trainer's
    elapsed and remaining time. Into a log file or pipe: the same text as a
    line of its own every 15 s (and at the last iteration), so logs stay readable.
    Messages go through :meth:`write`, which keeps the bar below them.
    """

    def __init__(self, enabled: bool, stream=None) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.period = 15.0  # seconds between log lines when not a terminal
        self.last = 0.0
        self._bar = None

    @staticmethod
    def text(e: ev.Progress) -> str:
        """Losses, learning rate, images/s, elapsed time and ETA of one event."""
        losses = " ".join(f"{k}={v:.3f}" for k, v in e.losses.items())
        return (f"{losses} lr={e.lr:.2g} {e.images_per_s:.1f} img/s elapsed {format_interval(e.elapsed_s)} "
                f"ETA {format_interval(e.eta_s)}")

    def update(self, e: ev.Progress) -> None:
        if not self.enabled:
            return
        if not self.tty:
            now = time.monotonic()
            if now - self.last >= self.period or e.iteration >= e.total_iterations or not self.last:
                self.last = now
                self.stream.write(f"{e.iteration}/{e.total_iterations} {self.text(e)}\n")
                self.stream.flush()
            return
        if self._bar is None:
            from tqdm import tqdm

            size = shutil.get_terminal_size((120, 24))  # a terminal reporting no size (0 x 0) gets 120 x 24
            self._bar = tqdm(total=e.total_iterations, file=self.stream, mininterval=0.5, ncols=size.columns,
                             nrows=size.lines,
                             bar_format="{percentage:3.0f}%|{bar:24}| {n_fmt}/{total_fmt}{postfix}")
        self._bar.set_postfix_str(self.text(e), refresh=False)
        self._bar.update(e.iteration - self._bar.n)

    def write(self, message: str) -> None:
        """Print ``message`` on its own line (above the bar while one is drawn)."""
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream)

    def close(self) -> None:
        """End the bar (its last state stays on screen)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


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
    from napari_m3hl.io.checkpoint import load_checkpoint
    from napari_m3hl.config import TrainConfig, load_preset

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
    from napari_m3hl.io.checkpoint import check_compatible, load_checkpoint

    for option, path in (("--init", args.init), ("--resume", args.resume)):
        if path:
            ckpt = load_checkpoint(path)
            check_compatible(ckpt, config.arch, config.num_classes, config.in_channels, source=f"{option} {path}")
    if args.init and args.resume:
        raise M3HLInputError("give --resume (continue a run) or --init (start from its weights), not both")


def cmd_train(args: argparse.Namespace) -> int:
    """``m3hl train``, alone or as one process of a torchrun job."""
    from napari_m3hl.training.distributed import explain_failure, init_distributed, launched_by_torchrun, shutdown
    from napari_m3hl.runtime import set_threads

    set_threads("cli")  # an OMP_NUM_THREADS set by torchrun wins
    # every check before the process group forms: all ranks see the folder before rank 0 writes into it
    checks.check_run_folder(Path(args.out), args.resume, args.overwrite)
    from napari_m3hl.app.plan import plan_run
    from napari_m3hl.cli.fewslice import check_ablation, cmd_train_fewslice, run_inputs

    check_ablation(args)
    if plan_run(run_inputs(args)).fewslice:  # painted volumes: the few-slice loop, not a preset's 30,000 iterations
        return cmd_train_fewslice(args, ProgressBar(not args.quiet))
    if len(args.data or []) > 1 or len(args.labels or []) > 1 or args.unlabeled:
        raise M3HLInputError("several --data/--labels and --unlabeled belong to the few-slice loop (--data IMAGE "
                             "--labels PAINTED ..., without --preset/--variant/--patch-size/--block-size/--set/--val); "
                             "a preset's run takes one --data")
    args.data = (args.data or ["phantom"])[0]
    args.labels = (args.labels or [None])[0]
    for flag, key in (("--start-blend", "start_blend"), ("--start-blend-untrusted", "start_blend_untrusted"),
                      ("--start-blend-stable", "start_blend_stable"), ("--no-clean", "clean")):
        if getattr(args, key, None) is not None:
            raise M3HLInputError(f"{flag} belongs to the few-slice loop (--data IMAGE --labels PAINTED, without "
                                 "--preset/--variant/--set/--val); this run trains with a preset's schedule")
    config = _train_config(args)
    _check_start(args, config)
    run = _train_on
    if launched_by_torchrun():  # a failing rank's traceback goes into torchrun's failure report
        from torch.distributed.elastic.multiprocessing.errors import record

        run = record(_train_on)
    ctx = init_distributed(config.device, sync_bn=args.sync_bn, timeout_s=args.dist_timeout)
    done = False
    try:
        code = run(args, config, ctx)
        done = code == 0
        return code
    except RuntimeError as exc:
        message = explain_failure(ctx, exc)
        if message is None:
            raise
        print(f"m3hl train: error: {message}", file=sys.stderr)
        return 1
    finally:
        shutdown(ctx, wait_for_peers=done)


def _train_on(args: argparse.Namespace, config, ctx) -> int:
    """``cmd_train`` on one process of ``ctx`` (rank 0 alone writes run.json and the bar)."""
    from napari_m3hl.data import load_train_data, load_val_volumes
    from napari_m3hl.training.distributed import describe
    from napari_m3hl.training.trainer import TrainControl, train

    out = Path(args.out)
    if args.scale_lr:
        config = config.replace(lr=config.lr * ctx.world_size)
    source = str(args.data)
    data = load_train_data(source, args.labels, labeled=args.labeled, num_classes=config.num_classes)
    if data.ndim != config.ndim or data.num_classes != config.num_classes:
        raise M3HLInputError(
            f"--data {source} is {data.ndim}D with {data.num_classes} classes but preset {config.preset} is "
            f"{config.ndim}D with {config.num_classes} classes; choose the matching --preset"
        )
    config = config.replace(class_names=tuple(data.class_names))
    val = load_val_volumes(source, config.ndim) if args.val and ctx.is_main else None
    work = out  # where this run writes: out, or with --overwrite a folder beside it swapped in at the end
    if ctx.is_main:
        checks.check_writable_dir(out, "--out")
        checks.check_run_inputs(out, checks.RUN_FILES, {"--data": args.data, "--labels": args.labels})
        if args.overwrite and not args.resume:
            if ctx.enabled:  # every rank must agree on the folder: no staging under torchrun
                _removed_note(checks.clear_run_files(out), out)
            else:
                work = checks.stage_run(out, args.overwrite, args.resume)
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
            checks.write_json(work / "run.json", manifest, "--out")

    previous = signal.signal(signal.SIGINT, on_sigint) if threading.current_thread() is threading.main_thread() else None
    try:
        events = train(config, data, work, resume_from=args.resume, init_from=args.init, val_volumes=val,
                       control=control, dist=ctx)
        _consume(events, config, bar, state, started, quiet=not ctx.is_main)
    except FloatingPointError:
        bar.close()
        if not ctx.is_main:
            return 1
        last = f"the last checkpoint before it is {state.checkpoint}" if state.checkpoint else \
            "no checkpoint of this run was saved before it"
        manifest.update({"diverged_at": state.iteration + 1, "checkpoint": state.checkpoint})
        checks.write_json(work / "run.json", manifest, "--out")
        kept, note = checks.abandon_run(work, out)
        where = kept or out
        print(f"m3hl train: error: training diverged at iteration {state.iteration + 1} (the loss became NaN or "
              f"infinite) with learning rate {config.lr:g}; lower --lr (e.g. {config.lr / 10:g}). "
              f"{last.replace(str(work), str(where))}; the diverged weights are {where / 'diverged.pt'}"
              + (f"; {note}" if note else ""), file=sys.stderr)
        return 1
    except BaseException:  # Ctrl-C twice, SIGTERM, an error: an earlier run replaced with --overwrite stays
        if work != out:
            print(f"m3hl train: --overwrite: {checks.abandon_run(work, out)[1]}", file=sys.stderr)
        raise
    finally:
        bar.close()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
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
    if work != out and (finished is None or finished.stopped):  # stopped early (Ctrl-C): not swapped in
        checks.write_json(work / "run.json", manifest, "--out")
        print(f"m3hl train: stopped before the last iteration, so --overwrite did not replace the earlier run: "
              f"{checks.abandon_run(work, out)[1]}", file=sys.stderr)
        return 0
    moved = {k: _moved(manifest[k], work, out) for k in ("checkpoint", "best_checkpoint")}
    manifest.update(moved)
    checks.write_json(work / "run.json", manifest, "--out")
    if work != out:
        _removed_note(checks.commit_run(work, out), out)
    if finished is not None:
        print(f"checkpoint: {moved['checkpoint']}" + (f"  best: {moved['best_checkpoint']}" if moved["best_checkpoint"] else ""))
    return 0


def _moved(path: str | None, work: Path, out: Path) -> str | None:
    """``path`` of a file written into the staging folder ``work``, as it is named once swapped into ``out``."""
    if path is None or work == out:
        return path
    p = Path(path)
    return str(out / p.name) if p.parent == work else path


def _removed_note(removed: list[str], out: Path) -> None:
    if removed:
        print(f"--overwrite: removed the earlier run's {', '.join(removed)} from {out}", file=sys.stderr)


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
            bar.write(f"validation @{e.iteration}: mean Dice {100 * e.mean_dice:.2f}"
                      + (" (best)" if e.best else "") + "  " + " ".join(f"{k} {100 * v:.2f}" for k, v in e.per_class.items()))
        elif isinstance(e, ev.PseudoLabelQuality):
            state.pl_curve.append({"iteration": e.iteration, **{k: round(v, 4) for k, v in e.scores.items()}})
            bar.write(f"pseudo-labels @{e.iteration}: mean Dice {100 * e.scores['pl_mean']:.2f} "
                      f"(student {100 * e.scores['student_mean']:.2f}) on hidden labels")
        elif isinstance(e, ev.TrainFinished):
            state.finished = e
