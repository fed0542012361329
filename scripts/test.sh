#!/usr/bin/env bash
# Run the whole test suite; GUI tests get a virtual X server from pytest-xvfb.
set -euo pipefail
cd "$(dirname "$0")/.."
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp/runtime-$(id -u)}
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
exec .venv/bin/python -m pytest -q -ra "$@"
