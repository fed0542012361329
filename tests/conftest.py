"""Shared pytest fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


def _shared_data_dir() -> Path:
    env = os.environ.get("M3HL_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data folder (``$M3HL_DATA`` or ``../shared/data`` beside the
    checkout) holding ``acdc/`` and ``la/``; skips the test when absent."""
    root = _shared_data_dir()
    if not (root / "acdc").is_dir() and not (root / "la").is_dir():
        pytest.skip(f"real data folder not found at '{root}' (set M3HL_DATA to a folder with acdc/ and la/)")
    return root
