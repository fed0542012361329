"""Command line: ``m3hl train | predict | evaluate | suggest | phantom | measure`` (also
``python -m napari_m3hl``): :func:`main` runs one command and turns every
failure into one line.

=======================  ===============================================
module                   holds
=======================  ===============================================
:mod:`napari_m3hl.cli.parser`       the argument parser (:func:`build_parser`)
:mod:`napari_m3hl.cli.train`        ``m3hl train`` on a data set, the progress bar
:mod:`napari_m3hl.cli.fewslice`     ``m3hl train --data IMAGE --labels PAINTED``
:mod:`napari_m3hl.cli.commands`     ``m3hl predict | evaluate | suggest | phantom``
:mod:`napari_m3hl.cli.measure`      ``m3hl measure`` (volumes, EF, LV mass)
:mod:`napari_m3hl.cli.checks`       checks before anything is read or written
=======================  ===============================================
"""
from __future__ import annotations

import errno
import signal
import sys
import threading
from typing import Sequence

from napari_m3hl.cli.commands import cmd_evaluate, cmd_phantom, cmd_predict, cmd_suggest
from napari_m3hl.cli.measure import cmd_measure
from napari_m3hl.cli.parser import build_parser
from napari_m3hl.cli.train import cmd_train
from napari_m3hl.errors import M3HLInputError, PartlyWrittenError

__all__ = [
    "main",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every failure ends as one line on stderr (status 2: bad
    input, 1: the command failed, 130: interrupted, 143: SIGTERM). ``M3HL_DEBUG=1`` shows
    the traceback of an unexpected error."""
    import os

    args = build_parser().parse_args(argv)
    name = f"m3hl {args.command}"
    previous = _catch_sigterm()
    try:
        return {"train": cmd_train, "predict": cmd_predict, "evaluate": cmd_evaluate, "suggest": cmd_suggest,
                "phantom": cmd_phantom, "measure": cmd_measure}[args.command](args)
    except M3HLInputError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except PartlyWrittenError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{name}: terminated (SIGTERM); files being written were removed, finished ones kept", file=sys.stderr)
        return 143
    except MemoryError:
        print(f"{name}: error: out of memory; use smaller inputs, a smaller --batch-size or --patch-size, "
              "or close other programs", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        if exc.errno == errno.ENOSPC:
            print(f"{name}: error: the disk is full (writing{where or ' an output'}); free some space or choose an "
                  "output on another disk. Files are written whole or not at all, so earlier ones are intact",
                  file=sys.stderr)
            return 1
        print(f"{name}: error: cannot access{where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a bug: one line, the traceback on request
        if os.environ.get("M3HL_DEBUG"):
            raise
        print(f"{name}: internal error: {exc.__class__.__name__}: {exc} (set M3HL_DEBUG=1 for the traceback and "
              "please report it)", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so ``finally`` blocks remove
    temporary files (:func:`napari_m3hl.files.atomic_path`) before the exit."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated


def _catch_sigterm():
    """Turn SIGTERM into :class:`Terminated` (main thread only); returns the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _on_sigterm)
