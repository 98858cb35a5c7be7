"""Readers of the rollouts RL frameworks save (`mismatch import`): one module per format.

- `toolkit.py`: what a format author uses: `Chunk` (the completions a reader yields),
  `ReadContext`, the Arrow / JSON Lines helpers, and the contract a format module fulfils,
  `toolkit.Format` (NAME, PATTERNS, PICKLE, SIDES, SIGN, `step_of(path)`, `read(path, ctx)`)
  with the optional hooks `SelectsFiles.select(files, warn, explicit)` and
  `WarnsOnSteps.warnings(steps)`; a test checks every format module against it;
- `ingest.py`: the import pipeline: discovery, --steps, streaming chunks into parts,
  scoring or rescoring, run.json's `source` block;
- `checks.py` (the temperature check), `pickles.py` (restricted unpicklers, a torch-free
  `torch.save` reader).

A new format is one module here plus one line in FORMATS (docs/architecture.md).
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
