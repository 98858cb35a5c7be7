"""`mismatch corrections RUN`: every published mismatch correction side by side on a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..correction_rules import KINDS, methods_of_kind
from ..options import PANEL_ANALYSIS, EdgesOpt, JsonOpt, RunArg

_BY_KIND = "; ".join(f"{k}: {', '.join(methods_of_kind(k))}" for k in KINDS)
MethodOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--method",
        metavar="NAME[,NAME...]",
        help=f"Only these methods (comma-separated and/or repeated), by what they do: "
        f"{_BY_KIND}. Default: all.",
        show_default=False,
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="NAME.KEY=VALUE",
        help="Override a bound (repeatable, or comma-separated): keys C, cap (> 0), lo (>= 0), "
        "hi (> 0, >= lo), tau (> 0), rho (DVP), e.g. `--set icepop.lo=0.8 --set tis-token.C=3`.",
        show_default=False,
        rich_help_panel=PANEL_ANALYSIS,
    ),
]
DvpRhoOpt = Annotated[
    float | None,
    typer.Option(
        "--rho",
        help="Pruning threshold of the DVP rows (a value of the run's stored grid). Default: "
        "the recommendation of `sweep-threshold` (largest rho with mean bias bound <= 0.05).",
        show_default=False,
        rich_help_panel=PANEL_ANALYSIS,
    ),
]
MethodsCsvOpt = Annotated[
    Path | None,
    typer.Option(
        "--csv", metavar="FILE", help="Also write the method rows to FILE as CSV.",
        show_default=False,
    ),
]  # fmt: skip


def corrections(
    run: RunArg,
    method: MethodOpt = None,
    set_: SetOpt = None,
    rho: DvpRhoOpt = None,
    edges: EdgesOpt = None,
    json_out: JsonOpt = False,
    csv: MethodsCsvOpt = None,
) -> None:
    """Apply every published training-inference mismatch correction to a run's tokens and
    compare what each one masks, clips, leaves behind and costs.

    Methods: token TIS (w = min(r, C)), sequence TIS, IcePop (w = r inside [lo, hi], else
    masked), sequence masks on exp(S), exp(G) or mean k3, the token veto, GSPO's clip,
    CISPO's cap, NeMo-RL's mean exp(|delta|) mask, and dynamic vocabulary pruning (DVP) at
    the sweep's recommended rho. Per method: tokens and sequences masked, weights clipped,
    the weights and their effective sample size, the mismatch LEFT on the tokens that still
    carry gradient (mean |delta|, k3, p99 and max |delta|, share with r outside [0.5, 2]),
    the cost (tokens and |delta| removed, clipped weight mass, DVP's bias bound, the
    advantage-weighted signal removed when the run has advantages), per probability bucket
    and per step. The verdict names the Pareto front of (removed, k3 left).

    Conventions: delta = logp_infer - logp_train (nats), r = exp(-delta), S = sum_t(-delta_t)
    and G = S / T per sequence, recomputed from the token rows. A token with an infinite
    delta is masked by every method. Formulas and framework sources: docs/theory.md.
    """
    from .. import correction_rules as R
    from .. import corrections as C

    names = R.check_methods(method)
    overrides = R.parse_sets(set_)
    result = C.corrections(run, names, overrides, rho=rho, edges=edges)
    if csv is not None:
        from ..results import write_csv

        write_csv(C.methods_frame(result), csv)
    if json_out:
        typer.echo(json.dumps(result, indent=2, allow_nan=False))
        return
    from ..render import print_corrections

    print_corrections(result)
    if csv is not None:
        typer.echo(f"rows written to {csv}")
