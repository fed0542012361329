"""Data-parallel training across processes (torchrun + DistributedDataParallel).

``torchrun --nproc_per_node N -m napari_m3hl train ...`` starts N copies of
the CLI; each reads its rank from the environment torchrun sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and calls
:func:`init_distributed`, which joins the process group (NCCL on GPUs, gloo
on CPU) and returns a :class:`DistContext`. The trainer takes that context
and uses the helpers here at a few fixed points:

* **model**: every rank builds the student and teacher from the same seed;
  :func:`wrap_student` wraps the student in ``DistributedDataParallel``
  (gradients averaged over ranks, so every rank makes the same SGD step) and,
  with ``sync_bn``, turns its BatchNorm layers into ``SyncBatchNorm``
  (statistics over the global batch; GPUs only, a torch limit). Without it
  BatchNorm normalises each rank's own batch ("per rank").
* **teacher**: the EMA update is the same arithmetic on the same weights on
  every rank; :func:`sync_buffers` broadcasts rank 0's BatchNorm running
  statistics (student and teacher) before each update, so the teacher stays
  identical everywhere, buffers included.
* **data**: :class:`ShardedCycler` draws one shuffled permutation per epoch
  from a stream seeded identically on every rank and gives rank r the
  positions r, r+N, r+2N, ...: no index is seen by two ranks in an epoch (the
  ``n mod N`` left over are skipped that epoch, different ones each epoch).
  Augmentation, mask and dropout streams are seeded per rank
  (:func:`rank_seed`; rank 0 keeps the configured seed, so one process
  reproduces a plain run).
* **batch and learning rate**: ``batch_size`` is per rank; the global batch
  is ``batch_size × world_size``. The learning rate is used as configured
  (the CLI's ``--scale-lr`` multiplies it by the world size).
* **side effects**: only rank 0 writes checkpoints (the random state of every
  rank is gathered into ``last.pt``), ``run.json`` and the progress bar, and
  only rank 0 validates.
* **resume**: a checkpoint resumes on any number of processes; with the
  number it was written by, every rank continues its own random streams,
  otherwise the shared sampler continues and each rank starts a new epoch of
  its share with fresh per-rank streams.

Losses and a stop request are all-reduced once per step (one small
tensor), so every rank reports the same mean loss and stops at the same step.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from napari_m3hl.errors import M3HLInputError

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job; the default is a plain single-process run.

    Attributes:
        rank: global rank, 0 .. world_size-1.
        world_size: number of processes.
        local_rank: rank on this machine (selects the GPU).
        backend: "nccl" or "gloo"; None when no process group is used.
        sync_bn: BatchNorm statistics over the global batch (SyncBatchNorm).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    sync_bn: bool = False

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the environment names a rank and a world size (torchrun, SLURM + torchrun, ...)."""
    return all(v in os.environ for v in ENV_VARS[:2])


def init_distributed(device: str = "auto", sync_bn: bool = False, timeout_s: float = 1800.0) -> DistContext:
    """Join the process group torchrun described in the environment.

    Without ``RANK``/``WORLD_SIZE`` this returns a plain single-process
    context. NCCL is used when the run is on CUDA (``device`` "auto" with a
    GPU, or "cuda"), gloo otherwise; each rank takes GPU ``LOCAL_RANK``.
    ``timeout_s``: how long a collective may wait for a missing rank before
    the job fails (seconds).
    """
    if not launched_by_torchrun():
        if sync_bn:
            raise M3HLInputError("--sync-bn needs several processes: launch with torchrun (see docs/cluster.md)")
        return DistContext()
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise M3HLInputError(f"--device {device} but this machine (rank {rank}) has no CUDA GPU")
        if local >= torch.cuda.device_count():
            raise M3HLInputError(f"rank {rank} has LOCAL_RANK {local} but this machine has "
                                 f"{torch.cuda.device_count()} GPU(s): lower --nproc_per_node")
        torch.cuda.set_device(local)
    elif sync_bn:
        raise M3HLInputError("--sync-bn needs GPUs (torch's SyncBatchNorm runs on CUDA only); on CPU "
                             "BatchNorm is per rank: leave --sync-bn out")
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return DistContext(rank, world, local, backend, sync_bn)


def shutdown(ctx: DistContext, wait_for_peers: bool = False) -> None:
    """Leave the process group (after the last collective). ``wait_for_peers``
    (a rank that finished its work): first a barrier, so no rank closes its
    connections while a peer is still writing its files or finishing its
    last collective (gloo aborts a process whose peer hangs up under it);
    a failing rank leaves at once."""
    import torch.distributed as dist

    if ctx.enabled and dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()


def rank_device(ctx: DistContext, device: torch.device) -> torch.device:
    """This rank's GPU (``cuda:LOCAL_RANK``) under NCCL; ``device`` otherwise."""
    if ctx.backend == "nccl" and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s own random streams; rank 0 keeps ``seed``."""
    return int(seed) if rank == 0 else (int(seed) + 1_000_003 * int(rank)) % (2**63)


def wrap_student(student: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """The module to run forward/backward through: DDP around ``student`` when distributed.

    ``student`` itself (its parameters and state dict) stays what the
    optimiser, the EMA and the checkpoints see; with ``sync_bn`` its
    BatchNorm layers are converted in place (same parameters and buffers).
    """
    if not ctx.enabled:
        return student
    from torch.nn.parallel import DistributedDataParallel as DDP

    if ctx.sync_bn:
        for name, child in list(student.named_children()):
            setattr(student, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    ids = [device.index if device.index is not None else ctx.local_rank] if device.type == "cuda" else None
    # buffers are synchronised by sync_buffers after each step, not at each forward
    import inspect

    no_fwd_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})
    return DDP(student, device_ids=ids, **no_fwd_sync)


def _broadcast_flat(tensors: list[torch.Tensor]) -> None:
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = _flatten_dense_tensors(group)
        dist.broadcast(flat, 0)
        for t, v in zip(group, _unflatten_dense_tensors(flat, group)):
            t.copy_(v)


@torch.no_grad()
def sync_buffers(ctx: DistContext, *modules: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
    if ctx.enabled and ctx.world_size > 1:
        _broadcast_flat([b for m in modules for b in m.buffers()])


def reduce_step(ctx: DistContext, losses: dict[str, torch.Tensor], stop: bool) -> tuple[dict[str, float], bool]:
    """Mean of each loss over ranks (as floats) and whether any rank asked to stop."""
    if not ctx.enabled:
        return {k: float(v.detach()) for k, v in losses.items()}, stop
    import torch.distributed as dist

    values = [v.detach().float().reshape(()) for v in losses.values()]
    device = values[0].device if values else torch.device("cpu")
    vec = torch.stack(values + [torch.tensor(float(stop), device=device)])
    dist.all_reduce(vec)
    out = vec.cpu()
    return {k: float(out[i]) / ctx.world_size for i, k in enumerate(losses)}, bool(out[-1] > 0)


class ShardedCycler:
    """Endless shuffled epochs over ``range(n)``, rank ``rank``'s share of each.

    Every rank draws the same permutation from ``rng`` (seed it identically)
    and keeps positions ``rank, rank + world, ...``; with ``n >= world`` the
    last ``n mod world`` positions are dropped so that all shares have the same
    length and no index is used twice in an epoch; with ``n < world`` the
    permutation is repeated to ``world`` entries (each rank still gets one).
    ``world == 1`` reproduces a plain shuffled cycler. ``order`` holds the
    share left in the current epoch (saved in checkpoints).
    """

    def __init__(self, n: int, rng: np.random.Generator, rank: int = 0, world: int = 1) -> None:
        self.n, self.rng, self.rank, self.world = n, rng, rank, world
        self.order: list[int] = []

    def epoch(self) -> list[int]:
        perm = self.rng.permutation(self.n)
        if self.world > 1:
            perm = perm[: self.n - self.n % self.world] if self.n >= self.world else np.resize(perm, self.world)
            perm = perm[self.rank :: self.world]
        return [int(i) for i in perm]

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if not self.order:
                self.order = self.epoch()
            out.append(int(self.order.pop()))
        return out


def shard_cycler(n: int, rng: np.random.Generator, ctx: DistContext) -> ShardedCycler:
    return ShardedCycler(n, rng, ctx.rank, ctx.world_size)


def gather_rng(ctx: DistContext, state: dict[str, Any] | None) -> dict[str, Any] | None:
    """Collect every rank's random state for a checkpoint (a collective: all ranks call it).

    Returns rank 0's state with ``world_size`` and ``ranks`` (one state per
    rank) added; a single process returns ``state`` unchanged.
    """
    if state is None or not ctx.enabled:
        return state
    import torch.distributed as dist

    states: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(states, state)
    return {**states[0], "world_size": ctx.world_size, "ranks": states}


def rank_rng_state(ctx: DistContext, state: dict[str, Any], seed: int, iteration: int) -> dict[str, Any]:
    """The random state this rank resumes from.

    Same number of processes as when saved: the rank's own saved state. A
    different number: the shared sampler stream (numpy) continues, the
    cyclers start a new epoch, and the per-rank torch streams are reseeded
    from (seed, iteration, rank).
    """
    saved_world = int(state.get("world_size", 1))
    if saved_world == ctx.world_size:
        return state["ranks"][ctx.rank] if "ranks" in state else state
    fresh = torch.Generator().manual_seed(rank_seed(int(seed) + 7919 * int(iteration), ctx.rank)).get_state()
    return {"torch": fresh, "torch_global": fresh.clone(), "numpy": state["numpy"], "cyclers": json.dumps([])}


PEER_LOST = ("connection closed by peer", "connection reset", "broken pipe", "timed out", "timeout")


def explain_failure(ctx: DistContext, exc: BaseException) -> str | None:
    """A plain message when ``exc`` means another process of the job died or hung (None otherwise)."""
    import torch.distributed as dist

    text = str(exc)
    lost = isinstance(exc, getattr(dist, "DistError", ())) or any(k in text.lower() for k in PEER_LOST)
    if not (ctx.enabled and ctx.world_size > 1 and lost):
        return None
    return (f"process {ctx.rank} of {ctx.world_size} stopped because another process of this job failed, "
            f"was killed or stopped answering; that process's own error says why. "
            f"Resume from the last saved last.pt. ({text.splitlines()[0] if text else type(exc).__name__})")


def describe(ctx: DistContext, batch_size: int, lr: float) -> dict[str, Any]:
    """What ``run.json`` records about the processes: world size, per-rank and global batch, lr."""
    return {"world_size": ctx.world_size, "backend": ctx.backend, "sync_bn": ctx.sync_bn,
            "batch_per_rank": int(batch_size), "global_batch": int(batch_size) * ctx.world_size, "lr": float(lr)}


def check_ranks_equal(ctx: DistContext, modules: Sequence[nn.Module]) -> float:
    """Largest absolute difference between any rank's and rank 0's weights and buffers (0.0: identical).

    A collective (every rank calls it); a single process returns 0.0.
    """
    if not ctx.enabled or ctx.world_size == 1:
        return 0.0
    import torch.distributed as dist

    worst = torch.zeros((), dtype=torch.float64)
    for m in modules:
        for t in list(m.state_dict().values()):
            ref = t.detach().clone()
            dist.broadcast(ref, 0)
            worst = torch.maximum(worst, (t.detach().double() - ref.double()).abs().max().cpu())
    dev = torch.device("cuda", ctx.local_rank) if ctx.backend == "nccl" else torch.device("cpu")
    worst = worst.to(dev)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)
