"""`mismatch sweep-threshold RUN`: the pruning trade-off of a stored run, and a recommended rho."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer

from ..options import JsonOpt, RunArg

_R = "Recommendation"

RuleOpt = Annotated[
    str,
    typer.Option(
        "--rule",
        metavar="min-p|absolute",
        help="Pruning rule: `min-p` (keep p >= rho * max p) or `absolute` (keep p >= rho).",
    ),
]
RhoOpt = Annotated[
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
        rich_help_panel=_R,
    ),
]
TargetOpt = Annotated[
    float | None,
    typer.Option(
        "--target-mismatch",
        help="Instead, recommend the smallest rho whose kept-token mean |delta| (nats) is at "
        "most this.",
        show_default=False,
        rich_help_panel=_R,
    ),
]
CsvOpt = Annotated[
    Path | None,
    typer.Option(
        "--csv", metavar="FILE", help="Also write the rows to FILE as CSV.", show_default=False
    ),
]


_V = "Validation (reruns the model)"
ValidateOpt = Annotated[
    bool,
    typer.Option(
        "--validate",
        help="Measure the recommended rho (or the single --rho given) for real: rerun the "
        "run's rollouts with vLLM min_p = rho, replay it on the training side, and print the "
        "observed kept-token mismatch next to the prediction. min-p rule only.",
        rich_help_panel=_V,
    ),
]
ValidateOutOpt = Annotated[
    Path | None,
    typer.Option(
        "--validate-out",
        help="Run directory of the validation run (default: <RUN>-validate-minp-<rho> beside RUN). "
        "A complete one is reused, an incomplete one resumed.",
        show_default=False,
        rich_help_panel=_V,
    ),
]


def sweep_threshold(
    run: RunArg,
    rule: RuleOpt = "min-p",
    rho: RhoOpt = None,
    max_bias: MaxBiasOpt = 0.05,
    target_mismatch: TargetOpt = None,
    json_out: JsonOpt = False,
    csv: CsvOpt = None,
    validate: ValidateOpt = False,
    validate_out: ValidateOutOpt = None,
) -> None:
    """Sweep the vocabulary-pruning threshold rho over a run and recommend one.

    For each rho: what pruning removes (sampled tokens outside the safe set, sequences
    holding one, their share of the run's total |delta|), the mismatch left on kept tokens
    (mean |delta|, signed mean delta, k3, mean |sum delta| per sequence; also relative to
    no pruning), and the cost: pruned mass m = 1 - P(safe set) per position (the total
    variation between p and its pruned version) and its sum per sequence, the bias bound
    of theory.md section 4 (mean and 95th percentile).

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
        try:
            sw.rows_frame(result).to_csv(csv, index=False)
        except OSError as e:
            from ..errors import MismatchError

            raise MismatchError(f"cannot write {csv}: {e.strerror or e}") from e
    validation = None
    if validate:
        validation = _validate(run, rule, result, validate_out)
        result["validation"] = validation
    if json_out:
        typer.echo(json.dumps(result, indent=2, allow_nan=False))
        return
    _print_table(result, csv)
    if validation is not None:
        _print_validation(validation)


def _validate(run: Path, rule: str, result: dict[str, Any], out: Path | None) -> dict[str, Any]:
    """Pick the rho to validate (a single --rho, else the recommendation) and measure it."""
    from rich.console import Console

    from ..errors import MismatchError
    from ..validate import validate

    if rule != "min-p":
        raise MismatchError(
            "--validate supports --rule min-p only (vLLM's min_p); the absolute rule has no engine-side equivalent"
        )
    rows = result["rows"]
    if len(rows) == 1:
        row = rows[0]
    else:
        rec = result["recommended"]["rho"]
        if rec is None:
            raise MismatchError("no recommended rho to validate; pass a single --rho")
        row = next(r for r in rows if r["rho"] == rec)
    return validate(Path(run), row["rho"], row, out, Console(stderr=True))


def _print_validation(v: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"Validation at rho = {v['rho']:g} (min-p): predicted vs observed",
        title_justify="left",
    )
    for h in ("quantity (kept tokens, nats)", "predicted", "observed"):
        t.add_column(h, justify="right")
    for k in v["predicted"]:
        t.add_row(k, _num(v["predicted"][k], ".5f"), _num(v["observed"][k], ".5f"))
    console = Console()
    console.print(t)
    console.print(
        f"safe-set disagreements: {v['safe_set_disagreements']} of {v['num_tokens']} sampled tokens "
        f"({_pct(v['safe_set_disagreement_rate'])}) were kept by vLLM but pruned by the training side. "
        f"Validation run: {v['run']}",
        highlight=False,
    )


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _num(x: Any, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def _x(x: Any) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.2f}"


def _print_table(result: dict[str, Any], csv: Path | None) -> None:
    """Two tables (what pruning removes and costs; what mismatch remains), recommended row
    highlighted in both, then the recommendation and its reason."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped: never squeeze numbers to fit 80 columns
        console = Console(width=max(console.width, 120))
    rec = result["recommended"]
    rows = [(result["baseline"], "none")] + [(r, f"{r['rho']:g}") for r in result["rows"]]

    def table(title: str, heads: list[str], cells: Any) -> Table:
        t = Table(title=title, title_justify="left")
        for h in heads:
            t.add_column(h, justify="right", no_wrap=True)
        for r, label in rows:
            hit = rec["rho"] is not None and r["rho"] == rec["rho"]
            style = "bold green" if hit else ("dim" if r["rho"] is None else None)
            t.add_row(label + (" *" if hit else ""), *cells(r), style=style)
        return t

    console.print(
        f"[bold]sweep-threshold[/] {result['run']}: rule {result['rule']}, "
        f"{result['num_tokens']} tokens, {result['num_sequences']} sequences",
        highlight=False,
    )
    console.print(
        table(
            "Removed by pruning, and the cost (m = pruned mass)",
            [
                "rho",
                "pruned\ntokens",
                "pruned\nseqs",
                "share of\nsum |Δ|",
                "mean m",
                "max m",
                "bias bound\nmean",
                "bias bound\np95",
            ],
            lambda r: [
                _pct(r["pruned_token_frac"]),
                _pct(r["pruned_seq_frac"]),
                _pct(r["pruned_abs_delta_share"]),
                _num(r["mean_pruned_mass"], ".2e"),
                _num(r["max_pruned_mass"], ".2e"),
                _num(r["seq_bias_bound_mean"], ".4f"),
                _num(r["seq_bias_bound_p95"], ".4f"),
            ],
        )
    )
    console.print(
        table(
            "Mismatch on kept tokens (nats; x = vs none)",
            ["rho", "mean |Δ|", "x", "mean Δ", "k3", "x", "mean |ΣΔ|\nper seq", "x"],
            lambda r: [
                _num(r["kept_mean_abs_delta"], ".4f"),
                _x(r["kept_mean_abs_delta_rel"]),
                _num(r["kept_mean_delta"], "+.4f"),
                _num(r["kept_k3"], ".2e"),
                _x(r["kept_k3_rel"]),
                _num(r["kept_seq_mean_abs_sum_delta"], ".4f"),
                _x(r["kept_seq_mean_abs_sum_delta_rel"]),
            ],
        )
    )
    if result["kept_set_disagreements"]:
        console.print(
            f"{result['kept_set_disagreements']} token(s) were removed by the training side's "
            "own truncation (infinite delta): pruned at every rho, excluded from means.",
            highlight=False,
        )
    if rec["rho"] is not None:
        console.print(
            f"[bold green]recommended rho = {rec['rho']:g}[/] (*): {rec['reason']}",
            highlight=False,
        )
    else:
        console.print(f"[bold yellow]no recommendation:[/] {rec['reason']}", highlight=False)
    if csv is not None:
        console.print(f"rows written to {csv}", highlight=False)
