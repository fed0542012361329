"""Errors raised for bad user input.

Every error raised for something the user can fix is an :class:`M3HLInputError`
whose message names the file, layer or argument at fault and what to do.
"""
from __future__ import annotations


class M3HLInputError(ValueError):
    """Bad user input: a missing file, a wrong shape, an incompatible checkpoint."""


class PartlyWrittenError(Exception):
    """A command over several inputs met a bad one after writing the outputs of
    others: the message names the bad input and what was written (status 1,
    not 2, since something was written)."""
