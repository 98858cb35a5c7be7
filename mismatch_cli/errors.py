"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class MismatchError(Exception):
    """A user-facing error: bad input, bad flag, unusable path. Printed without traceback."""

    exit_code = 2


class RunNotFoundError(MismatchError):
    """The path is not a run directory written by `mismatch measure`."""


class IncompleteRunError(MismatchError):
    """The run was interrupted; its tables are not final."""
