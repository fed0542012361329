"""Whole-step capture on CUDA (``TrainConfig.capture``), with a clean fallback to eager.

On a GPU the step of this small U-Net is bound by the host: Python and some
hundreds of kernel launches per step (docs/benchmarks.md, "GPU path"). A CUDA
graph records the whole step once (teacher pass, pseudo-labels with their
largest components, mixing, student pass, losses, backward, SGD, EMA) and
replays it with one launch.

``capture`` (:func:`resolve_capture`):

* ``off`` (default): eager steps.
* ``cuda-graph``: :class:`GraphStep` over :func:`step_function`. What
  changes between steps enters as tensors (batch, block mask, learning rate,
  α, EMA decay) copied into the graph's static inputs; the learning rate
  therefore goes through :func:`sgd_step_` (torch's SGD reads a tensor
  learning rate back to the host) and the largest components run a fixed
  number of rounds (``lcc_rounds``) instead of testing convergence on the
  host; a step whose components had not converged is counted on the device
  and reported at the next loss read-back.
* ``compile``: the networks' forward passes through
  ``torch.compile(mode="reduce-overhead")`` (CUDA graphs of the compiled
  forward; backward, SGD and EMA stay eager).
* ``auto``: ``cuda-graph`` where it can run, else ``off``.

Where a mode cannot run (no CUDA device: CPU or MPS; a distributed run; a
3D network), :func:`resolve_capture` returns ``off`` with the reason, which
the trainer logs; the run is then exactly the eager run. Not measured on a
GPU yet (docs/benchmarks.md says so): ``off`` stays the default.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from napari_m3hl.method.step import m3hl_losses, supervised_losses
from napari_m3hl.method.teacher import ema_update

CAPTURE_MODES = ("off", "auto", "cuda-graph", "compile")
#: Rounds of the captured step's connected components (2D). On 400 ACDC label
#: maps at 256² with 2 % of the pixels set to random classes the slowest
#: component converged in 33 rounds (median 7).
LCC_ROUNDS = 64

Inputs = dict[str, torch.Tensor]


def resolve_capture(mode: str, device: torch.device, ndim: int = 2, distributed: bool = False) -> tuple[str, str]:
    """``(mode to run, reason)``: ``off``, ``cuda-graph`` or ``compile``, and why
    (empty when the mode asked for runs as asked)."""
    if mode not in CAPTURE_MODES:
        raise ValueError(f"capture must be one of {CAPTURE_MODES}, got {mode!r}")
    if mode == "off":
        return "off", ""
    why = ""
    if device.type != "cuda":
        why = f"capture={mode} needs a CUDA device; training on {device.type} runs the eager step"
    elif distributed:
        why = f"capture={mode} is not used in a distributed run (DDP's gradient hooks); eager step"
    elif mode in ("auto", "cuda-graph") and ndim != 2:
        why = f"capture={mode} captures 2D steps only (the 3D components' rounds are not sized); eager step"
    if why:
        return "off", why
    return ("cuda-graph" if mode == "auto" else mode), ""


def graph_autocast(setup: Any) -> Callable:
    """Autocast factory (``setup``: a :class:`napari_m3hl.method.step.StepSetup`)
    for a captured step: the setup's dtype with autocast's cache of cast
    weights off, as CUDA graph capture requires."""
    def ctx():
        if setup.amp_dtype is None:
            return torch.autocast(setup.device.type, enabled=False)
        return torch.autocast(setup.device.type, dtype=setup.amp_dtype, cache_enabled=False)
    return ctx


def ensure_momentum_buffers(optimizer: torch.optim.SGD) -> None:
    """Create the zero momentum buffers torch's SGD would create lazily. Its first
    step sets ``buf = grad`` and ``0·momentum + grad`` is the same, so training
    is unchanged; the buffers then exist before a graph is captured."""
    for group in optimizer.param_groups:
        if group["momentum"] == 0:
            continue
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


@torch.no_grad()
def sgd_step_(optimizer: torch.optim.SGD, lr: torch.Tensor) -> None:
    """``optimizer.step()`` of a ``torch.optim.SGD`` (momentum, weight decay; no
    dampening, no Nesterov) with the learning rate a 0-d tensor on the
    parameters' device, in foreach ops and without reading it on the host, so
    it can be captured. The momentum buffers are torch's own
    (``optimizer.state[p]["momentum_buffer"]``, made by
    :func:`ensure_momentum_buffers`), so checkpoints and resume are unchanged.
    Equal to torch's step up to rounding (``p − lr·buf`` instead of
    ``p + (−lr)·buf`` fused)."""
    for group in optimizer.param_groups:
        if group.get("dampening", 0) or group.get("nesterov", False) or group.get("maximize", False):
            raise ValueError("sgd_step_ implements SGD without dampening, Nesterov or maximize")
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        grads = [p.grad for p in params]
        wd, mom = group["weight_decay"], group["momentum"]
        d = torch._foreach_add(grads, params, alpha=wd) if wd else grads
        if mom:
            bufs = [optimizer.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(bufs, mom)
            torch._foreach_add_(bufs, d)
            d = bufs
        torch._foreach_sub_(params, torch._foreach_mul(d, lr))


def step_function(config: Any, student: nn.Module, teacher: nn.Module, optimizer: torch.optim.SGD, autocast: Callable,
                  m3hl: bool, ema_buffers: str, anchor: list | None = None,
                  lcc_rounds: int = LCC_ROUNDS) -> Callable[[Inputs], Inputs]:
    """One whole training step as ``fn(inputs) -> outputs`` with no host
    synchronisation, to be captured by :class:`GraphStep` (or run eagerly, as
    the CPU tests do).

    ``inputs`` (tensors on the training device): ``img_l`` (2n, C, *S),
    ``lab_l`` (2n, *S) int64, ``lr``, ``decay`` (EMA), and for M³HL steps
    ``img_u`` (2n, C, *S), ``mask`` (n, *S), ``alpha`` (0-d) and ``unsup`` (0-d, optional).
    ``outputs``: the loss terms (0-d), for M³HL steps ``lcc_converged`` (0-d
    bool) and the mix preview ``preview_images`` / ``preview_targets`` /
    ``preview_masks``. The gradients must be None when it starts (the caller
    sets them so before capture; inside a graph backward writes them afresh).
    """
    def fn(x: Inputs) -> Inputs:
        if m3hl:
            res = m3hl_losses(config, student, teacher, x["img_l"], x["lab_l"], x["img_u"], None, autocast,
                              alpha=x["alpha"], mask=x["mask"], lcc_rounds=lcc_rounds,
                              unsup=x.get("unsup", 1.0))
        else:
            res = supervised_losses(config, student, x["img_l"], x["lab_l"], autocast)
        losses = dict(res.losses)
        if anchor is not None:
            losses["l2_start"] = sum(((p - a) ** 2).sum() for p, a in anchor)
            losses["total"] = losses["total"] + config.l2_to_start * losses["l2_start"]
        losses["total"].backward()
        sgd_step_(optimizer, x["lr"])
        ema_update(teacher, student, x["decay"], ema_buffers)
        out = {k: v.detach() for k, v in losses.items()}
        if res.preview is not None:
            out.update(preview_images=res.preview[0], preview_targets=res.preview[1], preview_masks=res.preview[2])
        if res.lcc_converged is not None:
            out["lcc_converged"] = res.lcc_converged
        return out

    return fn


class GraphStep:
    """``fn(inputs) -> outputs`` (dicts of tensors) run eagerly on a side stream
    for the first ``warmup`` calls (CUDA's lazy initialisation, cuDNN's
    algorithm choice, the optimizer's state), then captured once in a CUDA
    graph and replayed: each call copies the inputs into the graph's static
    tensors, replays, and returns clones of the outputs (the next replay
    overwrites them). ``before()`` runs before every eager call and before the
    capture (``optimizer.zero_grad(set_to_none=True)``).

    Every call is a real training step, warm-up calls included.
    """

    def __init__(self, fn: Callable[[Inputs], Inputs], before: Callable[[], None], warmup: int = 3) -> None:
        self.fn, self.before, self.warmup = fn, before, warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: Inputs = {}
        self.static_out: Inputs = {}

    def __call__(self, inputs: Inputs) -> Inputs:
        if self.graph is None and self.calls < self.warmup:
            self.calls += 1
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.before()
                out = self.fn(inputs)
            torch.cuda.current_stream().wait_stream(stream)
            return out
        if self.graph is None:
            self.static_in = {k: v.clone() for k, v in inputs.items()}
            self.before()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records; the replay below runs this step
                self.static_out = self.fn(self.static_in)
        for k, v in inputs.items():
            self.static_in[k].copy_(v, non_blocking=True)
        self.graph.replay()
        return {k: v.clone() for k, v in self.static_out.items()}
