#!/usr/bin/env bash
# Run the whole test suite; GUI tests get a virtual X server from pytest-xvfb.
# The Qt binding is PyQt6 unless QT_API says otherwise (QT_API=pyqt5 runs the
# suite on PyQt5 where it is installed: .ci/run does both).
set -euo pipefail
cd "$(dirname "$0")/.."
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp/runtime-$(id -u)}
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
export QT_API=${QT_API:-pyqt6}
export PYTEST_QT_API=${PYTEST_QT_API:-$QT_API}
exec .venv/bin/python -m pytest -q -ra --durations=15 "$@"
