"""Teacher BatchNorm statistics for an eval-mode teacher (the paper variant).

For ``teacher_bn`` = ``ema`` (statistics averaged like the weights), ``copy``
(the student's) and ``own`` (the teacher labels with batch statistics and keeps
running statistics of its own activations), seeds 1-3: train on the phantom
(4 volumes, 2 painted slices each), 128×128, batch 8, lr 0.01, 300 iterations,
one thread, and score the last student and EMA teacher (mean Dice over RV, Myo,
LV) on 3 phantom validation volumes. Writes ``results/teacher_bn.json``.

    OMP_NUM_THREADS=1 python benchmarks/teacher_bn.py
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from napari_m3hl.training import events as ev
from napari_m3hl.config import load_preset
from napari_m3hl.data.phantom_source import phantom_train_data, phantom_val_volumes
from napari_m3hl.inference.predictor import Predictor
from napari_m3hl.training.trainer import train

RESULTS = Path(__file__).resolve().parent / "results" / "teacher_bn.json"
MODES = ("ema", "copy", "own")


def main() -> None:
    torch.set_num_threads(1)
    data, val = phantom_train_data(), phantom_val_volumes(3)
    runs = []
    for seed in (1, 2, 3):
        for bn in MODES:
            cfg = load_preset("acdc_unet2d", "paper", patch_size=(128, 128), block_size=(32, 32), batch_size=8,
                              lr=0.01, iterations=300, device="cpu", seed=seed, teacher_bn=bn, checkpoint_every=0)
            t0 = time.time()
            out = Path(tempfile.mkdtemp(prefix=f"teacher_bn_{bn}_{seed}_"))
            fin = [e for e in train(cfg, data, out) if isinstance(e, ev.TrainFinished)][-1]
            r = {"seed": seed, "teacher_bn": bn, "seconds": round(time.time() - t0, 1), "load": os.getloadavg()[0]}
            for which in ("student", "teacher"):
                r[which] = Predictor.from_checkpoint(fin.checkpoint, which, clean=False).score(val)[0]["mean"]["dice"]
            runs.append(r)
            print(json.dumps(r), flush=True)
    RESULTS.write_text(json.dumps({
        "description": __doc__.split("\n\n")[1].replace("\n", " "),
        "command": "OMP_NUM_THREADS=1 python benchmarks/teacher_bn.py",
        "date": _dt.date.today().isoformat(), "machine": "2 shared cores (load per row)", "runs": runs,
    }, indent=1))


if __name__ == "__main__":
    main()
