"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class MismatchError(Exception):
    """A user-facing error: bad input, bad flag, unusable path. Printed without traceback."""

    exit_code = 2


class RunNotFoundError(MismatchError):
    """The path is not a run directory written by `mismatch measure`."""


class IncompleteRunError(MismatchError):
    """The run was interrupted; its tables are not final."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none): what a
    one-line `error:` shows of a library's multi-line message."""
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__
