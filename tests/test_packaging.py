"""Packaging guards: the engine stays free of Qt and napari, the package is
subpackages with a small face, no module imports itself round a circle, the
manifest is found where an installed package looks for it, and the version
has one source."""
from __future__ import annotations

import ast
import json
import os
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
mods = sorted(m.name for m in pkgutil.walk_packages(napari_m3hl.__path__, "napari_m3hl.")
              if not m.name.startswith("napari_m3hl._napari") and not m.name.endswith(".__main__"))
for m in mods:
    __import__(m)
print(json.dumps({"engine": mods, "loaded": sorted({k.split(".")[0] for k in sys.modules})}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"napari_m3hl.training.trainer", "napari_m3hl.cli.main", "napari_m3hl.inference.predictor"} <= set(res["engine"])
    leaked = sorted(set(res["loaded"]) & set(GUI_TOPS))
    assert not leaked, f"engine modules import GUI packages: {leaked}"


def test_manifest_lives_in_the_package_and_validates():
    npe2 = pytest.importorskip("npe2")
    inside = ROOT / "napari_m3hl" / "napari.yaml"
    assert inside.is_file() and not inside.is_symlink(), "the real manifest must live inside the package"
    manifest = npe2.PluginManifest.from_file(inside)
    assert manifest.name == "napari-m3hl"
    assert "Annotation" in [str(getattr(c, "value", c)) for c in manifest.categories]
    segment = manifest.contributions.menus["napari/layers/segment"]
    assert [m.command for m in segment] == ["napari-m3hl.train_widget"], "the widget belongs under Layers > Segment"
    root = ROOT / "napari.yaml"  # the design card's root path: a link (or, without symlinks, a copy)
    assert root.read_text() == inside.read_text()


def test_version_has_one_source():
    from importlib.metadata import version

    import napari_m3hl

    text = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text and 'path = "napari_m3hl/__init__.py"' in text
    assert version("napari-m3hl") == napari_m3hl.__version__


PACKAGE = ROOT / "napari_m3hl"
FACE = {"__init__", "__main__", "config", "errors", "labels", "runtime", "demo"}


def test_the_package_face_is_small_and_the_rest_lives_in_subpackages():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == FACE, f"modules directly under napari_m3hl/ besides its face: {sorted(top - FACE)}"
    for sub in (p for p in PACKAGE.rglob("*") if p.is_dir() and p.name != "__pycache__"):
        assert (sub / "__init__.py").is_file() or not any(sub.glob("*.py")), f"{sub} is not a package"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Package modules that ``path`` imports at run time (module level or inside a function);
    imports under ``if TYPE_CHECKING:`` are for annotations only and do not count."""
    tree = ast.parse(path.read_text())
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for n in ast.walk(node))
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in modules}


def test_no_module_imports_itself_round_a_circle():
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    rel = [p for p in files.values() if any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(ast.parse(p.read_text())))]
    assert not rel, f"relative imports (the package imports absolutely): {sorted(map(str, rel))}"
    graph = {m: _imports(p, modules) - {m} for m, p in files.items()}
    # a package's __init__ imported by its own modules is a cycle only when it imports them back
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_default_qt_binding_is_qt6():
    """napari deprecated PyQt5 (0.8) and greets a PyQt5 user with a notification;
    setup installs PyQt6 and scripts/test.sh selects it unless QT_API says otherwise."""
    if os.environ.get("QT_API", "").lower() == "pyqt5":
        pytest.skip("this is the PyQt5 pass (QT_API=pyqt5)")
    qtpy = pytest.importorskip("qtpy")
    assert qtpy.API_NAME == "PyQt6"
