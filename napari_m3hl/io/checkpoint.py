"""Checkpoints: save and load with ``torch.load(..., weights_only=True)``.

A checkpoint is a dict of tensors and plain Python values only:

``format``, ``arch``, ``in_channels``, ``num_classes``, ``class_names``,
``patch_size``, ``config`` (``TrainConfig.to_dict()``), ``iteration``,
``student`` / ``teacher`` (state dicts), and for resuming ``optimizer`` and
``rng`` (torch CPU generator states as uint8 tensors). A few-slice
fine-tune (:mod:`napari_m3hl.fewslice.loop`) also keeps its start model's weights
(``start``) and the weight of their probabilities in the segmentation
(``start_blend``; :mod:`napari_m3hl.inference.blend`). A *model file* (the
shipped weights) has ``student`` only, optionally in half precision, and
``metrics``/``card`` extras.

``weights_sha256`` maps ``student`` / ``teacher`` / ``start`` to a SHA-256 of their
tensors (names, dtypes, shapes and bytes; :func:`weights_digest`), written by
:func:`save_checkpoint` and checked by :func:`load_checkpoint`, so a file
whose weights were damaged on disk is refused instead of segmenting wrongly.
Checkpoints written before the checksum existed load without the check.

``weights_finite`` maps the same names to whether every weight is finite,
``diverged`` (True) marks the weights a run saved when its loss became
NaN or infinite (``diverged.pt``), and ``completed`` whether the run had
reached its last iteration when the file was written (False for a run
stopped early or a checkpoint written on the way; a few-slice fine-tune
ended by its early stop rule counts as completed), ``saved_as`` which of the
run's files it was written as (``last``, ``best``, ``diverged``). :func:`load_checkpoint`
refuses non-finite and diverged weights (it checks finiteness itself, so
older files are covered too): they would segment garbage. :func:`unfinished_note`
says in one line when a run's ``last.pt`` comes from a run that did not finish.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from napari_m3hl.config import TrainConfig
from napari_m3hl.errors import M3HLInputError
from napari_m3hl.io.files import atomic_path, why_not_a_file
from napari_m3hl.method.networks import build_network

FORMAT = "m3hl-checkpoint-1"
WEIGHTS = ("student", "teacher", "start")
REQUIRED = ("arch", "in_channels", "num_classes", "class_names", "patch_size", "student")


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of a state dict: each tensor's name, dtype, shape and raw bytes, in key order."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key]
        if not isinstance(t, torch.Tensor):
            h.update(f"{key}:{t!r};".encode())
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weights_finite(state: dict[str, torch.Tensor]) -> bool:
    """True when every floating-point tensor of a state dict is free of NaN and inf."""
    return all(bool(torch.isfinite(t).all()) for t in state.values()
               if isinstance(t, torch.Tensor) and t.is_floating_point())


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write atomically (temporary file + rename), so a crash never leaves a
    half-written file in place of a finished checkpoint. The weights' SHA-256
    (``weights_sha256``) is added to what is written."""
    payload = {**payload, "weights_sha256": {k: weights_digest(payload[k]) for k in WEIGHTS if k in payload},
               "weights_finite": {k: weights_finite(payload[k]) for k in WEIGHTS if k in payload}}
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **payload}, tmp)
    return path


def make_payload(
    config: TrainConfig,
    student: nn.Module,
    teacher: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    iteration: int = 0,
    rng: dict[str, torch.Tensor] | None = None,
    half: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """Collect what a checkpoint holds (state dicts copied to the CPU)."""

    def cpu_state(m: nn.Module) -> dict[str, torch.Tensor]:
        return {
            k: (v.detach().to("cpu", copy=True).half() if half and v.is_floating_point() else v.detach().to("cpu", copy=True))
            for k, v in m.state_dict().items()
        }

    payload: dict[str, Any] = {
        "arch": config.arch,
        "in_channels": config.in_channels,
        "num_classes": config.num_classes,
        "class_names": list(config.class_names),
        "patch_size": list(config.patch_size),
        "config": config.to_dict(),
        "iteration": int(iteration),
        "student": cpu_state(student),
    }
    if teacher is not None:
        payload["teacher"] = cpu_state(teacher)
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    if rng is not None:
        payload["rng"] = rng
    payload.update(extra)
    return payload


def _read_error(path: Path, exc: Exception) -> M3HLInputError:
    """A one-line reason for a file torch could not load (never torch's advice to
    drop ``weights_only``, which would run the file's code)."""
    if isinstance(exc, MemoryError):
        return M3HLInputError(f"not enough memory to read checkpoint {path}")
    text = str(exc)
    found = re.search(r"Unsupported (?:global|class): ([^\s]+(?: [^\s]+)?)", text)
    if found or "GLOBAL" in text:
        what = f" ({found.group(1).strip()})" if found else ""
        return M3HLInputError(
            f"checkpoint {path} holds Python objects other than weights{what}; it was refused without "
            "running it. Only load checkpoints written by 'm3hl train' or the napari plugin."
        )
    return M3HLInputError(
        f"checkpoint {path} could not be read ({exc.__class__.__name__}); it is truncated, corrupt or not an "
        "M³HL checkpoint. Use last.pt or best.pt of a finished run, or a file from models/."
    )


def _check_structure(ckpt: dict[str, Any], path: Path) -> None:
    """Keys, types and tensor shapes against the network the checkpoint names."""
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise M3HLInputError(f"checkpoint {path} lacks {', '.join(missing)}; it is damaged or not from M³HL")
    try:
        in_ch, n_cls = int(ckpt["in_channels"]), int(ckpt["num_classes"])
        patch = [int(p) for p in ckpt["patch_size"]]
        names = [str(n) for n in ckpt["class_names"]]
    except (TypeError, ValueError) as exc:
        raise M3HLInputError(f"checkpoint {path} has malformed settings ({exc}); it is damaged") from exc
    if len(names) != n_cls or len(patch) not in (2, 3) or min(patch) < 1:
        raise M3HLInputError(f"checkpoint {path} has inconsistent settings (classes {names}, patch {patch})")
    try:
        with torch.device("meta"):
            ref = build_network(str(ckpt["arch"]), in_ch, n_cls).state_dict()
    except Exception as exc:  # noqa: BLE001 - unknown architecture name
        raise M3HLInputError(f"checkpoint {path} names an unknown network {ckpt['arch']!r} ({exc})") from exc
    for which in WEIGHTS:
        if which not in ckpt:
            continue
        state = ckpt[which]
        if not isinstance(state, dict):
            raise M3HLInputError(f"checkpoint {path}: '{which}' is not a set of weights")
        lost = sorted(set(ref) - set(state))
        extra = sorted(set(state) - set(ref))
        wrong = [k for k in ref if k in state and (not isinstance(state[k], torch.Tensor)
                                                   or tuple(state[k].shape) != tuple(ref[k].shape))]
        if lost or extra or wrong:
            detail = (f"missing {lost[0]}" if lost else f"unexpected {extra[0]}" if extra else
                      f"{wrong[0]} has shape {tuple(getattr(state[wrong[0]], 'shape', ()))}, "
                      f"a {ckpt['arch']} needs {tuple(ref[wrong[0]].shape)}")
            n = len(lost) + len(extra) + len(wrong)
            raise M3HLInputError(
                f"checkpoint {path}: the {which} weights do not fit a {ckpt['arch']} network with {in_ch} input "
                f"channel(s) and {n_cls} classes ({n} tensor(s) differ, e.g. {detail}); the file is damaged or "
                "was edited"
            )


def _check_digest(ckpt: dict[str, Any], path: Path) -> None:
    stored = ckpt.get("weights_sha256")
    if stored is None:
        return  # written before checksums existed
    if not isinstance(stored, dict):
        raise M3HLInputError(f"checkpoint {path} has a malformed weights checksum; the file is damaged")
    for which in WEIGHTS:
        if which in ckpt and stored.get(which) != weights_digest(ckpt[which]):
            raise M3HLInputError(
                f"checkpoint {path} is damaged: its {which} weights do not match the checksum stored with "
                "them (the file changed on disk after it was written). Use another copy or retrain."
            )


def _check_finite(ckpt: dict[str, Any], path: Path) -> None:
    """Refuse the weights of a diverged run: marked ``diverged`` or holding NaN/inf."""
    if ckpt.get("diverged"):
        raise M3HLInputError(
            f"checkpoint {path} holds the weights of a training run that diverged (its loss became NaN or infinite); "
            "it cannot segment. Use the run's last.pt from before the divergence, or retrain with a lower --lr")
    for which in WEIGHTS:
        if which in ckpt and not weights_finite(ckpt[which]):
            raise M3HLInputError(
                f"checkpoint {path}: its {which} weights hold NaN or infinite values (a training run that diverged); "
                "it cannot segment. Use a checkpoint saved before the divergence, or retrain with a lower --lr")


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive (``torch.jit.save``): a zip holding compiled code, not a weights dict."""
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint or model file (``weights_only=True``).

    Refused with :class:`M3HLInputError`: a missing file, a folder, a symbolic
    link loop, a TorchScript archive, a file holding
    anything but tensors and plain values (never executed), a truncated or
    corrupt file, missing keys, weights whose names or shapes do not fit the
    network the file names, weights that fail their stored checksum, and the
    weights of a diverged run (marked ``diverged``, or NaN/inf).
    """
    path = Path(path)
    problem = why_not_a_file(path, "checkpoint", "pass the path of a .pt file written by 'm3hl train'")
    if problem:
        raise M3HLInputError(problem)
    if _is_torchscript(path):
        raise M3HLInputError(
            f"checkpoint {path} is a TorchScript archive (torch.jit.save), not an M³HL checkpoint; it was not loaded. "
            "Give a .pt file written by 'm3hl train' (last.pt, best.pt) or a model from models/")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise _read_error(path, exc) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "student" not in ckpt:
        raise M3HLInputError(f"{path} is not an M³HL checkpoint (format {FORMAT!r} expected)")
    _check_structure(ckpt, path)
    _check_digest(ckpt, path)
    _check_finite(ckpt, path)
    return ckpt


def unfinished_note(ckpt: dict[str, Any], path: str | Path) -> str | None:
    """One line when ``ckpt`` was saved by a run that did not reach its last
    iteration (``completed`` False: stopped, interrupted, or the periodic
    ``last.pt`` of a run still going); None for a finished run, a run's
    ``best.pt`` (the best validation score on the way, by design), and files
    without the flag (model files, older checkpoints). A note, not a refusal:
    such weights segment, only less trained than the run meant them to be."""
    if ckpt.get("completed", True) is not False or ckpt.get("saved_as") == "best":
        return None
    planned = (ckpt.get("config") or {}).get("iterations")
    at = f"iteration {int(ckpt.get('iteration', 0))}" + (f" of {int(planned)}" if planned else "")
    return (f"note: checkpoint {path} comes from a run that did not finish (saved at {at}: stopped or "
            "interrupted); it is used as it is, less trained than its run planned")


def check_compatible(ckpt: dict[str, Any], arch: str, num_classes: int, in_channels: int = 1, source: str = "checkpoint") -> None:
    """Raise a clear error when a checkpoint does not fit the wanted network."""
    if ckpt["arch"] != arch:
        raise M3HLInputError(f"{source} is a {ckpt['arch']} model, but a {arch} model is needed; choose a matching preset or checkpoint")
    if ckpt["num_classes"] != num_classes:
        raise M3HLInputError(
            f"{source} predicts {ckpt['num_classes']} classes ({', '.join(ckpt['class_names'])}), "
            f"but the data have {num_classes}; start from scratch or use a checkpoint with the same classes"
        )
    if ckpt["in_channels"] != in_channels:
        raise M3HLInputError(f"{source} expects {ckpt['in_channels']} input channels, the data have {in_channels}")


def model_from_checkpoint(ckpt: dict[str, Any], which: str = "student", device: str | torch.device = "cpu") -> nn.Module:
    """Build the network of a checkpoint and load ``student`` or ``teacher`` weights (float32, eval mode).

    Asking for the teacher of a file without one (a model file) is refused."""
    if which not in WEIGHTS:
        raise M3HLInputError(f"choose the student, teacher or start network, not {which!r}")
    if which not in ckpt:
        raise M3HLInputError(
            f"this checkpoint has no {which} network (a model file holds the student only); use the student"
        )
    net = build_network(ckpt["arch"], ckpt["in_channels"], ckpt["num_classes"])
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in ckpt[which].items()}
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise M3HLInputError(f"checkpoint weights do not fit a {ckpt['arch']} network: {exc}") from exc
    return net.to(device).eval()


def image_interp(ckpt: dict[str, Any]) -> str:
    """How the checkpoint's training resized images to the patch (``"bilinear"``
    or ``"nearest"``); inference must resize its inputs the same way."""
    return ckpt.get("config", {}).get("image_interp", "bilinear")


def load_model(path: str | Path, which: str = "student", device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a network from a checkpoint file; returns (model, checkpoint dict)."""
    ckpt = load_checkpoint(path)
    return model_from_checkpoint(ckpt, which, device), ckpt


def trained_models(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, nn.Module]:
    """(student, teacher) of a checkpoint file, float32 in eval mode on ``device``."""
    ckpt = load_checkpoint(path)
    return model_from_checkpoint(ckpt, "student", device), model_from_checkpoint(ckpt, "teacher", device)


def run_kind(ckpt: dict[str, Any]) -> str:
    """What made a checkpoint: ``"fewslice"`` (the few-slice loop, whose config
    is recorded with preset ``fewslice``) or ``"preset"`` (a preset's run).
    Train on, Load checkpoint and Open session all read it from here."""
    return "fewslice" if (ckpt.get("config") or {}).get("preset") == "fewslice" else "preset"
