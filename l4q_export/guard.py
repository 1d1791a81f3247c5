"""Output-path rules shared by every writer: never write into an input, never change a path's kind.

Inputs (a checkpoint directory, its base model) are registered as *protected* while a command runs --
`load_checkpoint` and `BaseWeights` do it, so no exporter can forget to. `AtomicFile`/`AtomicDir` consult the
set before they create anything, and the CLIs call `check_output` before any work, so a bad `--out` is found
before a two-hour training run rather than when saving it.  Registration is scoped to a `session()` (one per
CLI invocation) so that library users and in-process test runs do not accumulate stale protections.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import L4QInputError

_protected: list[Path] | None = None


@contextlib.contextmanager
def session() -> Iterator[None]:
    """One command's lifetime: inputs registered inside are protected until it ends."""
    global _protected
    saved, _protected = _protected, []
    try:
        yield
    finally:
        _protected = saved


def protect(path: Path) -> None:
    """Mark an input (file or directory) as never to be written, replaced or written into."""
    if _protected is not None:
        _protected.append(Path(path).resolve())


def _related(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_not_input(path: Path, what: str, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse a destination that is, contains or lies inside a protected input (or one of `inputs`)."""
    dest = Path(path).resolve()
    for inp in [*(_protected or []), *(Path(p).resolve() for p in inputs)]:
        if _related(dest, inp):
            raise L4QInputError(
                f"{what} {path} is, contains or lies inside the input {inp}; choose an output path outside it"
            )


def check_output(path: Path, what: str, kind: str, inputs: tuple[Path, ...] = ()) -> None:
    """Everything that can be known about an output path before work starts.

    kind is "file" or "dir": an existing path of the other kind is refused (a file never becomes a directory),
    and the nearest existing ancestor must be a writable directory.
    """
    p = Path(path)
    check_not_input(p, what, inputs)
    if kind == "dir" and p.exists() and not p.is_dir():
        raise L4QInputError(f"{what} {p} exists and is not a directory; remove it or choose another path")
    if kind == "file" and p.is_dir():
        raise L4QInputError(f"{what} {p} is a directory; give a file path")
    probe = p if (kind == "dir" and p.is_dir()) else p.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise L4QInputError(f"{what} {p}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise L4QInputError(f"{what} {p}: directory {probe} is not writable")
