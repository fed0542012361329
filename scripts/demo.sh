#!/usr/bin/env bash
# The main job on the built-in synthetic cardiac phantom: a short M³HL
# training run (2 labeled slices per volume), then segmentation of a new
# phantom volume written as NIfTI, then its scores against the phantom truth.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/demo}
M3HL=.venv/bin/m3hl
$M3HL phantom --output "$OUT/input" --seed 100 --overwrite
$M3HL train --data phantom --labeled 2 --iterations "${ITERATIONS:-300}" --batch-size 8 \
  --patch-size 128,128 --set block_size=[32,32] --lr 0.01 --out "$OUT/train" --overwrite
$M3HL predict --checkpoint "$OUT/train/last.pt" --input "$OUT/input/phantom_100.nii.gz" --output "$OUT/pred" --overwrite
$M3HL evaluate --checkpoint "$OUT/train/last.pt" --data phantom --limit 3
