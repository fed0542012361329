"""Files on disk: atomic writes and NIfTI file names.

Every file the package writes (checkpoints, NIfTI label maps, session files,
``run.json``, checkpoint copies) goes through :func:`atomic_path`: it is
written under a temporary name beside its destination and renamed into place
only when complete, so a crash or a full disk never leaves a half-written file
where a finished one stood. The result has the ordinary mode of a new file
(``0o666`` minus the umask), not the private ``0o600`` of ``mkstemp``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

NIFTI_SUFFIXES = (".nii", ".nii.gz")


# --------------------------------------------------------------------- atomic writes


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary file name beside ``path`` to write to; renamed onto ``path``
    when the ``with`` block ends without error, removed otherwise.

    ``suffix`` ends the temporary name (writers that choose a format by the
    name, such as ``nib.save``, need ``.nii.gz``). The parent folder is created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        os.chmod(tmp, _file_mode())
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_copy(src: str | Path, dst: str | Path) -> Path:
    """Copy the file ``src`` to ``dst`` atomically (contents only, not ``src``'s mode)."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


# --------------------------------------------------------------------- NIfTI names


def is_nifti_name(path: str | Path) -> bool:
    """True when the file name ends in ``.nii`` or ``.nii.gz`` (any case)."""
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def nifti_suffix(path: str | Path) -> str:
    """``.nii.gz`` for a compressed name (``.gz``), else ``.nii``."""
    return ".nii.gz" if Path(path).name.lower().endswith(".gz") else ".nii"


def stem(path: str | Path) -> str:
    """File name without ``.nii.gz`` / ``.nii`` / ``.h5`` (any case); other
    names lose their last suffix (:attr:`pathlib.Path.stem`)."""
    path = Path(path)
    name = path.name
    for suf in (".nii.gz", ".nii", ".h5"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return path.stem
