"""Process-level settings: device choice, glibc malloc tuning, CPU precision
(native bf16 detection, autocast) and torch thread counts per role."""
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
    from napari_m3hl.errors import M3HLInputError

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


# ------------------------------------------------------------------ CPU speed
PRECISIONS = ("auto", "fp32", "bf16")


def _cpu_flags() -> set[str]:
    """CPU feature flags from ``/proc/cpuinfo`` (Linux; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("flags", "features"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively: x86 AVX512-BF16 or AMX-BF16,
    ARM ``bf16`` (Linux ``/proc/cpuinfo`` flags). Elsewhere (or unknown) False,
    so bf16 is never chosen where oneDNN would only emulate it (slower than fp32)."""
    flags = _cpu_flags()
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``, or None for fp32.

    ``auto``: bf16 on CUDA (where supported) and on CPUs with native bf16,
    else fp32; ``bf16``: bf16 wherever autocast supports it (CUDA, CPU;
    slow on CPUs without native bf16); ``fp32``: no autocast.
    """
    from napari_m3hl.errors import M3HLInputError

    if precision not in PRECISIONS:
        raise M3HLInputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32" or device.type not in ("cpu", "cuda"):
        return None
    if device.type == "cuda":
        return torch.bfloat16 if (precision == "bf16" or torch.cuda.is_bf16_supported()) else None
    if precision == "bf16" or cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` on ``device`` with ``dtype``; a disabled one for None (fp32)."""
    if dtype is None:
        return torch.autocast(device.type if device.type in ("cpu", "cuda") else "cpu", enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def thread_count(role: str = "cli") -> int:
    """Torch intra-op threads for a process role (see :func:`set_threads`),
    without setting them.

    ``"cli"``: every core this process may use, for headless training and
    prediction. ``"gui"``: one core fewer (at least 1), so napari's event loop
    (and its software-rendered canvas on machines without a GPU) keeps a core
    while a long run trains or a prediction runs in a worker thread.
    ``"gui_fewslice"``: every core, for the widget's few-slice Train: measured
    on 2 cores (``benchmarks/gui_responsiveness.py``, docs/benchmarks.md), its
    click-to-segmentation time fell from 71 s with one thread to 49 s with two,
    the engine's own time on that volume, while the event loop's longest stall
    stayed under 0.2 s and its 99th-percentile tick gap under 30 ms. An explicit
    ``OMP_NUM_THREADS`` in the environment wins in every case (the user asked for it).
    """
    import os

    if role not in ("cli", "gui", "gui_fewslice"):
        raise ValueError(f"role must be 'cli', 'gui' or 'gui_fewslice', got {role!r}")
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(cores - 1, 1) if role == "gui" else cores


def set_threads(role: str = "cli") -> int:
    """Set torch's intra-op threads for a process role (:func:`thread_count`)
    and return the count."""
    n = thread_count(role)
    torch.set_num_threads(n)
    return n
