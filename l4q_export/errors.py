"""Error types shared by every command.

A single `L4QInputError` lets the CLIs turn *any* bad-input condition (missing file, corrupt shard,
unsupported architecture, shape that does not fit a format, NaN weights) into one readable line and
exit code 2, while genuine bugs still surface with a traceback.
"""

from __future__ import annotations


class L4QInputError(ValueError):
    """The user's input cannot be processed; the message says what and how to fix it."""


class FidelityError(RuntimeError):
    """An artifact does not reproduce what training used (verify exits 1 on this)."""
