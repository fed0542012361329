"""The ``m3hl`` argument parser: one ``_add_<command>`` per command and :func:`build_parser`.

What each command does lives in :mod:`napari_m3hl.cli.train` (``train``),
:mod:`napari_m3hl.cli.fewslice` (``train --data IMAGE --labels PAINTED``) and
:mod:`napari_m3hl.cli.commands` (``predict``, ``evaluate``, ``suggest``, ``phantom``),
:mod:`napari_m3hl.cli.measure` (``measure``);
:mod:`napari_m3hl.cli.main` runs them.
"""
from __future__ import annotations

import argparse

from napari_m3hl import __version__


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 256,256 or 112,112,80, got {text!r}") from None


def _whole(text: str, lo: int, what: str) -> int:
    """``text`` as a whole number of at least ``lo``; ``what`` says what it is when it is smaller."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < lo:
        raise argparse.ArgumentTypeError(f"{what}, got {n}")
    return n


def _seed(text: str) -> int:
    return _whole(text, 0, "a random seed is 0 or more (e.g. --seed 1337)")


def _positive(text: str) -> int:
    return _whole(text, 1, "must be at least 1")


def _fewslice_summary() -> str:
    from napari_m3hl.fewslice.loop import FewSliceOptions

    return FewSliceOptions().summary()


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model with M³HL (or the supervised baseline)",
        epilog="Several GPUs or machines: launch the same command with torchrun, e.g. "
               "'torchrun --nproc_per_node 4 -m napari_m3hl train --preset la_vnet3d --data /data/LA' "
               "(one process per GPU; --batch-size is per process, the global batch is batch × processes; "
               "several nodes: --nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:29400). See docs/cluster.md.")
    p.add_argument("--preset", default=None, help="preset name in models/ or a YAML path (default acdc_unet2d)")
    p.add_argument("--variant", default=None, help="preset variant: paper, reference or (acdc_unet2d) fast (default: the preset's default; fast for acdc_unet2d)")
    p.add_argument("--data", action="append", default=None, metavar="DATA",
                   help="'phantom' (default), an ACDC folder (with train_slices.list), an LA folder (with cases/), or a "
                        "NIfTI image; repeat --data IMAGE --labels PAINTED for several painted volumes (3D, or a 4D cine "
                        "whose unpainted frames become unlabeled data)")
    p.add_argument("--labels", action="append", default=None, metavar="PAINTED",
                   help="with a NIfTI image: its partly painted label map (NIfTI), one per --data, in the same order. "
                        "This fine-tunes --init (default: "
                        f"the shipped 70-patient ACDC model) with the few-slice defaults ({_fewslice_summary()}; the "
                        "model's own input size; --iterations/--lr/--batch-size/--mode/--start-blend override) over all "
                        "the volumes and writes each one's segmentation with the painted slices kept; with "
                        "--preset/--variant/--patch-size/--block-size/--set it trains with the preset's schedule instead")
    p.add_argument("--unlabeled", action="append", default=None, metavar="IMAGE",
                   help="few-slice loop: a NIfTI image without paint (repeatable): unlabeled data for --mode m3hl, "
                        "segmented and written like the others")
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
    p.add_argument("--mode", choices=["m3hl", "supervised"], default=None,
                   help="m3hl: the semi-supervised method; supervised: the labeled slices only. Few-slice loop "
                        "(--labels): default FewSliceOptions.mode; m3hl learns from the unpainted slices and --unlabeled "
                        "images too (its teacher: the network of its first, supervised steps, FewSliceOptions.warm_frac)")
    p.add_argument("--start-blend", type=float, default=None, metavar="W",
                   help="few-slice loop (--labels): weight of the start model's probabilities in the segmentation "
                        "when it segments the painted slices well (default: FewSliceOptions.start_blend; 0 = the "
                        "fine-tuned network alone)")
    p.add_argument("--start-blend-untrusted", type=float, default=None, metavar="W",
                   help="few-slice loop (--labels): that weight when the start model segments the painted slices "
                        "poorly, i.e. the scan is unlike its training data (default: "
                        "FewSliceOptions.start_blend_untrusted; equal to --start-blend, with --start-blend-stable, "
                        "for a fixed weight)")
    p.add_argument("--start-blend-stable", type=float, default=None, metavar="W",
                   help="few-slice loop (--labels): that weight when, besides, the fine-tuned network's segmentation "
                        "of the unpainted slices changed by less than FewSliceOptions.stable_change at its last check "
                        "(default: FewSliceOptions.start_blend_stable)")
    p.add_argument("--no-clean", dest="clean", action="store_const", const=False, default=None,
                   help="few-slice loop (--labels): keep every blob of the segmentation (default: each structure's "
                        "largest 3D connected component)")
    p.add_argument("--no-hl", action="store_true", help="ablation: M³ only (no feature consistency)")
    p.add_argument("--no-mix", action="store_true", help="ablation: HL only (supervised loss instead of L_mix)")
    p.add_argument("--seed", type=_seed, default=None)
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


def _add_cleaning(p: argparse.ArgumentParser) -> None:
    """``--no-clean`` and ``--tta`` (predict, evaluate): see :class:`napari_m3hl.inference.predictor.Predictor`."""
    p.add_argument("--no-clean", dest="clean", action="store_false",
                   help="keep every blob the network segments (the papers' protocol); default: each structure's "
                        "largest 3D connected component only")
    p.add_argument("--tta", action="store_true",
                   help="flip test-time augmentation: average the network over the image and its in-plane mirror "
                        "images (about 3.5x the time; see docs/benchmarks.md)")


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="segment NIfTI or h5 volumes with a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--input", required=True, help="a .nii/.nii.gz/.h5 file or a folder of them")
    p.add_argument("--output", required=True,
                   help="folder for <name>.nii.gz label maps, or a .nii.gz file name for a single input")
    p.add_argument("--overwrite", action="store_true", help="replace existing label maps (never an input)")
    p.add_argument("--which", choices=["student", "teacher"], default="student",
                   help="student (default; a few-slice fine-tune's student segments blended with its start model, "
                        "as the loop showed) or the EMA teacher")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=_positive, default=8)
    _add_cleaning(p)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a checkpoint on validation volumes (Dice, Jaccard, HD95, ASD)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="an ACDC folder (val.list + volumes/), an LA folder, or 'phantom'")
    p.add_argument("--which", choices=["student", "teacher"], default="student",
                   help="student (default; a few-slice fine-tune's student segments blended with its start model, "
                        "as the loop showed) or the EMA teacher")
    p.add_argument("--device", default="auto")
    p.add_argument("--limit", type=_positive, default=None, help="score only the first N volumes")
    p.add_argument("--list", default=None, dest="names_file",
                   help="a file of volume names to score instead of val.list (e.g. test.list)")
    p.add_argument("--spacing", type=float, nargs="+", default=None,
                   help="voxel spacing in mm (D H W) for distances in mm; default: pixels, as the papers")
    p.add_argument("--empty", choices=["paper", "strict"], default="paper",
                   help="how a class missing from the prediction scores: paper (0 on all four metrics, as the published numbers) or strict (NaN distances); see docs/method.md")
    p.add_argument("--json", default=None, help="write the per-case and summary metrics here")
    _add_cleaning(p)


def _add_suggest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("suggest", help="rank the unlabeled slices of a NIfTI volume: which to label next")
    p.add_argument("--checkpoint", required=True, help="a 2D checkpoint (with its EMA teacher for 'disagreement')")
    p.add_argument("--image", required=True, help="a 3D .nii/.nii.gz volume")
    p.add_argument("--labels", default=None, help="its partial labels (.nii/.nii.gz); labeled slices are left out")
    from napari_m3hl.fewslice.suggest import METHODS  # numpy only: cheap at parser build

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
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--count", type=_positive, default=1, help="volumes with seeds seed, seed+1, ...")
    p.add_argument("--overwrite", action="store_true", help="replace phantom files already in --output")


def _add_measure(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("measure", help="clinical measures of a segmentation: LV/RV volumes, EF, LV mass")
    p.add_argument("segmentation", metavar="SEG",
                   help="a .nii/.nii.gz label map (1 RV, 2 Myo, 3 LV): one 3D frame (with SEG_ES: end-diastole), "
                        "or a 4D cine (ED and ES: the frames of the largest and smallest LV volume)")
    p.add_argument("es_segmentation", metavar="SEG_ES", nargs="?", default=None,
                   help="the end-systolic frame's segmentation (3D, same scan)")
    p.add_argument("--ed", type=int, default=None, metavar="T", help="a 4D cine's end-diastolic frame (from 0)")
    p.add_argument("--es", type=int, default=None, metavar="T", help="a 4D cine's end-systolic frame (from 0)")
    p.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("D", "H", "W"),
                   help="voxel size in mm (slice spacing, then the in-plane pixel size) for a file whose header "
                        "has none; default: the header's")
    p.add_argument("--json", default=None, help="write the measurements here (JSON)")
    p.add_argument("--csv", default=None, help="write the measurements here (CSV)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m3hl", description="M³HL semi-supervised cardiac MR segmentation")
    parser.add_argument("--version", action="version", version=f"napari-m3hl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_predict(sub)
    _add_evaluate(sub)
    _add_suggest(sub)
    _add_phantom(sub)
    _add_measure(sub)
    return parser
