"""Packaging guards: the engine stays free of Qt and napari, the manifest is
found where an installed package looks for it, and the version has one source."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUI_TOPS = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "superqt", "magicgui", "vispy")


def test_importing_every_engine_module_pulls_in_no_qt_or_napari():
    code = """
import json, pkgutil, sys
import napari_m3hl
mods = sorted(m.name for m in pkgutil.iter_modules(napari_m3hl.__path__, "napari_m3hl.") if not m.name.endswith(("._napari", ".__main__")))
for m in mods:
    __import__(m)
print(json.dumps({"engine": mods, "loaded": sorted({k.split(".")[0] for k in sys.modules})}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"napari_m3hl.trainer", "napari_m3hl.cli", "napari_m3hl.predictor"} <= set(res["engine"])
    leaked = sorted(set(res["loaded"]) & set(GUI_TOPS))
    assert not leaked, f"engine modules import GUI packages: {leaked}"


def test_manifest_lives_in_the_package_and_validates():
    npe2 = pytest.importorskip("npe2")
    inside = ROOT / "napari_m3hl" / "napari.yaml"
    assert inside.is_file() and not inside.is_symlink(), "the real manifest must live inside the package"
    manifest = npe2.PluginManifest.from_file(inside)
    assert manifest.name == "napari-m3hl"
    assert "Annotation" in [str(getattr(c, "value", c)) for c in manifest.categories]
    root = ROOT / "napari.yaml"  # the design card's root path: a link (or, without symlinks, a copy)
    assert root.read_text() == inside.read_text()


def test_version_has_one_source():
    from importlib.metadata import version

    import napari_m3hl

    text = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text and 'path = "napari_m3hl/__init__.py"' in text
    assert version("napari-m3hl") == napari_m3hl.__version__
