"""The one error boundary of every CLI: expected failures become one stderr line and an exit code.

Kept apart from `errors` (the exception types every layer raises) because it runs each command inside a
`guard.session()`, and `guard` itself raises `L4QInputError`.
"""

from __future__ import annotations

from .errors import FidelityError, L4QInputError


def debug_option():
    """`--debug` for every CLI: show the traceback instead of the one-line message."""
    import click

    return click.Option(["--debug"], is_flag=True, default=False, help="Show a full traceback on errors (for bug reports).")


def boundary(fn):
    """The one error boundary of a CLI callback: expected failures become one stderr line and an exit code.

    L4QInputError and OS-level input errors (permission denied, unreadable file) exit 2; FidelityError exits 1.
    Anything else is a bug and keeps its traceback.  The command runs inside a `guard.session()`, so the
    inputs it opens are protected from its own outputs.  The wrapped callback takes a `debug` keyword.
    """
    import functools
    import sys

    import click

    from .guard import session

    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, **kw):
        with session():
            try:
                return fn(*args, **kw)
            except (L4QInputError, OSError, UnicodeDecodeError) as e:
                if debug:
                    raise
                msg = " ".join(str(e).split()) or type(e).__name__
                click.echo(f"error: {msg}", err=True)
                sys.exit(2)
            except FidelityError as e:
                if debug:
                    raise
                click.echo(f"refused: {' '.join(str(e).split())}", err=True)
                sys.exit(1)

    return wrapper


def guarded_command(fn):
    """Decorator for `@click.command` callbacks: adds `--debug` and the error boundary."""
    import click

    return click.option("--debug", is_flag=True, help="Show a full traceback on errors (for bug reports).")(boundary(fn))
