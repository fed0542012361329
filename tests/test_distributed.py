"""Training across processes (torchrun + DDP, gloo on CPU, 2 processes).

Each test launches real processes (as a user or a cluster would) on a tiny
phantom setting: 64×64 patches, batch 4 per process, a few iterations, one
thread per process. ``tests/dist_worker.py`` is one process of such a
training that saves its own student / teacher weights for comparison.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as tdist

from napari_m3hl.training.distributed import DistContext, ShardedCycler, rank_rng_state, rank_seed

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "dist_worker.py")
TINY = ["--data", "phantom", "--batch-size", "4", "--patch-size", "64,64", "--block-size", "16,16", "--quiet"]

pytestmark = pytest.mark.skipif(not (tdist.is_available() and tdist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available in this torch build")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", **extra)
    return env


def torchrun(nproc: int, *argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *argv]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _why(r: subprocess.CompletedProcess) -> str:
    """A failed run's stderr for the assertion message: from the first fatal
    error of a child (a crash prints it long before the launcher's own
    traceback, which the tail holds) plus the tail."""
    err = r.stderr
    i = err.find("Fatal Python error")
    head = err[i:i + 3000] if i >= 0 else ""
    return f"{head}\n...\n{err[-2000:]}" if head else err[-3000:]


def m3hl(*argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "napari_m3hl", *argv], env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_cycler_splits_each_epoch_without_overlap():
    for n, world in ((8, 2), (9, 2), (10, 3)):
        cyclers = [ShardedCycler(n, np.random.default_rng(5), r, world) for r in range(world)]
        share = n // world
        for _ in range(3):  # three epochs
            taken = [c.take(share) for c in cyclers]
            flat = [i for t in taken for i in t]
            assert len(set(flat)) == len(flat) == share * world
        assert all(c.order == [] for c in cyclers)
    plain = ShardedCycler(5, np.random.default_rng(1))  # one process: every index, reshuffled each epoch
    assert sorted(plain.take(5)) == list(range(5))
    tiny = [ShardedCycler(1, np.random.default_rng(0), r, 2) for r in range(2)]  # fewer samples than ranks
    assert [c.take(1) for c in tiny] == [[0], [0]]


def test_rank_streams_and_resume_state():
    assert rank_seed(7, 0) == 7 and len({rank_seed(7, r) for r in range(4)}) == 4
    saved = {"torch": torch.Generator().get_state(), "numpy": "{}", "cyclers": "[[1], [2]]", "world_size": 2,
             "ranks": [{"cyclers": "[[1]]"}, {"cyclers": "[[2]]"}]}
    assert rank_rng_state(DistContext(1, 2, 1, "gloo"), saved, 3, 10) == {"cyclers": "[[2]]"}
    other = rank_rng_state(DistContext(0, 3, 0, "gloo"), saved, 3, 10)  # a different number of processes
    assert other["numpy"] == "{}" and other["cyclers"] == "[]"
    assert not torch.equal(other["torch"], rank_rng_state(DistContext(1, 3, 1, "gloo"), saved, 3, 10)["torch"])


def test_torchrun_train_resume_with_one_process_and_predict(tmp_path):
    out = tmp_path / "run"
    r = torchrun(2, "-m", "napari_m3hl", "train", *TINY, "--iterations", "4", "--set", "checkpoint_every=2",
                 "--out", str(out))
    assert r.returncode == 0, _why(r)
    assert "2 processes (gloo): batch 4 per process, global batch 8" in r.stderr
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["distributed"]["global_batch"] == 8 and manifest["distributed"]["world_size"] == 2
    assert manifest["iterations_done"] == 4
    assert manifest["metrics"]["rank_weight_max_diff"] == 0.0  # the trainer's own check across ranks
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["iteration"] == 4 and ckpt["rng"]["world_size"] == 2 and len(ckpt["rng"]["ranks"]) == 2
    assert r.stdout.count("checkpoint:") == 1  # only rank 0 reports

    r = m3hl("train", *TINY, "--iterations", "6", "--resume", str(out / "last.pt"), "--out", str(out))
    assert r.returncode == 0, _why(r)
    assert "iterations 4→6" in r.stderr
    assert torch.load(out / "last.pt", weights_only=True)["iteration"] == 6

    r = m3hl("phantom", "--output", str(tmp_path / "ph"), "--seed", "5")
    assert r.returncode == 0, r.stderr
    r = m3hl("predict", "--checkpoint", str(out / "last.pt"), "--input", str(tmp_path / "ph" / "phantom_5.nii.gz"),
             "--output", str(tmp_path / "pred"), "--device", "cpu")
    assert r.returncode == 0, _why(r)
    assert (tmp_path / "pred" / "phantom_5.nii.gz").is_file()


def test_ranks_hold_identical_student_and_teacher_and_disjoint_data(tmp_path):
    r = torchrun(2, WORKER, str(tmp_path), "--iterations", "4")
    assert r.returncode == 0, _why(r)
    s0, s1 = (torch.load(tmp_path / f"rank{k}.pt", weights_only=True) for k in (0, 1))
    assert _states_equal(s0["student"], s1["student"])
    assert _states_equal(s0["teacher"], s1["teacher"])
    assert not _states_equal(s0["student"], s0["teacher"])  # the teacher is an average, not a copy
    # 8 labeled samples, 2 per step per rank: each epoch (2 steps) the ranks read disjoint halves
    for epoch in range(2):
        a, b = (set(s["read"][4 * epoch: 4 * epoch + 4]) for s in (s0, s1))
        assert not a & b and a | b == set(range(8))
    assert (tmp_path / "run" / "last.pt").is_file() and not (tmp_path / "rank1").exists()


def test_one_process_equals_a_plain_run(tmp_path):
    r = torchrun(1, WORKER, str(tmp_path / "ddp"), "--iterations", "3")
    assert r.returncode == 0, _why(r)
    plain = subprocess.run([sys.executable, WORKER, str(tmp_path / "plain"), "--iterations", "3"], env=_env(),
                           capture_output=True, text=True, timeout=240)
    assert plain.returncode == 0, _why(plain)
    d = torch.load(tmp_path / "ddp" / "rank0.pt", weights_only=True)
    p = torch.load(tmp_path / "plain" / "rank0.pt", weights_only=True)
    assert d["world_size"] == 1 and p["world_size"] == 1
    assert d["read"] == p["read"]
    assert _states_equal(d["student"], p["student"]) and _states_equal(d["teacher"], p["teacher"])


def test_failure_on_one_rank_ends_the_torchrun_job(tmp_path):
    t0 = time.monotonic()
    r = torchrun(2, WORKER, str(tmp_path), "--iterations", "50", "--fail-rank", "1", "--fail-after", "5",
                 timeout=180)
    assert r.returncode != 0
    assert time.monotonic() - t0 < 150
    assert "injected failure" in r.stderr and "rank" in r.stderr  # torchrun names the failed rank and the cause
    assert not (tmp_path / "rank0.pt").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_surviving_rank_does_not_hang_without_torchrun(tmp_path):
    """Processes started by hand (no torchrun to kill the rest): rank 0 must fail, not wait forever."""
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, WORKER, str(tmp_path), "--iterations", "50", "--fail-rank", "1",
                               "--fail-after", "5", "--timeout", "30"],
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        results = [p.communicate(timeout=150) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[1].returncode != 0 and "injected failure" in results[1][1]
    assert procs[0].returncode != 0, "rank 0 went on although rank 1 died"
    assert "process 0 of 2 stopped because another process of this job failed" in results[0][1]


def test_train_help_says_how_to_launch_on_several_gpus():
    r = m3hl("train", "--help", timeout=60)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "torchrun --nproc_per_node 4 -m napari_m3hl train" in text and "docs/cluster.md" in text
    assert "--sync-bn" in text and "--scale-lr" in text and "--dist-timeout" in text


def test_sync_bn_outside_torchrun_is_a_clear_error(monkeypatch):
    from napari_m3hl.training.distributed import explain_failure, init_distributed
    from napari_m3hl.errors import M3HLInputError

    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert init_distributed("cpu") == DistContext()
    with pytest.raises(M3HLInputError, match="torchrun"):
        init_distributed("cpu", sync_bn=True)
    two = DistContext(0, 2, 0, "gloo")
    assert "another process of this job failed" in explain_failure(two, RuntimeError("Connection closed by peer"))
    assert explain_failure(two, RuntimeError("shape mismatch")) is None
    assert explain_failure(DistContext(), RuntimeError("Connection closed by peer")) is None
