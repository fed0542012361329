"""Errors raised for bad user input.

Every error raised for something the user can fix is an :class:`M3HLInputError`
whose message names the file, layer or argument at fault and what to do.
"""
from __future__ import annotations


class M3HLInputError(ValueError):
    """Bad user input: a missing file, a wrong shape, an incompatible checkpoint."""
