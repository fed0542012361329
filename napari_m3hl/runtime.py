"""Process-level settings: device choice and glibc malloc tuning."""
from __future__ import annotations

import ctypes
import sys

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned = False


def tune_malloc() -> bool:
    """Raise glibc's mmap/trim thresholds so large CPU activations are reused
    instead of mapped and unmapped every step (2-3× faster CPU training).

    Safe to call repeatedly; does nothing off glibc. Returns True when applied.
    """
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        return False
    _tuned = bool(ok)
    return _tuned


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → cuda, then mps, then cpu; an explicit name is checked."""
    from .errors import M3HLInputError

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise M3HLInputError("device 'cuda' was asked for but no CUDA GPU is available; use --device auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise M3HLInputError("device 'mps' was asked for but Apple MPS is not available; use --device auto or cpu")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise M3HLInputError(f"unknown device {name!r}; use auto, cuda, mps or cpu")
    return torch.device(name)
