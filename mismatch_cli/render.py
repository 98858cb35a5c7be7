"""The rich tables a person reads in the terminal: one `print_<command>` per result dict
(`print_report`, `print_sweep`, `print_validation`, `print_run_summary`, `print_import`,
`print_groups`, `print_corrections`, `print_compare`, `print_diagnose`, `print_history`).

Nothing here computes a statistic: every number comes from a result dict and becomes text
through `formatting` (the one formatter, shared with the library's verdicts). Progress bars
live in `progress`, CSV files in `results`. Only `commands/` imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from .formatting import DASH, bucket_label, edge, fmt, params_text, pct, ratio_x, times
from .metrics import METRIC_ROWS
from .runs import RunMeta


def _table(title: str, caption: str | None = None) -> Table:
    return Table(
        title=title,
        caption=caption,
        box=box.SIMPLE_HEAVY,
        title_style="bold",
        title_justify="left",
        caption_justify="left",
        header_style="bold cyan",
        pad_edge=False,
    )


def _side(result: dict[str, Any]) -> str:
    return "p_train" if result.get("by", "train") == "train" else "p_infer"


def header(result: dict[str, Any]) -> str:
    """One line: model, engines, dtypes, sampling, token counts (for titles and tables)."""
    run = result.get("run") or {}
    bits = []
    if run.get("model"):
        bits.append(str(run["model"]))
    if run.get("infer_engine"):
        infer = " ".join(filter(None, (run["infer_engine"], run.get("infer_dtype"))))
        train = " ".join(
            filter(None, (run.get("train_engine") or "transformers", run.get("train_dtype")))
        )
        bits.append(f"{infer} vs {train}")
    if run.get("temperature") is not None:
        bits.append(
            f"T={run['temperature']:g} top_p={run.get('top_p')} top_k={run.get('top_k')} "
            f"min_p={run.get('min_p')}"
        )
    bits.append(f"{result['num_tokens']:,} tokens, {result['num_sequences']:,} sequences")
    return " · ".join(bits)


def _label(r: dict[str, Any], last: bool) -> str:
    return bucket_label(r["lo"], r["hi"], last)


def bucket_tables(result: dict[str, Any]) -> tuple[Table, Table, Table]:
    """The bucket table, in three narrow parts: counts and signed mean, the |delta|
    distribution, and |delta| against the (1 - p) bound."""
    side = _side(result)
    b = result["buckets"]
    last = len(b) - 1

    def new(title: str, caption: str | None, cols: tuple[str, ...]) -> Table:
        t = _table(title, caption)
        t.add_column(side, justify="right", no_wrap=True)
        for c in cols:
            t.add_column(c, justify="right", no_wrap=True)
        return t

    t1 = new(
        f"Mismatch by {side} bucket (delta = logp_infer - logp_train, nats)",
        "buckets are [lo, hi), the last includes hi; Σ|δ| = the bucket's share of the run's "
        "total |delta|; se = standard error of the mean, z = mean / se; – = empty bucket",
        ("tokens", "share", "Σ|δ|", "mean δ", "se", "z", "inf δ"),
    )
    t2 = new(
        f"|delta| by {side} bucket (nats)",
        None,
        ("mean", "p50", "p90", "p99", "max"),
    )
    eps = result.get("eps")
    t3 = new(
        f"|delta| against the (1 - p) bound, eps = {fmt(eps)} ({result.get('eps_estimator')})",
        "|δ|/(1-p) = mean |delta| / mean (1 - p); 2ε(1-p) and exact = the envelopes at the "
        "bucket's mean (1 - p); above = share of tokens over the exact envelope at their own "
        "p (above 1st: over 2ε(1-p))",
        ("mean 1-p", "|δ|/(1-p)", "2ε(1-p)", "exact", "above", "above 1st"),
    )
    for i, r in enumerate(b):
        lab = _label(r, i == last)
        empty = not r["count"]
        z = (
            r["mean_delta"] / r["se_delta"]
            if r["mean_delta"] is not None and r["se_delta"]
            else None
        )
        t1.add_row(
            lab,
            f"{r['count']:,}",
            pct(r["share"]),
            DASH if empty else pct(r["share_abs_delta"]),
            fmt(r["mean_delta"], 2, sign=True),
            fmt(r["se_delta"], 2),
            fmt(z, 2, sign=True),
            f"{r['num_infinite']:,}" if r["num_infinite"] else "",
        )
        t2.add_row(
            lab,
            fmt(r["mean_abs_delta"], 2),
            fmt(r["p50_abs_delta"], 2),
            fmt(r["p90_abs_delta"], 2),
            fmt(r["p99_abs_delta"], 2),
            fmt(r["max_abs_delta"], 2),
        )
        t3.add_row(
            lab,
            fmt(r["mean_one_minus_p"], 2),
            fmt(r["abs_delta_per_one_minus_p"], 2),
            fmt(r["envelope_first_order"], 2),
            fmt(r["envelope_exact"], 2),
            pct(r["frac_above_envelope"]),
            pct(r["frac_above_first_order"]),
        )
    return t1, t2, t3


def bound_table(result: dict[str, Any]) -> Table:
    """eps (used, estimated, needed), the fraction above each envelope, the slope fit."""
    env, fit = result["envelope"], result["fit"]
    t = _table("The bound  |delta| <= f(1 - p; eps)")
    t.add_column("quantity", no_wrap=True)
    t.add_column("value", justify="right", no_wrap=True)
    t.add_column("note", style="dim")
    q = result.get("eps_hat_quantiles") or {}
    rows = [
        ("eps used", fmt(result["eps"]), result["eps_estimator"]),
        ("eps_hat estimate", fmt(result["eps_hat"]), "q0.99 of per-position eps_hat"),
        (
            "eps_hat p50 / p90 / max",
            f"{fmt(q.get('p50'))} / {fmt(q.get('p90'))} / {fmt(q.get('max'))}",
            "each is a lower bound on its position's eps",
        ),
        ("eps to cover 99% of tokens", fmt(result["eps_needed_q99"]), "inverse of the exact bound"),
        ("above 2 eps (1 - p)", pct(env["first_order"]["frac_above"]), "first order"),
        ("above exact envelope", pct(env["exact"]["frac_above"]), "log(1 + (1-p)(e^(2eps) - 1))"),
        ("above (e^(2eps) - 1)(1 - p)", pct(env["weak"]["frac_above"]), "linear upper bound"),
        ("above 2 eps", pct(env["two_eps"]["frac_above"]), "holds for any p"),
        ("fit |δ| = slope (1 - p)", fmt(fit["slope"]), "least squares through the origin"),
        ("fit R^2", fmt(fit["r2"]), "centred; can be negative"),
    ]
    for r in rows:
        t.add_row(*r)
    return t


def tail_table(result: dict[str, Any]) -> Table:
    """Tail against head: shares of tokens and of |delta|, signed mean and its test."""
    tl = result["tail"]
    side = _side(result)
    thr = f"{tl['threshold']:g}"
    t = _table(
        f"Tail bias: tokens with p = {side} < {thr} against the rest",
        "Σ|δ| = share of total |delta|; z = mean / se, p two-sided (normal); z seq clusters "
        "tokens by sequence",
    )
    for col in ("", "tokens", "share", "Σ|δ|", "mean δ", "se", "z", "p", "z seq"):
        t.add_column(col, justify="right", no_wrap=True)
    h = tl["head"]
    n = max(result["num_finite"], 1)
    abs_tail = tl["abs_delta_share"]
    t.add_row(
        f"p < {thr}",
        f"{tl['n']:,}",
        pct(tl["token_share"]),
        pct(abs_tail),
        fmt(tl["mean_delta"], 2, sign=True),
        fmt(tl["se"], 2),
        fmt(tl["z"], 2),
        fmt(tl["p_value"], 2),
        fmt(tl["z_seq"], 2),
    )
    t.add_row(
        f"p >= {thr}",
        f"{h['n']:,}",
        pct(h["n"] / n),
        pct(1 - abs_tail) if abs_tail is not None else DASH,
        fmt(h["mean_delta"], 2, sign=True),
        fmt(h["se"], 2),
        fmt(h["z"], 2),
        fmt(h["p_value"], 2),
        "",
    )
    t.add_row(
        "tail - head",
        "",
        "",
        "",
        fmt(tl["diff"], 2, sign=True),
        fmt(tl["se_diff"], 2),
        fmt(tl["z_diff"], 2),
        fmt(tl["p_value_diff"], 2),
        "",
    )
    return t


def accumulation_table(result: dict[str, Any]) -> Table:
    """Mean sum delta per length bin, with the regressions in the caption."""
    acc = result["accumulation"]
    vl, vx = acc["vs_length"], acc["vs_sum_one_minus_p"]
    t = _table(
        "Accumulation over a sequence: sum_t delta by completion length",
        f"{acc['num_sequences']:,} sequences without an infinite delta.  sum δ vs length: "
        f"slope {fmt(vl['slope'], sign=True)} nats/token, corr {fmt(vl['corr'])};  "
        f"vs sum (1 - p): slope {fmt(vx['slope'], sign=True)}, corr {fmt(vx['corr'])}",
    )
    for col in ("length", "sequences", "mean length", "mean sum δ", "se", "std sum δ"):
        t.add_column(col, justify="right", no_wrap=True)
    bins = acc["length_bins"]
    for i, r in enumerate(bins):
        close = "]" if i == len(bins) - 1 else ")"
        t.add_row(
            f"[{r['lo']:g}, {r['hi']:g}{close}",
            f"{r['count']:,}",
            fmt(r["mean_length"]),
            fmt(r["mean_sum_delta"], sign=True),
            fmt(r["se_sum_delta"], 2),
            fmt(r["std_sum_delta"]),
        )
    return t


def metrics_table(result: dict[str, Any]) -> Table:
    """The metrics RL frameworks log, under their usual names."""
    m = result["metrics"]
    t = _table("Metrics RL frameworks log (finite tokens; sequences without an infinite delta)")
    t.add_column("metric", no_wrap=True)
    t.add_column("value", justify="right", no_wrap=True)
    t.add_column("reference", style="dim")
    for key, label, note in METRIC_ROWS:
        if key in m:
            t.add_row(label, fmt(m[key], 4), note)
    caps = sorted(
        {k.rsplit("_", 1)[1] for k in m if k.startswith("frac_token_above_cap_")}, key=float
    )
    for c in caps:
        t.add_row(
            f"ratio > {c}: tokens / sequences",
            f"{pct(m[f'frac_token_above_cap_{c}'])} / {pct(m[f'frac_seq_above_cap_{c}'])}",
            "token IS caps 2-5" if c == caps[0] else "",
        )
    return t


def print_report(result: dict[str, Any], console: Console | None = None) -> None:
    """Print every table of an analyze() result, then the verdict paragraph."""
    console = console or Console()
    console.print(f"[bold]mismatch report[/]  {header(result)}", highlight=False)
    if result.get("run"):
        console.print(f"[dim]{result['run']['path']}[/]", highlight=False)
    if result["num_infinite"]:
        console.print(
            f"[yellow]{result['num_infinite']:,} token(s) "
            f"({pct(result['frac_infinite'])}) have an infinite delta (kept-set disagreement) "
            f"in {result['num_sequences_infinite']:,} sequence(s): counted, excluded from "
            "every statistic[/]",
            highlight=False,
        )
    if result.get("num_outside_edges"):
        console.print(
            f"[yellow]{result['num_outside_edges']:,} token(s) fall outside the bucket edges[/]"
        )
    for t in (*bucket_tables(result), bound_table(result), tail_table(result)):
        console.print(t)
    for t in (accumulation_table(result),):
        console.print(t)
    console.print(metrics_table(result))
    if (pos := position_table(result)) is not None:
        console.print(pos)
    if (dist := distribution_table(result)) is not None:
        console.print(dist)
    console.print(Panel(result["verdict"], title="verdict", title_align="left", expand=True))


# ----------------------------------------------------------------------------- CSV


# ----------------------------------------------------------------------------- measure


def print_run_summary(
    console: Console, run_path: Path, meta: RunMeta, result: dict[str, Any]
) -> None:
    """The headline numbers of a new run, taken from its report (no second read of the run)."""
    m = result["metrics"]
    cfg = meta.config
    infer = meta.infer.get("engine", cfg.get("infer_engine"))
    t = Table(
        title=f"mismatch: {meta.model_name}  ({infer} "
        f"{cfg.get('infer_dtype')} vs transformers {cfg.get('train_dtype')})"
    )
    t.add_column("quantity")
    t.add_column("value", justify="right")
    rows = [
        ("sequences", f"{result['num_sequences']:,}"),
        ("tokens", f"{result['num_tokens']:,}"),
        ("tokens with an infinite delta", f"{result['num_infinite']:,}"),
        ("mean |delta| (nats)", fmt(m["mean_abs_delta"], 4)),
        ("max |delta| (nats)", fmt(m["max_abs_delta"], 4)),
        ("k1 = signed mean delta (nats)", fmt(m["k1"], 4, sign=True)),
        ("k3 KL(q||p)", fmt(m["k3"], 4)),
        ("run", str(run_path)),
    ]
    for r in rows:
        t.add_row(*r)
    console.print(t)


# ----------------------------------------------------------------------------- sweep


def print_sweep(result: dict[str, Any], console: Console | None = None) -> None:
    """Two tables of a `sweep.sweep` result (what pruning removes and costs; what mismatch
    remains), the recommended row highlighted in both, then the recommendation."""
    console = console or _wide_console()
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
        f"{result['num_tokens']:,} tokens, {result['num_sequences']:,} sequences",
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
                pct(r["pruned_token_frac"]),
                pct(r["pruned_seq_frac"]),
                pct(r["pruned_abs_delta_share"]),
                fmt(r["mean_pruned_mass"]),
                fmt(r["max_pruned_mass"]),
                fmt(r["seq_bias_bound_mean"], 4),
                fmt(r["seq_bias_bound_p95"], 4),
            ],
        )
    )
    tail_heads = {
        "kept_p99_abs_delta": "p99 |Δ|",
        "kept_max_abs_delta": "max |Δ|",
        "kept_frac_ratio_outside_0.5_2": "r outside\n[0.5, 2]",
    }
    tail_keys = [k for k in tail_heads if k in result["baseline"]]
    console.print(
        table(
            "Mismatch on kept tokens (nats; x = relative to no pruning)",
            ["rho", "mean |Δ|", "x", "mean Δ", "k3", "x", "mean |ΣΔ|\nper seq", "x"]
            + [tail_heads[k] for k in tail_keys],
            lambda r: (
                [
                    fmt(r["kept_mean_abs_delta"], 4),
                    times(r["kept_mean_abs_delta_rel"]),
                    fmt(r["kept_mean_delta"], 3, sign=True),
                    fmt(r["kept_k3"]),
                    times(r["kept_k3_rel"]),
                    fmt(r["kept_seq_mean_abs_sum_delta"], 4),
                    times(r["kept_seq_mean_abs_sum_delta_rel"]),
                ]
                + [pct(r[k]) if k.startswith("kept_frac") else fmt(r[k], 3) for k in tail_keys]
            ),
        )
    )
    if result["num_infinite"]:
        console.print(
            f"{result['num_infinite']:,} token(s) have an infinite delta (the training side's "
            "own truncation removed them): pruned at every rho, excluded from means.",
            highlight=False,
        )
    if rec["rho"] is not None:
        console.print(
            f"[bold green]recommended rho = {rec['rho']:g}[/] (*): {rec['reason']}",
            highlight=False,
        )
    else:
        console.print(f"[bold yellow]no recommendation:[/] {rec['reason']}", highlight=False)


def print_validation(v: dict[str, Any], console: Console | None = None) -> None:
    """The prediction of the sweep next to the validation run's measured numbers."""
    console = console or _wide_console()
    t = Table(
        title=f"Validation at rho = {v['rho']:g} (min-p): predicted vs observed",
        title_justify="left",
    )
    for h in ("quantity (kept tokens, nats)", "predicted", "observed"):
        t.add_column(h, justify="right")
    for k in v["predicted"]:
        t.add_row(k, fmt(v["predicted"][k], 5), fmt(v["observed"][k], 5))
    console.print(t)
    console.print(
        f"{v['num_infinite']:,} of {v['num_tokens']:,} sampled tokens ({pct(v['frac_infinite'])}) "
        "have an infinite delta: kept by vLLM's min-p but pruned by the training side's. "
        f"Validation run: {v['run']}",
        highlight=False,
    )


def _wide_console() -> Console:
    """stdout; when piped, wide enough that numbers are never squeezed to fit 80 columns."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 120))
    return console


# ----------------------------------------------------------------------------- import


def print_import(result: dict[str, Any], console: Console | None = None) -> None:
    """What `mismatch import` wrote: format, mode, counts, steps; then the next command."""
    console = console or Console()
    s = result.get("summary") or {}
    t = _table(f"mismatch import: {result['format']} ({result['mode']})")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    steps = result.get("steps") or []
    rows = [
        ("files", f"{result['num_files']:,}"),
        ("steps", _steps_text(steps)),
        ("completions", f"{result['num_sequences']:,}"),
        ("tokens (model-generated, imported)", f"{result['num_tokens']:,}"),
        ("masked completion tokens (not imported)", f"{result['num_dropped_tokens']:,}"),
        ("model tokens with a null log-prob", f"{result.get('num_null_tokens', 0):,}"),
        *_value_rows(result.get("value_checks") or {}),
        ("tokens with an infinite delta", f"{s.get('num_infinite', 0):,}"),
        ("mean |delta| (nats)", fmt(s.get("mean_abs_delta"), 4)),
        ("mean delta (nats)", fmt(s.get("mean_delta"), 4, sign=True)),
        ("run", str(result["run"])),
    ]
    for r in rows:
        t.add_row(*r)
    console.print(t)
    by = " --group-by step" if len(steps) > 1 else ""
    console.print(f"next: mismatch report {result['run']}{by}", highlight=False)


def _value_rows(checks: dict[str, Any]) -> list[tuple[str, str]]:
    """The import's counted value problems, one row each where there are any."""
    rows = [
        (f"model tokens with logp_{side} above 0", f"{n:,}")
        for side, n in (checks.get("num_positive_logp") or {}).items()
        if n
    ]
    if checks.get("num_neginf_logp_infer"):
        rows.append(("model tokens with logp_infer = -inf", f"{checks['num_neginf_logp_infer']:,}"))
    return rows


def _steps_text(steps: list[int]) -> str:
    if not steps:
        return DASH
    if len(steps) <= 6:
        return ", ".join(str(s) for s in steps)
    return f"{len(steps)} steps, {steps[0]} to {steps[-1]}"


def _headline_rows(title: str, result: dict[str, Any], key: str, rows: list[dict]) -> Table:
    """The headline metrics of groups of tokens, one row each (`--group-by`, position)."""
    side = _side(result)
    t = _table(
        title,
        caption=f"tail = tokens with {side} < {result['tail']['threshold']:g}; "
        "r = exp(-delta), the token importance ratio",
    )
    for h in (key, "tokens", "seqs", "mean |δ|", "mean δ", "k3", "tail |δ| share",
              "r ∉ [0.5, 2]"):  # fmt: skip
        t.add_column(h, justify="right", no_wrap=True)
    for g in rows:
        t.add_row(
            str(g[key]),
            f"{g['num_tokens']:,}",
            f"{g['num_sequences']:,}",
            fmt(g["mean_abs_delta"]),
            fmt(g["mean_delta"], sign=True),
            fmt(g["k3"]),
            pct(g["tail_abs_delta_share"]),
            pct(g["frac_ratio_outside_0.5_2"]),
        )
    return t


def groups_table(result: dict[str, Any]) -> Table:
    """`report --group-by`: the headline metrics of each step / env."""
    key = result["group_by"]
    return _headline_rows(f"Per {key}", result, key, result["groups"])


def position_table(result: dict[str, Any]) -> Table | None:
    """`report`: the headline metrics by position in the completion (the buckets that hold
    tokens; `--json` has them all). None for a table without positions."""
    rows = [r for r in result.get("by_position") or [] if r["num_tokens"]]
    if not rows:
        return None
    t = _table(
        "Mismatch by position in the completion",
        caption=f"pos = tokens into the completion; tail = tokens with {_side(result)} < "
        f"{result['tail']['threshold']:g}",
    )
    for h in ("pos", "tokens", "mean |δ|", "mean δ", "k3", "tail |δ| share"):
        t.add_column(h, justify="right", no_wrap=True)
    for r in rows:
        t.add_row(
            r["position"],
            f"{r['num_tokens']:,}",
            fmt(r["mean_abs_delta"]),
            fmt(r["mean_delta"], sign=True),
            fmt(r["k3"]),
            pct(r["tail_abs_delta_share"]),
        )
    return t


def print_groups(result: dict[str, Any], console: Console | None = None) -> None:
    """The `report --group-by` table (wide enough when piped)."""
    (console or _wide_console()).print(groups_table(result))


# ----------------------------------------------------------------------------- corrections


def print_corrections(result: dict[str, Any], console: Console | None = None) -> None:
    """Tables of a `corrections.corrections` result, sorted by the mismatch left (k3): what
    each method removes and costs, the mismatch and weights left, where it bites (per
    p_train bucket), per step when the run has steps; then the verdict. Pareto rows: *."""
    console = console or _wide_console()
    front = set(result["pareto"])
    live = [r for r in result["methods"] if r["skipped"] is None]
    live.sort(
        key=lambda r: (r["left_k3"] is None, r["left_k3"] or 0.0, r["removed_token_share"] or 0.0)
    )
    k0 = result["all_tokens"]["k3"]
    has_adv = result["has_advantage"]

    def table(title: str, heads: list[str], cells: Any, caption: str | None = None) -> Table:
        t = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
        t.add_column("method", no_wrap=True, min_width=18)
        for h in heads:
            t.add_column(h, justify="right", no_wrap=True)
        for r in live:
            hit = r["name"] in front
            t.add_row(
                r["name"] + (" *" if hit else ""), *cells(r), style="bold green" if hit else None
            )
        return t

    console.print(
        f"[bold]corrections[/] {result['run']}: {result['num_tokens']:,} tokens, "
        f"{result['num_sequences']:,} sequences"
        + (
            f", {result['num_infinite']:,} with an infinite delta" if result["num_infinite"] else ""
        ),
        highlight=False,
    )
    for w in result.get("warnings") or []:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    console.print(
        table(
            "What each method removes and what it costs (sorted by k3 left; * = Pareto front)",
            [
                "bounds",
                "tokens\nmasked",
                "seqs\nmasked",
                "removed\ntokens",
                "removed\nΣ|Δ|",
                "bias\nbound",
            ]
            + (["removed\n|A| signal"] if has_adv else []),
            lambda r: (
                [
                    params_text(r["params"]),
                    pct(r["tokens_masked"]),
                    pct(r["sequences_masked"]),
                    pct(r["removed_token_share"]),
                    pct(r["removed_abs_delta_share"]),
                    fmt(r["bias_bound"], 4),
                ]
                + ([pct(r["removed_advantage_share"])] if has_adv else [])
            ),
            "removed = share of the finite tokens (of their Σ|delta|) the method drops; tokens "
            "masked also counts the infinite-delta tokens every method drops; bias bound: "
            "DVP's mean per-sequence Σ_t m(c_t)",
        )
    )
    console.print(
        table(
            "Mismatch left on the tokens that still carry gradient (nats)",
            ["mean |Δ|", "k3", "x none", "p99 |Δ|", "max |Δ|", "r outside\n[0.5, 2]"],
            lambda r: [
                fmt(r["left_mean_abs_delta"], 4),
                fmt(r["left_k3"]),
                times(r["left_k3"] / k0 if r["left_k3"] is not None and k0 else None),
                fmt(r["left_p99_abs_delta"]),
                fmt(r["left_max_abs_delta"]),
                pct(r["left_frac_ratio_outside_0.5_2"]),
            ],
        )
    )
    console.print(
        table(
            "Weights on the unmasked tokens",
            [
                "weights\nclipped",
                "clipped\nmass/seq",
                "mean",
                "std",
                "max",
                "ESS\ntoken",
                "ESS\nseq",
            ],
            lambda r: [
                pct(r["tokens_clipped"]),
                fmt(r["clipped_mass_per_seq"]),
                fmt(r["weight_mean"]),
                fmt(r["weight_std"]),
                fmt(r["weight_max"]),
                fmt(r["ess_token"]),
                fmt(r["ess_seq"]),
            ],
            "clipped mass = Σ_t |raw weight - weight| per sequence, mean over sequences; "
            "ESS = (Σw)² / (n Σw²) over unmasked tokens (sequences: each one's mean weight)",
        )
    )
    if live:
        buckets = live[0]["by_bucket"]
        last = len(buckets) - 1
        t = Table(
            title="Where it bites: share of tokens masked or clipped, by p_train bucket",
            title_justify="left",
            caption="columns: bucket lower edge lo, the bucket is [lo, next lo) (the last "
            f"includes {edge(buckets[last]['hi'])}); – = empty bucket",
            caption_justify="left",
        )
        t.add_column("method", no_wrap=True, min_width=16)
        for b in buckets:
            t.add_column(edge(b["lo"]), justify="right", no_wrap=True)
        t.add_row("tokens", *(f"{b['num_tokens']:,}" for b in buckets), style="dim")
        for r in live:
            t.add_row(
                r["name"],
                *(
                    DASH if not b["num_tokens"] else pct(b["masked"] + b["clipped"])
                    for b in r["by_bucket"]
                ),
            )
        console.print(t)
    steps = result.get("steps")
    if steps and live:
        pick = (
            sorted({round(i * (len(steps) - 1) / 9) for i in range(10)})
            if len(steps) > 10
            else range(len(steps))
        )
        t = Table(
            title="Per training step: mean |Δ| of all finite tokens, share of tokens masked"
            + (f" ({len(pick)} of {len(steps)} steps; --json has all)" if len(steps) > 10 else ""),
            title_justify="left",
        )
        t.add_column("step", no_wrap=True, min_width=16)
        for i in pick:
            t.add_column(str(steps[i]["step"]), justify="right", no_wrap=True)
        t.add_row("mean |Δ|", *(fmt(steps[i]["mean_abs_delta"]) for i in pick), style="dim")
        for r in live:
            t.add_row(r["name"], *(pct(r["by_step"][i]["masked"]) for i in pick))
        console.print(t)
    for r in result["methods"]:
        if r["skipped"] is not None:
            console.print(f"[yellow]{r['name']}: skipped[/] ({r['skipped']})", highlight=False)
    console.print(Panel(result["verdict"], title="verdict", title_align="left", expand=True))


# ----------------------------------------------------------------------------- rescore, compare, diagnose
# (distribution-level table of `report`, `compare` and `diagnose`)

_COARSE_LABELS = {
    "tv_coarse": "TV",
    "kl_qp_coarse": "KL(q‖p)",
    "kl_pq_coarse": "KL(p‖q)",
}


def distribution_table(result: dict[str, Any]) -> Table | None:
    """Distribution-level mismatch by bucket: mean and p99 of TV and of both KLs on the
    partition {inference top-K + sampled token, rest} (lower bounds). None if not stored."""
    dist = result.get("distribution_level")
    if not dist:
        return None
    cols = dist["columns"]
    rows = dist["buckets"]
    kl = [c for c in cols if c != "tv_coarse"]
    n_inf = [sum(r.get(f"{c}_num_infinite") or 0 for c in kl) for r in rows]
    t = _table(
        f"Distribution-level mismatch by {_side(result)} bucket: lower bounds on the full TV / KL",
        "on the partition {inference top-K + sampled token, everything else}; q = inference, "
        "p = training; by the data-processing inequality each is <= its full-vocabulary value. "
        "TV, KL = means over the bucket's tokens"
        + (
            "; inf = positions with an infinite KL (kept sets differ), left out"
            if any(n_inf)
            else ""
        ),
    )
    t.add_column(_side(result), justify="right", no_wrap=True)
    t.add_column("n", justify="right", no_wrap=True)
    for c in cols:
        t.add_column(_COARSE_LABELS[c], justify="right", no_wrap=True)
        t.add_column("p99", justify="right", no_wrap=True)
    if any(n_inf):
        t.add_column("inf", justify="right", no_wrap=True)
    for i, r in enumerate(rows):
        cells = [fmt(r[f"{c}_{k}"], 2) for c in cols for k in ("mean", "p99")]
        t.add_row(
            _label(r, i == len(rows) - 1),
            f"{r['count']:,}",
            *cells,
            *([f"{n_inf[i]:,}" if n_inf[i] else ""] if any(n_inf) else []),
        )
    ov = dist["overall"]
    t.add_row(
        "all",
        f"{max(s['count'] + s['num_infinite'] for s in ov.values()):,}",
        *[fmt(ov[c][k], 2) for c in cols for k in ("mean", "p99")],
        *([f"{sum(n_inf):,}"] if any(n_inf) else []),
        style="bold",
    )
    return t


def _headline_cell(key: str, v: Any) -> str:
    return pct(v) if key == "tail_abs_delta_share" else fmt(v, 3)


def print_compare(result: dict[str, Any], console: Console | None = None) -> None:
    """The tables of a `compare` result: headline metrics (with ratios to the first run),
    mean |delta| by bucket, per-token movement between runs sharing rollouts, verdicts."""
    console = console or _wide_console()
    runs = result["runs"]
    labels = [r["label"] for r in runs]
    ratios = {x["label"]: x for x in result["ratios"]}
    t = _table(
        "Runs side by side (delta = logp_infer - logp_train, nats)",
        f"(0.43x) = ratio to the first run, {result['reference']}; tail = tokens with p_train "
        f"< {runs[0]['tail_threshold']:g}; TV / KL: distribution-level lower bounds",
    )
    t.add_column("", no_wrap=True)
    for lab in labels:
        t.add_column(lab, justify="right")
    t.add_row("inference", *[r["inference"] for r in runs], style="dim")
    t.add_row("training", *[r["training"] for r in runs], style="dim")
    t.add_row("tokens", *[f"{r['num_tokens']:,}" for r in runs])
    for key, name in result["headline"]:
        if all(r.get(key) is None for r in runs):
            continue
        cells = [_headline_cell(key, runs[0].get(key))]
        for r in runs[1:]:
            ratio = ratios[r["label"]].get(key)
            cells.append(
                _headline_cell(key, r.get(key))
                + (f" ({times(ratio)})" if ratio is not None else "")
            )
        t.add_row(name, *cells)
    console.print(t)

    b = _table("mean |delta| by p_train bucket (nats)", "– = empty bucket")
    b.add_column("p_train", justify="right", no_wrap=True)
    for lab in labels:
        b.add_column(lab, justify="right")
    rows = result["bucket_means"]
    for i, r in enumerate(rows):
        b.add_row(_label(r, i == len(rows) - 1), *[fmt(r[lab], 2) for lab in labels])
    console.print(b)

    for m in result["moved"]:
        if not m["shared"]:
            console.print(
                f"[dim]{m['label']} does not share rollouts with {result['reference']}: "
                f"{m['reason']}[/]",
                highlight=False,
            )
            continue
        mv = _table(
            f"How the log-probs moved from {result['reference']} to {m['label']} "
            f"(same tokens, {m['num_common']:,} positions)",
            "|m| = |logp(b) - logp(a)| per token, by a's p_train; same = share of tokens with "
            "m exactly 0",
        )
        mv.add_column("p_train", justify="right", no_wrap=True)
        for side in ("train", "infer"):
            for c in ("mean |m|", "max |m|"):
                mv.add_column(f"{side} {c}", justify="right", no_wrap=True)
        tb, ib = m["train"]["buckets"], m["infer"]["buckets"]
        for i, (rt, ri) in enumerate(zip(tb, ib, strict=True)):
            if not rt["count"]:
                continue
            mv.add_row(
                _label(rt, i == len(tb) - 1),
                fmt(rt["mean_abs"], 2),
                fmt(rt["max_abs"], 2),
                fmt(ri["mean_abs"], 2),
                fmt(ri["max_abs"], 2),
            )
        mv.add_row(
            "all",
            *[
                x
                for side in ("train", "infer")
                for x in (fmt(m[side]["mean_abs"], 2), fmt(m[side]["max_abs"], 2))
            ],
            style="bold",
        )
        console.print(mv)
        console.print(
            f"  same: training side {pct(m['train']['frac_identical'])}, inference side "
            f"{pct(m['infer']['frac_identical'])} of tokens",
            highlight=False,
        )
    for r in runs:
        console.print(Panel(r["verdict"], title=f"verdict: {r['label']}", title_align="left"))
    if result.get("attribution"):
        console.print(attribution_table(result["attribution"], result["attribution_reference"]))
        for a in result["attribution"]:
            if a["shared"]:
                console.print(f"  {a['verdict']}", highlight=False)


def attribution_table(rows: list[dict[str, Any]], reference: str) -> Table:
    """Each run's two sides against a precise reference (`attribution.attribution_row`s):
    rms errors, their correlation, the gap measured and predicted, the inference side's
    share, the dominant side; runs not sharing the reference's tokens say why."""
    t = _table(
        f"Which side: each side's error against {reference} (nats rms, same tokens)",
        "err = logp_side - logp_ref; gap = rms(delta); predicted = sqrt(err_infer^2 + "
        "err_train^2) if the errors are independent; infer share = err_infer^2 / (err_infer^2 "
        "+ err_train^2)",
    )
    for c in ("run", "tokens", "err infer", "err train", "corr", "gap", "predicted",
              "infer share", "dominant"):  # fmt: skip
        t.add_column(c, justify="left" if c in ("run", "dominant") else "right", no_wrap=True)
    for r in rows:
        if not r["shared"]:
            t.add_row(r["name"], f"[yellow]{r['reason']}[/]", *[""] * 7)
            continue
        corr = r["err_corr"]
        t.add_row(
            r["name"],
            f"{r['num_tokens']:,}",
            fmt(r["err_infer_rms"], 2),
            fmt(r["err_train_rms"], 2),
            DASH if corr is None else f"{corr:+.2f}",
            fmt(r["gap_rms"], 2),
            fmt(r["gap_predicted_rms"], 2),
            pct(r["share_infer"]),
            r["dominant"] or DASH,
        )
    return t


def print_diagnose(result: dict[str, Any], console: Console | None = None) -> None:
    """The tables of a `diagnose` result: which side (the attribution, when the reference
    was built), the variants ranked by k3 (skipped ones last, with their reason), the
    sources of mismatch, the verdict."""
    console = console or _wide_console()
    if result.get("attribution"):
        ref = result["reference"]
        console.print(attribution_table(result["attribution"], f"the reference ({ref['what']})"))
    elif (result.get("reference") or {}).get("skipped"):
        console.print(f"[yellow]no reference: {result['reference']['skipped']}[/]")
    rows = {r["name"]: r for r in result["variants"]}
    base_k3 = (rows.get("baseline") or {}).get("k3")
    t = _table(
        "Variants on the same tokens, ranked by k3 (delta = logp_infer - logp_train, nats)",
        "x base = k3 / the baseline's k3; TV = mean distribution-level lower bound on "
        f"TV(q, p); runs in {result['out']}/variants/",
    )
    for c, j in (("variant", "left"), ("isolates", "left"), ("tokens", "right"),
                 ("k3", "right"), ("x base", "right"), ("mean |δ|", "right"),
                 ("p99 |δ|", "right"), ("max |δ|", "right"), ("TV", "right")):  # fmt: skip
        t.add_column(c, justify=j, no_wrap=c != "isolates")
    for name in result["ranking"]:
        r = rows[name]
        t.add_row(
            name,
            r["isolates"],
            f"{r['num_tokens']:,}",
            fmt(r["k3"], 2),
            ratio_x(r["k3"] / base_k3) if base_k3 and r["k3"] is not None else DASH,
            fmt(r["mean_abs_delta"], 2),
            fmt(r["p99_abs_delta"], 2),
            fmt(r["max_abs_delta"], 2),
            fmt(r["tv_coarse_mean"], 2),
        )
    for r in result["variants"]:
        if r["skipped"]:
            t.add_row(r["name"], f"[yellow]skipped: {r['skipped']}[/]", *[""] * 7)
    console.print(t)
    chosen = {r["name"] for r in result["variants"]}
    elsewhere = [m for m in result.get("not_runnable") or [] if m["name"] not in chosen]
    if elsewhere:
        console.print(
            "Not runnable on this machine (not selected; `diagnose --list` says why): "
            + ", ".join(f"{m['name']} ({m['runs_on']})" for m in elsewhere),
            highlight=False,
        )
    if result["sources"]:
        s = _table("Sources of mismatch, each measured alone on the same tokens")
        for c in ("source", "k3", "share of baseline k3", "mean |δ|"):
            s.add_column(c, justify="left" if c == "source" else "right")
        for x in result["sources"]:
            s.add_row(
                x["what"],
                fmt(x["k3"], 2),
                pct(x["share_of_baseline_k3"]),
                fmt(x["mean_abs_delta"], 2),
            )
        console.print(s)
    console.print(Panel(result["verdict"], title="verdict", title_align="left", expand=True))


def print_variant_matrix(matrix: list[dict[str, Any]], console: Console | None = None) -> None:
    """`diagnose --list`: every variant of the matrix, its side, what it isolates, where it
    runs, and whether it can run here (why not, if not)."""
    console = console or _wide_console()
    n_ok = sum(1 for m in matrix if m["runnable"])
    t = _table(
        f"The diagnose matrix: {len(matrix)} variants, {n_ok} runnable here",
        "default = in the set run without --variants / --all; --all runs every runnable one",
    )
    for c in ("variant", "side", "isolates", "runs on", "here", "default"):
        t.add_column(c, no_wrap=c in ("variant", "side", "runs on", "default"))
    for m in matrix:
        here = "[green]runs[/]" if m["runnable"] else f"[yellow]no: {m['reason']}[/]"
        t.add_row(m["name"], m["side"], m["isolates"], m["runs_on"], here,
                  "yes" if m["default"] else "")  # fmt: skip
    console.print(t)


def print_summary(lines: list[str], where: dict[str, Any], console: Console | None = None) -> None:
    """The closing summary of a run: its findings (`verdict.findings`) as a short list,
    then where the run, its figures and its tables are."""
    console = console or Console()
    body = "\n".join(f"• {line}" for line in lines)
    places = "\n".join(f"{k:<8} {v}" for k, v in where.items())
    console.print(
        Panel(f"{body}\n\n{places}", title="summary", title_align="left", expand=True),
        highlight=False,
    )


# ----------------------------------------------------------------------------- history

HISTORY_ROWS = 24  # steps printed in full; more: the first and last half of these


def print_history(results: list[dict[str, Any]], console: Console | None = None) -> None:
    """`mismatch history`: per log, what each series is, its values by step, the alarm, and
    what a scalar log cannot tell."""
    console = console or _wide_console()
    for r in results:
        series = r["series"]
        frameworks = ", ".join(dict.fromkeys(s["framework"] for s in series))
        t = _table(
            f"mismatch history: {r['path']} ({r['format']}, {r['num_steps']:,} steps; "
            f"keys of {frameworks})",
            caption=f"checked against {r['source']}" if r.get("source") else None,
        )
        for col, just in (("key", "left"), ("ours", "left"), ("sign vs delta", "left"),
                          ("clipped?", "left"), ("level", "left"), ("first", "right"),
                          ("last", "right"), ("max", "right")):  # fmt: skip
            t.add_column(col, justify=just, overflow="fold", no_wrap=col == "key")
        for s in series:
            t.add_row(s["key"], s["ours"] or DASH, s["sign"], s["clip"], s["level"],
                      fmt(s["first"]), fmt(s["last"]), fmt(s["max"]))  # fmt: skip
        console.print(t)
        console.print("what each is (delta = logp_infer - logp_train):", highlight=False)
        for s in series:
            console.print(f"  {s['key']}: {s['meaning']}", highlight=False, soft_wrap=True)
        steps = sorted({st for s in series for st in s["steps"]})
        shown = steps
        if len(steps) > HISTORY_ROWS:
            half = HISTORY_ROWS // 2
            shown = [*steps[:half], None, *steps[-half:]]
        by = _table(
            "by step",
            caption=f"{len(steps):,} steps; all of them with --json"
            if len(steps) > HISTORY_ROWS
            else None,
        )
        by.add_column("step", justify="right")
        for s in series:
            by.add_column(s["key"].removeprefix("train/"), justify="right", overflow="fold")
        values = [dict(zip(s["steps"], s["values"], strict=True)) for s in series]
        raised = set(r["alert"]["raised_steps"])
        for st in shown:
            if st is None:
                by.add_row("…", *("…" for _ in series))
                continue
            mark = " !" if st in raised else ""
            by.add_row(f"{st}{mark}", *(fmt(v.get(st)) for v in values))
        console.print(by)
        _print_alert(r["alert"], console)
        for line in r["cannot_tell"]:
            console.print(f"[bold yellow]note:[/] {line}", highlight=False, soft_wrap=True)


def _print_alert(al: dict[str, Any], console: Console) -> None:
    if not al["watched"]:
        console.print(
            "alert: none of these series is one the drift alarm watches (k3-like or mean |delta|-like)",
            highlight=False,
        )
    elif not al["enough_steps"]:
        console.print(
            f"alert: not checked: the drift alarm needs more than {al['warmup']} steps of "
            f"{', '.join(al['watched'])} (its baseline)",
            highlight=False,
            soft_wrap=True,
        )
    elif al["first"] is None:
        console.print(
            f"[bold green]alert: none[/] (drift alarm on {', '.join(al['watched'])}: "
            f"baseline the first {al['warmup']} steps, CUSUM threshold {al['threshold']:g})",
            highlight=False,
            soft_wrap=True,
        )
    else:
        f = al["first"]
        n = len(al["raised_steps"])
        console.print(
            f"[bold red]alert from step {f['step']}:[/] {f['reason']} "
            f"(raised at {n:,} step{'s' if n != 1 else ''}, marked ! above)",
            highlight=False,
            soft_wrap=True,
        )
