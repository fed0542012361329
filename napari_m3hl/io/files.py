"""Files on disk: atomic writes and NIfTI file names.

Every file the package writes (checkpoints, NIfTI label maps, session files,
``run.json``, checkpoint copies) goes through :func:`atomic_path`: it is
written under a temporary name beside its destination and renamed into place
only when complete, so a crash or a full disk never leaves a half-written file
where a finished one stood. The result has the ordinary mode of a new file
(``0o666`` minus the umask), not the private ``0o600`` of ``mkstemp``.
"""
from __future__ import annotations

import errno
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
def atomic_path(path: str | Path, suffix: str = ".tmp", replace: bool = True) -> Iterator[Path]:
    """A temporary file name beside ``path`` to write to; renamed onto ``path``
    when the ``with`` block ends without error, removed otherwise.

    ``suffix`` ends the temporary name (writers that choose a format by the
    name, such as ``nib.save``, need ``.nii.gz``). The parent folder is created.
    ``replace=False``: a file that appeared at ``path`` meanwhile (another
    command writing the same name) is kept and :class:`FileExistsError` raised
    (the temporary file is hard-linked into place, which fails on an existing name).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        os.chmod(tmp, _file_mode())
        yield Path(tmp)
        if replace:
            os.replace(tmp, path)
        else:
            _place_new(Path(tmp), path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _place_new(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` unless ``path`` exists (checked atomically where the disk has hard links)."""
    taken = FileExistsError(errno.EEXIST, "it was written meanwhile by another command (two runs into one output?); "
                            "it was kept. Pass --overwrite to replace it, or choose another output", str(path))
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise taken from None
    except OSError:  # no hard links on this disk
        if path.exists():
            raise taken from None
        os.replace(tmp, path)


def why_not_a_file(path: str | Path, what: str, hint: str) -> str | None:
    """None when ``path`` is a file that can be opened; else one line naming
    ``what`` (e.g. ``checkpoint``) and ``path``, why (missing, a folder, a
    symbolic link loop, a link to nothing, not a regular file), and ``hint``."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{what} {path} is a symbolic link loop (it leads back to itself); {hint}"
        if os.path.islink(path):
            return f"{what} {path} is a symbolic link to {os.readlink(path)}, which does not exist; {hint}"
        if exc.errno == errno.ENOENT:
            return f"{what} {path} does not exist (not found); {hint}"
        return f"{what} {path} cannot be opened ({exc.strerror}); {hint}"
    import stat

    if stat.S_ISDIR(st.st_mode):
        return f"{what} {path} is a folder, not a file; {hint}"
    if not stat.S_ISREG(st.st_mode):
        return f"{what} {path} is not a regular file; {hint}"
    return None


def probe_writable(folder: str | Path) -> None:
    """Create ``folder`` if needed and write and remove a temporary file in it;
    raises the ``OSError`` that a write there would meet."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".m3hl-write-test")
    os.close(fd)
    os.unlink(probe)


def same_path(a: str | Path, b: str | Path) -> bool:
    """``a`` and ``b`` name one file or folder: after symbolic links, as hard links
    (the same inode), or in another letter case on a case-insensitive disk."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return os.path.normcase(str(a.resolve())) == os.path.normcase(str(b.resolve()))
    except (OSError, RuntimeError):  # a symbolic link loop
        return False


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
