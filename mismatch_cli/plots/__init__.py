"""Figures of one or several runs (matplotlib, headless): one module per figure.

Each figure module defines NAME, TITLE and `plot_<name>(runs)`; `FIGURES` lists them in the
order they are drawn. A new figure is a new module here plus one line in `_MODULES`. The
numbers drawn come from one streamed `aggregates.scan` per run (`data.RunData`: the report's
aggregates plus the figures' own streamed histograms and running sums), so a figure shows
what `report` prints; figures read the run directory only, never a model. `plan` says what
`mismatch plot` draws for its arguments (a diagnose directory becomes its variant runs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from .. import aggregates as G
from ..errors import MismatchError
from . import (
    bias,
    bound,
    corrections,
    diagnose,
    distribution,
    drift,
    position,
    sequence,
    sweep,
)
from .bias import plot_bias
from .bound import plot_bound
from .corrections import plot_corrections
from .data import PLOT_COLUMNS, RunData, load_runs, run_data
from .distribution import plot_distribution
from .sequence import cumulative_by_position, plot_sequence
from .style import DEFAULT_DPI, IMAGE_FORMATS, PALETTE, STYLE, check_formats, draw_title, plotted
from .sweep import plot_sweep

_MODULES = (bound, bias, sequence, distribution, sweep, corrections, drift, position, diagnose)
FIGURES: tuple[str, ...] = tuple(m.NAME for m in _MODULES)
# drawn when no figure is named; a module with DEFAULT = False only when asked for
DEFAULT_FIGURES: tuple[str, ...] = tuple(m.NAME for m in _MODULES if getattr(m, "DEFAULT", True))
PLOTTERS: dict[str, Callable[[Sequence[RunData]], Figure]] = {
    m.NAME: getattr(m, f"plot_{m.NAME}") for m in _MODULES
}
TITLES: dict[str, str] = {m.NAME: m.TITLE for m in _MODULES}
_MODULE_OF = {m.NAME: m for m in _MODULES}


def check_figures(figures: Sequence[str] | None) -> list[str]:
    """Validated figure names (DEFAULT_FIGURES when None or empty)."""
    if not figures:
        return list(DEFAULT_FIGURES)
    bad = [f for f in figures if f not in FIGURES]
    if bad:
        raise MismatchError(f"unknown figure {bad[0]!r}; choose from {', '.join(FIGURES)}")
    return [f for f in FIGURES if f in figures]


@dataclass(frozen=True)
class PlotPlan:
    """What `mismatch plot RUN...` draws: the runs, their labels, the figures, where."""

    runs: list[Path]
    out: Path
    labels: list[str] | None
    figures: list[str]  # checked names (the default figures when none were named)


def plan(
    runs: Sequence[str | Path],
    out: str | Path | None,
    labels: Sequence[str] | None = None,
    figures: Sequence[str] | None = None,
) -> PlotPlan:
    """The plan of `mismatch plot`: one path holding a diagnose.json is a diagnose directory,
    drawn as its variants' runs (labelled by variant) with the `diagnose` figure unless
    figures are named, into DIR/figures; one run draws into RUN/figures; several runs need
    `out`. Named figures are checked (the default ones when none are named: a figure that
    does not apply is skipped with a note). One-line errors for no runs, a damaged
    diagnose.json, unknown figure names."""
    from ..runs import diagnose_runs

    if not runs:
        raise MismatchError("no runs given: `mismatch plot RUN [RUN ...] --out DIR`")
    paths = [Path(r) for r in runs]
    lab = list(labels) if labels else None
    names = list(figures) if figures else None
    if len(paths) == 1 and (diag := diagnose_runs(paths[0])) is not None:
        out = out if out is not None else paths[0] / "figures"
        paths, lab = [Path(p) for p in diag[0]], lab or diag[1]
        names = names or ["diagnose"]
    checked = check_figures(names)
    if out is None:
        if len(paths) > 1:
            raise MismatchError("--out DIR is required with several runs")
        out = paths[0] / "figures"
    return PlotPlan(paths, Path(out), lab, checked)


def make_figures(
    run_paths: Sequence[str | Path],
    out_dir: str | Path,
    formats: Sequence[str] = ("png",),
    labels: Sequence[str] | None = None,
    *,
    figures: Sequence[str] | None = None,
    dpi: int = DEFAULT_DPI,
    edges: Sequence[float] | str | None = G.DEFAULT_EDGES,
    eps: float | None = None,
    notes: list[str] | None = None,
) -> list[Path]:
    """Draw the figures of one or several runs into out_dir as <figure>.<format>.

    `figures` None: every figure that applies to these runs (a module's optional
    `applies(runs)`, e.g. `drift` needs training steps, which measured runs never have).
    A figure that cannot be drawn (e.g. `sweep` on a run without a stored pruning grid, or
    one asked for by name that does not apply) is skipped with a line appended to `notes`.
    Returns the written paths.
    """
    from ..runs import check_writable_dir

    fmts = check_formats(formats)
    names = check_figures(figures)
    out = Path(out_dir)
    runs = load_runs(run_paths, labels, edges=edges, eps=eps)
    if figures is None:
        names = [n for n in names if getattr(_MODULE_OF[n], "applies", lambda _: True)(runs)]
    check_writable_dir(out)
    if {"sweep", "corrections"} <= set(names):  # the sweep from the corrections' pass
        for r in runs:
            r.cache["share_corrections"] = True
    written: list[Path] = []
    with plt.rc_context(STYLE):
        for name in names:
            try:
                fig = PLOTTERS[name](runs)
            except MismatchError as e:
                if notes is not None:
                    notes.append(f"{name}: skipped ({e})")
                continue
            except ImportError as e:
                if notes is not None:
                    notes.append(f"{name}: skipped ({e})")
                continue
            draw_title(fig, TITLES[name], runs)
            for fmt in fmts:
                path = out / f"{name}.{fmt}"
                try:
                    fig.savefig(path, dpi=dpi, format=fmt)
                except OSError as e:
                    plt.close(fig)
                    raise MismatchError(f"cannot write {path}: {e.strerror or e}") from e
                written.append(path)
            plt.close(fig)
    return written


def figure(name: str, runs: Sequence[RunData]) -> Figure:
    """One figure by name, styled and titled as make_figures draws it (not saved)."""
    with plt.rc_context(STYLE):
        fig = PLOTTERS[check_figures([name])[0]](runs)
        draw_title(fig, TITLES[name], runs)
    return fig


__all__ = [
    "DEFAULT_DPI",
    "DEFAULT_FIGURES",
    "FIGURES",
    "IMAGE_FORMATS",
    "PALETTE",
    "PLOTTERS",
    "PLOT_COLUMNS",
    "STYLE",
    "TITLES",
    "PlotPlan",
    "RunData",
    "check_figures",
    "check_formats",
    "cumulative_by_position",
    "figure",
    "load_runs",
    "make_figures",
    "plan",
    "plot_bias",
    "plot_bound",
    "plot_corrections",
    "plot_distribution",
    "plot_sequence",
    "plot_sweep",
    "plotted",
    "run_data",
]
