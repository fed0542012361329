"""One process of a small training for tests/test_distributed.py (not a test itself).

Run plain (``python tests/dist_worker.py OUT``) or under torchrun / with
RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set. Trains the 2D U-Net on phantom
data (64×64 patches, batch 4, a few iterations, one thread) through
``trainer.train`` and writes ``OUT/rank<r>.pt``: this rank's student and
teacher state dicts and the labeled sample indices it read, step by step.
``--fail-rank R --fail-after K``: rank R raises on its K-th labeled sample.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from napari_m3hl.training import trainer
from napari_m3hl.config import load_preset
from napari_m3hl.data.phantom_source import phantom_train_data
from napari_m3hl.training.distributed import explain_failure, init_distributed, shutdown


class Recording:
    """A sample set that records (and can fail on) the indices it serves."""

    def __init__(self, base, fail_after: int | None) -> None:
        self.base, self.fail_after, self.read = base, fail_after, []

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        self.read.append(int(i))
        if self.fail_after is not None and len(self.read) >= self.fail_after:
            raise RuntimeError(f"injected failure on sample {i}")
        return self.base[i]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--fail-rank", type=int, default=None)
    p.add_argument("--fail-after", type=int, default=5)
    p.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args()
    torch.set_num_threads(1)
    ctx = init_distributed("cpu", timeout_s=args.timeout)
    built = []
    real_build = trainer.build_network
    trainer.build_network = lambda *a, **k: built.append(real_build(*a, **k)) or built[-1]
    config = load_preset("acdc_unet2d", "reference", iterations=args.iterations, batch_size=4, patch_size=(64, 64),
                         block_size=(16, 16), device="cpu", seed=3, checkpoint_every=0)
    data = phantom_train_data(n_volumes=4, labeled_slices_per_volume=2, seed=0, shape=(10, 96, 96))
    data.labeled = Recording(data.labeled, args.fail_after if ctx.rank == args.fail_rank else None)
    out = Path(args.out)
    try:
        for _ in trainer.train(config, data, out / "run", dist=ctx):
            pass
    except RuntimeError as exc:  # as the CLI does
        message = explain_failure(ctx, exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    finally:
        shutdown(ctx)
    student, teacher = built
    torch.save({"student": student.state_dict(), "teacher": teacher.state_dict(), "read": data.labeled.read,
                "world_size": ctx.world_size}, out / f"rank{ctx.rank}.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
