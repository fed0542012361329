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


@pytest.fixture
def one_batch(monkeypatch):
    """``train()`` sees one fixed batch at every step: its batch maker is
    stubbed to hand out copies of the first labeled and unlabeled batch it
    makes (drawn once with a generator seeded 0, augmentation included), and
    torch runs deterministic algorithms. A run is then a fixed-batch overfit
    whose losses are the same on every run: a test asserts what gradient
    descent on one batch guarantees, not what a run happens to learn."""
    import torch

    from napari_m3hl.training import trainer

    real, made = trainer._make_batch, {}

    def same(samples, config, gen, device, memory_format=torch.contiguous_format):
        labeled = samples[0][1] is not None
        if labeled not in made:
            made[labeled] = real(samples, config, torch.Generator().manual_seed(0), device, memory_format)
        img, lab = made[labeled]
        return img.clone(), None if lab is None else lab.clone()

    monkeypatch.setattr(trainer, "_make_batch", same)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield made
    torch.use_deterministic_algorithms(before)


# --------------------------------------------------------------------- GUI


@pytest.fixture
def errors(monkeypatch) -> list[str]:
    """Messages passed to napari's show_error (the notification is not shown)."""
    from napari.utils import notifications

    shown: list[str] = []
    monkeypatch.setattr(notifications, "show_error", shown.append)
    monkeypatch.setattr(notifications, "show_warning", lambda msg: None)
    return shown


def _register_plugin() -> None:
    """The npe2 manifest, registered with npe2 when the package is not installed."""
    from gui_helpers import ROOT
    from npe2 import PluginManager, PluginManifest

    pm = PluginManager.instance()
    if "napari-m3hl" not in pm._manifests:
        pm.register(PluginManifest.from_file(ROOT / "napari.yaml"))


def _menu_action(menu_bar, *path: str):
    """The QAction at ``path`` (menu titles, then the entry) of a menu bar."""
    actions = menu_bar.actions()
    for k, text in enumerate(path):
        found = [a for a in actions if a.text().replace("&", "") == text]
        assert found, f"no menu entry {text!r} under {' ▸ '.join(path[:k]) or 'the menu bar'}"
        if k == len(path) - 1:
            return found[0]
        actions = found[0].menu().actions()


def _dock_widget(viewer, tmp_path):
    """Plugins ▸ Train M³HL through the manifest, set to train ``TINY`` runs in
    ``tmp_path/runs`` with previews at every step."""
    from gui_helpers import TINY

    _, widget = viewer.window.add_plugin_dock_widget("napari-m3hl", "Train M³HL")
    widget.run_panel.set_run_folder(tmp_path / "runs")
    widget.st.config_overrides = dict(TINY)
    widget.st.preview_every_s = 0.0
    widget.st.mix_preview_every_s = 0.0
    return widget


@pytest.fixture
def user_viewer(make_napari_viewer, tmp_path, qtbot):
    """Factory: a shown viewer as a user gets it, the sample opened through
    File ▸ Open Sample (when ``sample``), and the dock widget from the
    manifest (Plugins ▸ Train M³HL); the widget trains ``TINY`` runs in
    ``tmp_path/runs`` with previews at every step."""
    _register_plugin()
    made = []

    def factory(sample: bool = True):
        viewer = make_napari_viewer(show=True)
        if sample:
            _menu_action(viewer.window._qt_window.menuBar(), "File", "Open Sample",
                         "Synthetic cardiac MR phantom (M³HL)").trigger()
            qtbot.waitUntil(lambda: "phantom image" in viewer.layers, timeout=30_000)
        widget = _dock_widget(viewer, tmp_path)
        made.append(widget)
        return viewer, widget

    yield factory
    for w in made:
        w.cleanup(wait_ms=30_000)


@pytest.fixture
def make_widget(make_napari_viewer, tmp_path, qtbot):
    """Factory: a viewer (optionally with the tiny phantom) and the widget docked
    through the plugin manifest, as napari does it (the widget gets a proxy)."""
    _register_plugin()
    made = []

    def factory(phantom: bool = True, painted=(1, 3)):
        from napari_m3hl._napari._sample import phantom_layers

        viewer = make_napari_viewer()
        if phantom:
            for data, meta, kind in phantom_layers(shape=(6, 64, 64), painted=painted):
                getattr(viewer, f"add_{kind}")(data, **meta)
        widget = _dock_widget(viewer, tmp_path)
        made.append(widget)
        return viewer, widget

    yield factory
    for w in made:
        w.cleanup(wait_ms=30_000)
