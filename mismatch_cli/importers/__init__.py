"""Readers of the rollouts RL frameworks save (`mismatch import`): one module per format.

A format module defines
    NAME        the FORMAT argument of `mismatch import`
    PATTERNS    file-name globs searched for when a SOURCE is a folder
    PICKLE      True if its files are pickles (refused without --trust-pickle)
    SIDES       "both" (inference and trainer log-probs), "infer" (inference only: rescore)
                or "either" (depends on the file)
    SIGN        the framework's sign convention, one sentence (recorded in run.json)
    step_of(path) -> int | None           the step, from the path alone (for --steps)
    read(path, ctx) -> Iterator[Chunk]    the completions of one file, in chunks
and optionally `select(files, warn) -> files` (drop files discovery should not import) and
`warnings(ctx) -> list[str]` (format-specific caveats, e.g. staleness). `core` does the rest:
discovery, --steps, streaming chunks into parts, run.json's `source` block.

A new format is one module here plus one line in FORMATS.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import MismatchError

# FORMAT name -> module (imported only when used: pickle and torch readers stay lazy).
FORMATS: dict[str, str] = {
    "prime-rl": "prime_rl",
    "slime": "slime",
    "skyrl": "skyrl",
    "verl": "verl",
    "tokens": "tokens",
}


def get_format(name: str) -> ModuleType:
    """The reader module of FORMAT `name`; a one-line error naming the known formats."""
    if name not in FORMATS:
        raise MismatchError(f"unknown format {name!r}; choose from {', '.join(FORMATS)}")
    return importlib.import_module(f"{__name__}.{FORMATS[name]}")


__all__ = ["FORMATS", "get_format"]
