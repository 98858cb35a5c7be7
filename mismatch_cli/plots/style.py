"""Shared style of every figure: palette, rc settings, the title band, small helpers.

Every figure is readable on its own: a title naming the model, both engines and dtypes, the
sampling settings and the token count of each run; axes in nats; a legend. With several runs
each figure overlays them, one colour per run (Okabe-Ito, colour-blind safe). Drawn series
carry a gid ("bucket-mean:<label>", ...) so tests can read back what was plotted (`plotted`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from ..errors import MismatchError

if TYPE_CHECKING:
    from .data import RunData

IMAGE_FORMATS: tuple[str, ...] = ("png", "pdf", "svg")
DEFAULT_DPI = 200
# Okabe-Ito: distinguishable with every common colour-vision deficiency.
PALETTE: tuple[str, ...] = (
    "#0072B2",
    "#D55E00",
    "#009E73",
    "#CC79A7",
    "#E69F00",
    "#56B4E9",
    "#000000",
    "#F0E442",
)
STYLE: dict[str, Any] = {
    "font.size": 9.5,
    "axes.titlesize": 10.5,
    "axes.labelsize": 10,
    "legend.fontsize": 8.5,
    "figure.titlesize": 11.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "grid.linewidth": 0.6,
    "legend.frameon": False,
    "savefig.facecolor": "white",
    "figure.facecolor": "white",
}
NATS = "nats"


TITLE_IN = 0.42  # inches above the axes for the title
LINE_IN = 0.19  # inches per run-description line


def new_fig(n_runs: int, ncols: int = 1, width: float = 7.5, height: float = 5.2) -> Any:
    """A figure with a band at the top (title + one line per run) the layout keeps free."""
    top_in = TITLE_IN + LINE_IN * n_runs + 0.08
    fig = plt.figure(figsize=(width, height + top_in), layout="constrained")
    fig.get_layout_engine().set(rect=(0, 0, 1, height / (height + top_in)))
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def draw_title(fig: Figure, what: str, runs: Sequence[RunData]) -> None:
    """Title (what is shown), then one line per run: model, engines and dtypes, sampling,
    tokens; each in its run's colour when several runs are overlaid."""
    H = fig.get_figheight()
    fig.text(0.5, 1 - 0.1 / H, what, ha="center", va="top", fontsize=12, fontweight="bold")
    for i, r in enumerate(runs):
        line = r.describe() if len(runs) == 1 else f"{r.label}: {r.describe()}"
        fig.text(
            0.5,
            1 - (TITLE_IN + LINE_IN * i) / H,
            line,
            ha="center",
            va="top",
            fontsize=8.5,
            color="0.25" if len(runs) == 1 else r.color,
        )


def is_pow10(v: float) -> bool:
    e = math.log10(v)
    return abs(e - round(e)) < 1e-9


def series(ax: Any, gid: str) -> Any:
    """The Line2D drawn with this gid (for tests and callers that read plotted data)."""
    for line in ax.get_lines():
        if line.get_gid() == gid:
            return line
    return None


def plotted(fig: Figure, gid: str) -> np.ndarray | None:
    """The y data of the series drawn with `gid` on any axes of `fig` (None if absent)."""
    for ax in fig.axes:
        line = series(ax, gid)
        if line is not None:
            return np.asarray(line.get_ydata(), dtype=np.float64)
    return None


def check_formats(formats: Sequence[str]) -> list[str]:
    """Validated, de-duplicated output formats (MismatchError on an unknown one)."""
    out: list[str] = []
    for f in formats:
        for part in str(f).split(","):
            part = part.strip().lower().lstrip(".")
            if not part:
                continue
            if part not in IMAGE_FORMATS:
                raise MismatchError(
                    f"unknown --format {part!r}; use one of {', '.join(IMAGE_FORMATS)}"
                )
            if part not in out:
                out.append(part)
    if not out:
        raise MismatchError(f"--format needs a value: one of {', '.join(IMAGE_FORMATS)}")
    return out
