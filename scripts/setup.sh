#!/usr/bin/env bash
# Set up a fresh machine: system libraries for Qt under Xvfb, a virtual
# environment in .venv with the CPU build of torch and the project (editable)
# with its GUI backend (PyQt6, napari's default binding) and test tools.
# Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# Qt 6's xcb platform plugin needs libxcb-cursor0 beside the Qt 5 set.
if command -v apt-get >/dev/null 2>&1 && { ! command -v Xvfb >/dev/null 2>&1 || ! ldconfig -p | grep -q libxcb-cursor.so.0; }; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 \
    libxcb-image0 libxcb-render-util0 libxcb-shape0 libxcb-cursor0 libxkbcommon-x11-0 libgl1 libegl1 libdbus-1-3 \
    libfontconfig1 >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
# The CPU wheel first (a bare 'torch' requirement could pull a multi-GB CUDA build);
# the project's own requirement is a range this version satisfies.
.venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | { grep -v "is ignored" || true; }
.venv/bin/python -m pip install -q -e ".[pyqt6,test]" 2>&1 | { grep -v "is ignored" || true; }
.venv/bin/python -c "import torch, napari, napari_m3hl; import qtpy; print('ready: torch', torch.__version__, '| napari', napari.__version__, '|', qtpy.API_NAME)"
