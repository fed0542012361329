"""Sample sets read lazily from one HDF5 file per sample, with an LRU cache
(the base of :class:`~napari_m3hl.data.acdc.ACDCSlices` and
:class:`~napari_m3hl.data.la.LACases`), and the ``.list`` files that name them.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from napari_m3hl.errors import M3HLInputError
from napari_m3hl.data.types import PathLike


def read_list(path: PathLike) -> list[str]:
    """Non-empty, stripped lines of a ``.list`` file."""
    path = Path(path)
    if not path.is_file():
        raise M3HLInputError(f"List file not found: '{path}'. Point to the data folder that contains it.")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


class CachedH5Set:
    """Samples ``names`` under ``root``, one HDF5 file each (:meth:`path`),
    read on first access by :meth:`read` and kept for the last ``cache_size``
    samples (``functools.lru_cache`` per set; 0 keeps none).

    ``__getitem__(i)`` -> ``(image, label)``, or ``(image, None)`` when
    ``labeled`` is False (the label is then not even read). Subclasses define
    :meth:`path`, :meth:`read` and the message :meth:`missing_message` for
    names whose file is absent (checked at construction).
    """

    def __init__(self, root: PathLike, names: Sequence[str], labeled: bool, cache_size: int) -> None:
        self.root = Path(root)
        self.names = list(names)
        self.labeled = bool(labeled)
        self._load = functools.lru_cache(maxsize=max(0, int(cache_size)))(self._read_name)
        missing = [n for n in self.names if not self.path(n).is_file()]
        if missing:
            raise M3HLInputError(self.missing_message(missing))

    def path(self, name: str) -> Path:  # pragma: no cover - abstract
        raise NotImplementedError

    def read(self, path: Path, need_label: bool) -> tuple[np.ndarray, Optional[np.ndarray]]:  # pragma: no cover
        raise NotImplementedError

    def missing_message(self, missing: list[str]) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read_name(self, name: str) -> Any:
        return self.read(self.path(name), self.labeled)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
        return self._load(self.names[i])
