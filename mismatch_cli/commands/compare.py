"""`mismatch compare`: runs side by side, and how the log-probs moved between runs that
share rollouts."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..options import PANEL_OUTPUT, EdgesOpt, JsonOpt


def compare(
    runs: Annotated[
        list[Path],
        typer.Argument(
            help="Two or more run directories; the first is the reference.",
            metavar="RUN...",
            show_default=False,
        ),
    ],
    label: Annotated[
        list[str] | None,
        typer.Option(
            "--label",
            metavar="NAME",
            help="Name of each run, in order (repeat once per run; as in `mismatch plot`). "
            "Default: the run directory names.",
            show_default=False,
            rich_help_panel=PANEL_OUTPUT,
        ),
    ] = None,
    edges: EdgesOpt = None,
    reference: Annotated[
        Path | None,
        typer.Option(
            metavar="REF",
            help="A run over the same rollouts scored precisely (e.g. a diagnose directory's "
            "reference/): each run's two sides are measured against REF's logp_train, token "
            "by token: which side errs, their correlation, the gap against sqrt(err_infer^2 + "
            "err_train^2).",
            show_default=False,
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Compare runs side by side: mean |delta|, k3, p99 |delta|, tail share of |delta|, the
    eps estimate, the distribution-level lower bounds (TV, KL both ways) and each verdict, one
    column per run with its ratio to the first; mean |delta| by p_train bucket.

    When a run shares rollouts with the first (same seq_ids, positions and tokens: a
    `mismatch rescore` of it, or a `mismatch diagnose` variant), also how far each side's
    log-probs moved between the two, token by token, by bucket. Reads the runs' Parquet files
    only. `mismatch plot RUN RUN ...` draws the same runs overlaid.
    """
    from ..aggregates import parse_edges
    from ..compare import compare as compare_runs
    from ..render import print_compare

    result = compare_runs(runs, label, parse_edges(edges), reference=reference)
    if json_out:
        sys.stdout.write(json.dumps(result, indent=2, allow_nan=False) + "\n")
        return
    print_compare(result)
