"""Option types shared by several commands (declared once, reused)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

RunArg = Annotated[
    Path,
    typer.Argument(help="A run directory written by `mismatch measure`.", show_default=False),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the result as one JSON object instead of tables.")
]
EdgesOpt = Annotated[
    str | None,
    typer.Option(
        "--edges",
        help="Comma-separated bucket edges of p in [0, 1], ascending "
        "(default 0,1e-6,1e-5,1e-4,1e-3,1e-2,0.1,0.5,0.9,0.99,0.999,1).",
        show_default=False,
    ),
]
