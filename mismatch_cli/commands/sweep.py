"""`mismatch sweep-threshold RUN`: the pruning trade-off of a stored run, and a recommended rho."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ..options import PANEL_RECOMMENDATION, PANEL_VALIDATION, JsonOpt, RunArg

RuleOpt = Annotated[
    str,
    typer.Option(
        "--rule",
        metavar="min-p|absolute",
        help="Pruning rule: `min-p` (keep p >= rho * max p) or `absolute` (keep p >= rho).",
    ),
]
RhoValuesOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--rho",
        metavar="RHO[,RHO...]",
        help="Thresholds to evaluate, comma-separated and/or repeated "
        "(`--rho 1e-4,1e-3 --rho 0.01`). Each must be in (0, 1) and on the run's stored "
        "grid (1-2-5 steps from 1e-8 to 0.5), where pruned mass is exact. Default: the grid.",
        show_default=False,
    ),
]
MaxBiasOpt = Annotated[
    float,
    typer.Option(
        "--max-bias",
        help="Recommend the largest rho whose MEAN per-sequence bias bound "
        "(sum over the sequence of pruned mass) is at most this.",
        rich_help_panel=PANEL_RECOMMENDATION,
    ),
]
TargetOpt = Annotated[
    float | None,
    typer.Option(
        "--target-mismatch",
        help="Instead, recommend the smallest rho whose kept-token mean |delta| (nats) is at "
        "most this.",
        show_default=False,
        rich_help_panel=PANEL_RECOMMENDATION,
    ),
]
RowsCsvOpt = Annotated[
    Path | None,
    typer.Option(
        "--csv", metavar="FILE", help="Also write the rows to FILE as CSV.", show_default=False
    ),
]


ValidateOpt = Annotated[
    bool,
    typer.Option(
        "--validate",
        help="Measure the recommended rho (or the single --rho given) for real: rerun the "
        "run's rollouts with vLLM min_p = rho, replay it on the training side, and print the "
        "observed kept-token mismatch next to the prediction. min-p rule only.",
        rich_help_panel=PANEL_VALIDATION,
    ),
]
ValidateOutOpt = Annotated[
    Path | None,
    typer.Option(
        "--validate-out",
        help="Run directory of the validation run (default: <RUN>-validate-minp-<rho> beside RUN). "
        "A complete one is reused, an incomplete one resumed, if it was made with min_p = rho "
        "and the run's prompts, model and seed (else refused).",
        show_default=False,
        rich_help_panel=PANEL_VALIDATION,
    ),
]


def sweep_threshold(
    run: RunArg,
    rule: RuleOpt = "min-p",
    rho: RhoValuesOpt = None,
    max_bias: MaxBiasOpt = 0.05,
    target_mismatch: TargetOpt = None,
    json_out: JsonOpt = False,
    csv: RowsCsvOpt = None,
    validate: ValidateOpt = False,
    validate_out: ValidateOutOpt = None,
) -> None:
    """Sweep the vocabulary-pruning threshold rho over a run and recommend one.

    For each rho: what pruning removes (sampled tokens outside the safe set, sequences
    holding one, their share of the run's total |delta|), the mismatch left on kept tokens
    (mean |delta|, signed mean delta, k3, mean |sum delta| per sequence; also relative to
    no pruning), and the cost: pruned mass m = 1 - P(safe set) per position (the total
    variation between p and its pruned version) and its sum per sequence, the bias bound
    of docs/theory.md §6 "The bias bound" (mean and 95th percentile).

    Conventions: delta = logp_infer - logp_train (nats). The safe set and the pruned mass
    are computed on the training-side sampling distribution (after temperature and
    truncation), with the same float32 comparison as `mismatch_cli.dvp`. Tokens the
    training side's own truncation removed (infinite delta) are outside every safe set:
    counted as pruned at every rho, excluded from means.
    """
    from .. import sweep as sw

    rhos = sw.parse_rhos(rho) if rho is not None else None
    result = sw.sweep(run, rule=rule, rhos=rhos, max_bias=max_bias, target_mismatch=target_mismatch)
    if csv is not None:
        from ..results import write_csv

        write_csv(sw.sweep_frame(result), csv)
    validation = None
    if validate:
        validation = _validate(run, rule, result, validate_out)
        result["validation"] = validation
    if json_out:
        typer.echo(json.dumps(result, indent=2, allow_nan=False))
        return
    from ..render import print_sweep, print_validation

    print_sweep(result)
    if csv is not None:
        typer.echo(f"rows written to {csv}")
    if validation is not None:
        print_validation(validation)


def _validate(run: Path, rule: str, result: dict[str, Any], out: Path | None) -> dict[str, Any]:
    """Pick the rho to validate (a single --rho, else the recommendation) and measure it."""
    from rich.console import Console

    from ..validate import validate, validation_row
    from .common import measure_with_progress

    row = validation_row(result, rule)
    err = Console(stderr=True)

    def measure(cfg: Any, path: Path, resume: bool) -> Path:
        return measure_with_progress(cfg, path, resume=resume, overwrite=False, console=err)

    return validate(
        Path(run), row["rho"], row, out, measure, lambda m: err.print(m, highlight=False)
    )
