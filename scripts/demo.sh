#!/usr/bin/env bash
# The main job on a synthetic cardiac phantom: two slices of a new volume are
# "painted" (the phantom's truth on those slices), the shipped 70-patient ACDC
# model is fine-tuned on them with the few-slice defaults (the engine path of
# `m3hl train --data IMG --labels PAINTED`, napari_m3hl.fewslice.loop), and the start model's and the fine-tuned
# model's Dice on the unpainted slices are printed with the time taken.
# Outputs (NIfTI) go to $OUT: the input volume and its truth, painted.nii.gz,
# segmentation.nii.gz (painted slices kept as painted) and prediction.nii.gz.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/demo}
PY=${PYTHON:-.venv/bin/python}
"$PY" -m napari_m3hl phantom --output "$OUT/input" --seed "${SEED:-100}" --overwrite
"$PY" -m napari_m3hl.demo --image "$OUT/input/phantom_${SEED:-100}.nii.gz" \
  --truth "$OUT/input/phantom_${SEED:-100}_labels.nii.gz" --out "$OUT" ${THREADS:+--threads "$THREADS"}
