"""`mismatch report`: the tables and verdict of a run, from its Parquet files only."""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..options import PANEL_ANALYSIS, PANEL_OUTPUT, EdgesOpt, EpsOpt, JsonOpt


class Side(str, enum.Enum):
    """Which probability buckets the tokens (and is the p of the envelope and the tail)."""

    train = "train"
    infer = "infer"


RunsArg = Annotated[
    list[Path],
    typer.Argument(
        help="A run directory (written by `mismatch measure` or `mismatch import`); with "
        "--html, several runs (compared on one page) or a diagnose directory.",
        show_default=False,
    ),
]


def report(
    runs: RunsArg,
    edges: EdgesOpt = None,
    by: Annotated[
        Side,
        typer.Option(
            help="Bucket by the training-side p (p_train, the default) or the inference side "
            "(p_infer); the envelope, fit and tail use the same p.",
            rich_help_panel=PANEL_ANALYSIS,
        ),
    ] = Side.train,
    tail: Annotated[
        float,
        typer.Option(
            help="Tail threshold: tokens with p < TAIL are the tail.",
            rich_help_panel=PANEL_ANALYSIS,
        ),
    ] = 0.1,
    eps: EpsOpt = None,
    group_by: Annotated[
        str | None,
        typer.Option(
            "--group-by",
            metavar="step|env",
            help="Also give the headline metrics per training step or environment "
            "(imported runs carry them); JSON key `groups`.",
            rich_help_panel=PANEL_ANALYSIS,
            show_default=False,
        ),
    ] = None,
    json_out: JsonOpt = False,
    html: Annotated[
        Path | None,
        typer.Option(
            "--html",
            help="Write the report as one self-contained HTML page to this file (tables, "
            "figures, verdict, the sweep and the corrections; no network needed to read it) "
            "instead of printing the tables; several runs are compared on one page.",
            rich_help_panel=PANEL_OUTPUT,
            show_default=False,
        ),
    ] = None,
    csv: Annotated[
        Path | None,
        typer.Option(
            "--csv",
            help="Also write each table as a CSV file into this directory.",
            rich_help_panel=PANEL_OUTPUT,
            show_default=False,
        ),
    ] = None,
) -> None:
    """Summarise a run: mismatch by token-probability bucket, the (1 - p) bound, tail bias,
    accumulation over sequences, the metrics RL frameworks log, and a verdict.

    Reads the run's tokens.parquet only (never loads a model). Conventions: delta =
    logp_infer - logp_train (nats); buckets are by the training-side probability p_train
    ([lo, hi), the last bucket includes 1); tokens with an infinite delta (kept-set
    disagreement) are counted and excluded from every mean.
    """
    from rich.console import Console

    from ..aggregates import parse_edges
    from ..analysis import GROUP_KEYS, analyze
    from ..errors import MismatchError

    edge_values = parse_edges(edges)  # bad --edges fail before any file is read
    if html is not None:
        from ..html_report import check_page_path, write_page

        if json_out or csv is not None or group_by is not None:
            raise MismatchError("--html writes the page only: drop --json, --csv and --group-by")
        if by is not Side.train or tail != 0.1:
            raise MismatchError(
                "the page buckets by p_train with the tail at 0.1: drop --by, --tail"
            )
        check_page_path(html)  # a bad --html fails before any run is read
        path, size = write_page(runs, html, edges=edge_values, eps=eps)
        Console(stderr=True).print(f"wrote {path} ({size / 1e6:.2f} MB)", highlight=False)
        return
    if len(runs) != 1:
        raise MismatchError(
            f"report reads one run, got {len(runs)}: compare runs on one page with "
            "`--html FILE`, or in the terminal with `mismatch compare`"
        )
    run = runs[0]
    if group_by is not None and group_by not in GROUP_KEYS:
        raise MismatchError(f"--group-by must be one of {', '.join(GROUP_KEYS)}, got {group_by!r}")
    # one streamed read of the run gives the report and, with --group-by, its groups
    result = analyze(run, edges=edge_values, by=by.value, tail=tail, eps=eps, group_by=group_by)
    err = Console(stderr=True)
    for w in result["warnings"]:
        if "infinite delta" not in w:  # the report itself states those
            err.print(f"[bold yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    if csv is not None:
        from ..results import write_report_csv

        paths = write_report_csv(result, csv)
        err.print(f"wrote {len(paths)} CSV files to {csv}", highlight=False)
    if json_out:
        sys.stdout.write(json.dumps(result, indent=2, allow_nan=False) + "\n")
        return
    from ..render import print_groups, print_report

    print_report(result, Console())
    if group_by is not None:
        print_groups(result)
