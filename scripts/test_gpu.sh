#!/usr/bin/env bash
# The non-GUI test suite on a CUDA machine, one command:
#   bash scripts/test_gpu.sh [JUNIT_XML] [extra pytest arguments]
# Every test that trains or predicts with device "auto" (the default) runs on the GPU; the
# CUDA-only tests (tests/test_gpu_paths.py: the captured step against the eager one, the
# device-held data; tests/test_augment.py on CUDA) run instead of skipping. GUI tests
# (tests/test_napari_*.py) are left out: a GPU machine usually has no napari/Qt. Writes a
# junit XML (default: $OUT/junit-gpu.xml when $OUT is set, else runs/junit-gpu.xml) and
# prints the slowest tests. Uses pytest-xdist when installed (-n WORKERS, default 8).
# Needs torch with CUDA and the engine's dependencies (pip install -e . pytest; the GPU machine of
# docs/reproducing.md lacked nibabel: bring its wheel); it stops first, naming what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
XML=${1:-${OUT:-runs}/junit-gpu.xml}
shift || true
"$PY" - <<'PYCHECK'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("scripts/test_gpu.sh: no CUDA device visible to torch " + torch.__version__
             + "; on a CPU machine run bash scripts/test.sh")
import importlib.util
missing = [m for m in ("nibabel", "h5py", "scipy", "skimage", "yaml", "pytest") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit("scripts/test_gpu.sh: missing Python packages: " + ", ".join(missing) + " (pip install them first)")
print("torch", torch.__version__, "on", torch.cuda.get_device_name(), flush=True)
PYCHECK
mkdir -p "$(dirname "$XML")"
FILES=$(ls tests/test_*.py | grep -v '/test_napari_')
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n "${WORKERS:-8}"); fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec "$PY" -m pytest -q -ra -p no:cacheprovider -p no:xvfb --durations=20 "${XDIST[@]}" \
    --junitxml="$XML" $FILES "$@"
