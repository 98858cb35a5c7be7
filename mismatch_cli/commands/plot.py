"""`mismatch plot`: the figures of one run, or of several overlaid, from their Parquet files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..options import PANEL_ANALYSIS, EdgesOpt, EpsOpt

PANEL_FIGURES = "Figures"


def plot(
    runs: Annotated[
        list[Path] | None,
        typer.Argument(
            help="One or more run directories (`mismatch measure`, `mismatch import`); several are "
            "overlaid in every figure. A `mismatch diagnose` directory stands for its variant "
            "runs (labelled by variant) and draws the `diagnose` figure.",
            metavar="RUN...",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Directory for the figures (created if needed). Default with one run: "
            "RUN/figures.",
            show_default=False,
            rich_help_panel=PANEL_FIGURES,
        ),
    ] = None,
    fmt: Annotated[
        list[str] | None,
        typer.Option(
            "--format",
            metavar="png|pdf|svg",
            help="Output format; repeat for several (`--format png --format pdf`). Default: png.",
            show_default=False,
            rich_help_panel=PANEL_FIGURES,
        ),
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(
            "--label",
            metavar="NAME",
            help="Legend name of each run, in order (repeat once per run). Default: the "
            "run directory names.",
            show_default=False,
            rich_help_panel=PANEL_FIGURES,
        ),
    ] = None,
    figure: Annotated[
        list[str] | None,
        typer.Option(
            "--figure",
            metavar="bound|bias|sequence|distribution|sweep|corrections|drift|position|diagnose",
            help="Draw only these figures (repeatable). Default: all that apply to the runs "
            "(`position` only when named); `diagnose` (one bar per run) for a diagnose directory.",
            show_default=False,
            rich_help_panel=PANEL_FIGURES,
        ),
    ] = None,
    dpi: Annotated[
        int,
        typer.Option(
            help="Resolution of PNG output.", rich_help_panel=PANEL_FIGURES, min=50, max=1200
        ),
    ] = 200,
    edges: EdgesOpt = None,
    eps: EpsOpt = None,
    show_table: Annotated[
        bool,
        typer.Option(
            "--show-table",
            help="Also print the report of each run.",
            rich_help_panel=PANEL_ANALYSIS,
        ),
    ] = False,
) -> None:
    """Draw the figures of one or several runs: bound (|delta| against 1 - p with the
    envelopes), bias (signed mean delta per p_train bucket), sequence (accumulation),
    distribution (delta and importance ratios with caps 2 / 3 / 5), sweep (pruning
    trade-off), corrections (what each mismatch correction removes and leaves), drift (the
    mismatch over training steps, for imported runs with several steps), position (mean
    |delta| and k3 by position in the completion, when named); diagnose (k3 and
    mean |delta| per run, for a `mismatch diagnose` directory). delta = logp_infer -
    logp_train (nats); p = p_train, the training side.
    Reads the runs' Parquet files only (never loads a model).
    """
    from rich.console import Console

    from ..aggregates import parse_edges
    from ..errors import MismatchError
    from ..plots import check_formats, make_figures, plan

    formats = check_formats(fmt or ["png"])  # bad flags fail before any file is read
    todo = plan(runs or [], out, label, figure)
    edge_values = parse_edges(edges)
    if eps is not None and not (eps >= 0):
        raise MismatchError(f"--eps must be >= 0, got {eps}")
    console, err = Console(), Console(stderr=True)
    notes: list[str] = []
    paths = make_figures(
        todo.runs,
        todo.out,
        formats,
        todo.labels,
        figures=todo.figures,
        dpi=dpi,
        edges=edge_values,
        eps=eps,
        notes=notes,
    )
    for n in notes:
        err.print(f"[bold yellow]note:[/] {n}", highlight=False, soft_wrap=True)
    if show_table:
        from ..analysis import analyze
        from ..render import print_report

        for r in todo.runs:
            print_report(analyze(r, edges=edge_values, eps=eps), console)
    console.print(f"wrote {len(paths)} file(s) to {todo.out}:", highlight=False)
    for p in paths:
        console.print(f"  {p}", highlight=False)
