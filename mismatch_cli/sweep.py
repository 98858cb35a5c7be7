"""Threshold sweep for dynamic vocabulary pruning (docs/theory.md, "Dynamic vocabulary pruning
(DVP)"), and a recommended rho.

For every candidate threshold rho of a pruning rule
    min-p      S_rho(c) = {a : p(a|c) >= rho * max_b p(b|c)}
    absolute   S_tau(c) = {a : p(a|c) >= tau}
the sweep reports, from a stored run and without any model:
    removed    sampled tokens outside S (a pruned rollout never produces them), the
               sequences holding one, and their share of the run's sum |delta|
    remaining  mismatch on kept tokens: mean |delta|, signed mean delta (section 3's bias),
               k3, mean |sum_t delta_t| per sequence; each also relative to no pruning
    cost       pruned mass m(c) = 1 - P(S) per position (= TV(p, p~)), and its sum over a
               sequence, the bias bound |J(p) - J(p~)| <= sum_t m(c_t)

Exactness. The keep/prune decision of the sampled token is vLLM's min-p comparison
(`sampling.min_p_keep`: float32 p >= float32(rho) * float32 max p) on the stored float32
softmax probabilities (p_train, p_max_train), so it agrees bit for bit with `dvp`, with the
replay of `measure --min-p` and with a vLLM engine sampling at min_p = rho. Pruned mass is
read from the run's per-position grid (`pruned_mass_minp` / `pruned_mass_abs`, computed by
`dvp.pruned_mass_grid`), so thresholds must be values of the stored grid.

Tokens with an infinite delta (the training side's own sampling truncation removed them,
kept_train False) have p = 0 on the training sampling distribution: they are outside every
safe set, so they count as pruned at every rho (and in the baseline's pruned fraction), and
are excluded from every mean, as everywhere in the tool.

No torch here: the command must start fast.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from . import metrics
from .errors import MismatchError
from .results import json_ready
from .runs import open_run, read_tokens
from .schema import CONVENTIONS, FORMAT_VERSION, RHO_GRID, TOKENS_FILE

SWEEP_RULES: tuple[str, ...] = ("min-p", "absolute")
MASS_COLUMN: dict[str, str] = {"min-p": "pruned_mass_minp", "absolute": "pruned_mass_abs"}
DEFAULT_MAX_BIAS = 0.05
GRID_RTOL = 1e-9  # a --rho value within this relative distance of a grid value IS that value
BIAS_QUANTILE = 95.0

# Keys of every row (and of the baseline row), in table order.
ROW_KEYS: tuple[str, ...] = (
    "rho",
    "pruned_tokens",
    "pruned_token_frac",
    "pruned_seq_frac",
    "pruned_abs_delta_share",
    "kept_mean_abs_delta",
    "kept_mean_delta",
    "kept_k3",
    "kept_seq_mean_abs_sum_delta",
    "kept_mean_abs_delta_rel",
    "kept_mean_delta_rel",
    "kept_k3_rel",
    "kept_seq_mean_abs_sum_delta_rel",
    "mean_pruned_mass",
    "max_pruned_mass",
    "seq_bias_bound_mean",
    "seq_bias_bound_p95",
)
_REL_KEYS = (
    "kept_mean_abs_delta",
    "kept_mean_delta",
    "kept_k3",
    "kept_seq_mean_abs_sum_delta",
)


def _no_grid_error(where: str, column: str) -> MismatchError:
    return MismatchError(
        f"{where} was made without the pruning grid (no column {column}); rerun it with "
        f"`mismatch measure` (format_version >= {FORMAT_VERSION})"
    )


def check_scored_import(path: Path, meta: dict[str, Any]) -> None:
    """A run imported with both sides as dumped ("scored") has no training-side
    distribution, so no pruned-mass grid: say how to get one (`import --rescore`)."""
    source = meta.get("source") or {}
    if source.get("mode") == "scored":
        raise MismatchError(
            f"run {path} was imported from {source.get('format', 'a dump')} without rescoring: "
            "it has both sides' log-probs of the sampled tokens but not the training-side "
            "distribution the sweep needs; re-import it with `mismatch import ... --rescore "
            "--model MODEL`"
        )


def check_rule(rule: str) -> str:
    """Return `rule` if the sweep supports it (the rules with a stored pruned-mass grid)."""
    if rule not in SWEEP_RULES:
        raise MismatchError(
            f"unknown rule {rule!r}; use min-p or absolute (top-p has no stored pruned-mass grid)"
        )
    return rule


def parse_rhos(values: Iterable[str]) -> list[float]:
    """Parse `--rho` values: each may be a comma-separated list. Empty -> error."""
    out: list[float] = []
    for v in values:
        for part in str(v).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                out.append(float(part))
            except ValueError:
                raise MismatchError(f"--rho value {part!r} is not a number") from None
    if not out:
        raise MismatchError("--rho needs at least one value, e.g. --rho 1e-4,1e-3")
    return out


def _fmt_grid(grid: np.ndarray) -> str:
    return ", ".join(f"{g:g}" for g in grid)


def resolve_rhos(rhos: Sequence[float] | None, grid: Sequence[float]) -> list[tuple[float, int]]:
    """(rho, grid index) pairs, ascending and de-duplicated; all of `grid` when `rhos` is None.

    Each rho must lie in (0, 1) and be a grid value (relative tolerance GRID_RTOL; the grid's
    own value is used), since pruned mass is stored only on the grid.
    """
    g = np.asarray(grid, dtype=np.float64)
    if rhos is None:
        return [(float(r), i) for i, r in sorted(enumerate(g), key=lambda t: t[1])]
    if len(rhos) == 0:
        raise MismatchError("--rho needs at least one value, e.g. --rho 1e-4,1e-3")
    picked: dict[int, float] = {}
    for r in rhos:
        r = float(r)
        if not (0.0 < r < 1.0):
            raise MismatchError(f"rho must be in (0, 1), got {r:g}")
        hit = np.flatnonzero(np.abs(g - r) <= GRID_RTOL * r)
        if hit.size == 0:
            raise MismatchError(
                f"rho={r:g} is not on the run's pruning grid (pruned mass is stored only "
                f"there); use grid values: {_fmt_grid(g)}"
            )
        picked[int(hit[0])] = float(g[hit[0]])
    return sorted(((r, i) for i, r in picked.items()), key=lambda t: t[0])


def kept_mask(
    p_train: np.ndarray, p_max_train: np.ndarray | None, rho: float, rule: str = "min-p"
) -> np.ndarray:
    """Is the sampled token in the safe set at `rho`? [N] bool.

    Exactly `sampling.min_p_keep` / `dvp.safe_vocab_mask_from_probs` in float32:
        min-p     p >= float32(rho) * p_max
        absolute  p >= float32(tau)
    """
    p = np.asarray(p_train, dtype=np.float32)
    r = np.float32(rho)
    if rule == "min-p":
        if p_max_train is None:
            raise ValueError("min-p needs p_max_train")
        return p >= np.asarray(p_max_train, dtype=np.float32) * r
    check_rule(rule)
    return p >= r


@dataclass(frozen=True)
class SweepInputs:
    """The per-token arrays a sweep needs, prepared once (N tokens, S sequences, G grid)."""

    rule: str
    grid: np.ndarray  # [G] float64, the run's pruning grid
    p_train: np.ndarray  # [N] float32, training-side probability of the sampled token
    p_max_train: np.ndarray | None  # [N] float32 (min-p rule only)
    delta: np.ndarray  # [N] float64, +inf where the training side pruned the token
    support: np.ndarray  # [N] bool: kept by the training side's own truncation
    seq: np.ndarray  # [N] int64 sequence index in 0..S-1
    num_sequences: int
    pruned_mass: np.ndarray  # [N, G] float32, training-side pruned mass per grid value

    @property
    def num_tokens(self) -> int:
        return int(self.delta.shape[0])


def sweep_columns(rule: str) -> list[str]:
    """The tokens.parquet columns the sweep reads under `rule`."""
    cols = ["seq_id", "p_train", "delta", "kept_train", MASS_COLUMN[check_rule(rule)]]
    if rule == "min-p":
        cols.insert(2, "p_max_train")
    return cols


def prepare(
    tokens: pd.DataFrame, rule: str = "min-p", grid: Sequence[float] = RHO_GRID
) -> SweepInputs:
    """Turn a token table (tokens.parquet columns) into `SweepInputs`; checks shapes."""
    check_rule(rule)
    mass_col = MASS_COLUMN[rule]
    if mass_col not in tokens.columns:
        raise _no_grid_error("the token table", mass_col)
    need = [c for c in sweep_columns(rule) if c != "kept_train"]
    missing = [c for c in need if c not in tokens.columns]
    if missing:
        raise MismatchError(f"the token table lacks column(s) {', '.join(missing)}")
    if len(tokens) == 0:
        raise MismatchError("the run has no generated tokens: nothing to sweep")
    g = np.asarray(grid, dtype=np.float64)
    try:
        mass = np.stack(tokens[mass_col].to_numpy()).astype(np.float32, copy=False)  # [N, G]
    except (ValueError, TypeError) as e:
        raise MismatchError(f"column {mass_col} is not a list of {g.size} values per token") from e
    if mass.ndim != 2 or mass.shape[1] != g.size:
        raise MismatchError(
            f"column {mass_col} holds {mass.shape[-1]} values per token but the grid has "
            f"{g.size}; the run's rho_grid and its table disagree"
        )
    p = tokens["p_train"].to_numpy(dtype=np.float64)
    support = p > 0
    if "kept_train" in tokens.columns:
        support &= tokens["kept_train"].to_numpy(dtype=bool)
    seq, uniq = pd.factorize(tokens["seq_id"], sort=True)
    return SweepInputs(
        rule=rule,
        grid=g,
        p_train=p.astype(np.float32),
        p_max_train=(tokens["p_max_train"].to_numpy(dtype=np.float32) if rule == "min-p" else None),
        delta=tokens["delta"].to_numpy(dtype=np.float64),
        support=support,
        seq=seq.astype(np.int64),
        num_sequences=len(uniq),
        pruned_mass=mass,
    )


def load(path: str | Path, rule: str = "min-p", grid: Sequence[float] | None = None) -> SweepInputs:
    """Read the columns the sweep needs from a run directory (grid: the run's `rho_grid`)."""
    check_rule(rule)
    run, meta = open_run(path, allow_incomplete=False)
    check_scored_import(run.path, meta)
    mass_col = MASS_COLUMN[rule]
    file = run.path / TOKENS_FILE
    if file.is_file() and mass_col not in pq.read_schema(file).names:
        version = meta.get("format_version", 0)
        raise _no_grid_error(f"run {run.path} (format_version {version})", mass_col)
    if grid is None:
        grid = meta.get("rho_grid") or RHO_GRID
    return prepare(read_tokens(run.path, columns=sweep_columns(rule)), rule, grid)


def _ratio(a: float, b: float) -> float:
    return a / b if (b != 0 and math.isfinite(a) and math.isfinite(b)) else float("nan")


def _row(inp: SweepInputs, rho: float | None, kept: np.ndarray, mass: np.ndarray | None) -> dict:
    """One row of the sweep from the kept mask [N] and the pruned mass [N] (None: no pruning)."""
    S = inp.num_sequences
    pruned = ~kept  # [N]
    finite = np.isfinite(inp.delta)  # [N]
    use = kept & finite  # [N] tokens the kept-token means average over
    d = inp.delta[use]
    abs_all = np.abs(np.where(finite, inp.delta, 0.0))  # [N]
    total_abs = float(abs_all.sum())
    seq_pruned = np.bincount(inp.seq, weights=pruned, minlength=S) > 0  # [S]
    seq_sum = np.bincount(inp.seq, weights=np.where(use, inp.delta, 0.0), minlength=S)  # [S]
    seq_has = np.bincount(inp.seq, weights=use, minlength=S) > 0  # [S]
    if mass is None:
        mass = np.zeros(inp.num_tokens, dtype=np.float32)
    bound = np.bincount(inp.seq, weights=mass.astype(np.float64), minlength=S)  # [S]
    return {
        "rho": rho,
        "pruned_tokens": int(pruned.sum()),
        "pruned_token_frac": float(pruned.mean()),
        "pruned_seq_frac": float(seq_pruned.mean()),
        "pruned_abs_delta_share": (
            float(abs_all[pruned].sum()) / total_abs if total_abs > 0 else float("nan")
        ),
        "kept_mean_abs_delta": metrics.mean_abs(d),
        "kept_mean_delta": metrics.k1(d),
        "kept_k3": metrics.k3(d),
        "kept_seq_mean_abs_sum_delta": (
            float(np.abs(seq_sum[seq_has]).mean()) if seq_has.any() else float("nan")
        ),
        "mean_pruned_mass": float(mass.mean(dtype=np.float64)),
        "max_pruned_mass": float(mass.max()),
        "seq_bias_bound_mean": float(bound.mean()),
        "seq_bias_bound_p95": float(np.percentile(bound, BIAS_QUANTILE)),
    }


def _with_rel(row: dict, base: dict) -> dict:
    for k in _REL_KEYS:
        row[f"{k}_rel"] = _ratio(row[k], base[k])
    return {k: row[k] for k in ROW_KEYS}


def baseline_row(inp: SweepInputs) -> dict[str, Any]:
    """The no-pruning row: only the training side's own truncation removes tokens."""
    base = _row(inp, None, inp.support, None)
    return _with_rel(base, base)


def sweep_row(inp: SweepInputs, rho: float, index: int, base: dict[str, Any]) -> dict[str, Any]:
    """The row at grid value `rho` = inp.grid[index]; `base` is `baseline_row(inp)`."""
    kept = inp.support & kept_mask(inp.p_train, inp.p_max_train, rho, inp.rule)
    return _with_rel(_row(inp, rho, kept, inp.pruned_mass[:, index]), base)


def recommend(
    rows: Sequence[dict[str, Any]],
    max_bias: float = DEFAULT_MAX_BIAS,
    target_mismatch: float | None = None,
) -> dict[str, Any]:
    """Pick rho by the documented rule; returns {rho (None if none fits), reason, criterion}.

    Default (criterion "max-bias"): the largest rho whose MEAN per-sequence bias bound
    (sum_t m(c_t), averaged over sequences) is <= max_bias. With target_mismatch
    (criterion "target-mismatch"): the smallest rho whose kept-token mean |delta| is
    <= target_mismatch; the reason then also quotes that rho's bias bound.
    """
    if not rows:
        return {"rho": None, "reason": "no thresholds were evaluated", "criterion": "max-bias"}
    if target_mismatch is not None:
        ok = [r for r in rows if r["kept_mean_abs_delta"] <= target_mismatch]
        if not ok:
            vals = [r for r in rows if math.isfinite(r["kept_mean_abs_delta"])]
            best = min(vals, key=lambda r: r["kept_mean_abs_delta"]) if vals else None
            low = (
                f"the lowest kept mean |delta| is {best['kept_mean_abs_delta']:.4g} nats "
                f"(rho={best['rho']:g})"
                if best
                else "no kept tokens remain"
            )
            return {
                "rho": None,
                "reason": f"no rho reaches kept mean |delta| <= {target_mismatch:g} nats: {low}",
                "criterion": "target-mismatch",
            }
        r = min(ok, key=lambda r: r["rho"])
        b = r["seq_bias_bound_mean"]
        over = f", above --max-bias {max_bias:g}" if b > max_bias else ""
        return {
            "rho": r["rho"],
            "reason": (
                f"smallest rho with kept mean |delta| <= {target_mismatch:g} nats "
                f"({r['kept_mean_abs_delta']:.4g} at rho={r['rho']:g}); its mean per-sequence "
                f"bias bound is {b:.4g}{over}"
            ),
            "criterion": "target-mismatch",
        }
    ok = [r for r in rows if r["seq_bias_bound_mean"] <= max_bias]
    if not ok:
        r = min(rows, key=lambda r: r["seq_bias_bound_mean"])
        return {
            "rho": None,
            "reason": (
                f"no rho keeps the mean per-sequence bias bound <= {max_bias:g}: the lowest is "
                f"{r['seq_bias_bound_mean']:.4g} (rho={r['rho']:g})"
            ),
            "criterion": "max-bias",
        }
    r = max(ok, key=lambda r: r["rho"])
    return {
        "rho": r["rho"],
        "reason": (
            f"largest rho with mean per-sequence bias bound <= {max_bias:g} "
            f"({r['seq_bias_bound_mean']:.4g} at rho={r['rho']:g}; kept mean |delta| "
            f"{r['kept_mean_abs_delta']:.4g} nats, {r['kept_mean_abs_delta_rel']:.2f}x unpruned)"
        ),
        "criterion": "max-bias",
    }


def sweep(
    source: pd.DataFrame | str | Path | SweepInputs,
    rule: str = "min-p",
    rhos: Sequence[float] | None = None,
    max_bias: float = DEFAULT_MAX_BIAS,
    target_mismatch: float | None = None,
    grid: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Sweep the pruning threshold over a run (path), a token table or prepared inputs.

    rhos: thresholds to evaluate (grid values; None: the whole grid). grid: the run's
    pruning grid (None: run.json's `rho_grid`, else schema.RHO_GRID). The recommendation
    uses the MEAN per-sequence bias bound against `max_bias` (see `recommend`).
    Returns a strict-JSON-ready dict: run, rule, grid, num_tokens, num_sequences,
    num_infinite, max_bias, target_mismatch,
    baseline (a row with rho None), rows (ROW_KEYS each), recommended {rho, reason,
    criterion}, conventions.
    """
    if not (max_bias >= 0):
        raise MismatchError(f"--max-bias must be >= 0, got {max_bias:g}")
    if target_mismatch is not None and not (target_mismatch >= 0):
        raise MismatchError(f"--target-mismatch must be >= 0 nats, got {target_mismatch:g}")
    check_rule(rule)
    run = None
    if isinstance(source, SweepInputs):
        inp = source
        if inp.rule != rule:
            raise ValueError(f"inputs were prepared for rule {inp.rule!r}, not {rule!r}")
    elif isinstance(source, pd.DataFrame):
        inp = prepare(source, rule, RHO_GRID if grid is None else grid)
    else:
        run = str(source)
        inp = load(source, rule, grid)
    picked = resolve_rhos(rhos, inp.grid)
    base = baseline_row(inp)
    rows = [sweep_row(inp, rho, i, base) for rho, i in picked]
    return json_ready(
        {
            "run": run,
            "rule": rule,
            "grid": inp.grid.tolist(),
            "num_tokens": inp.num_tokens,
            "num_sequences": inp.num_sequences,
            "num_infinite": int((~(inp.support & np.isfinite(inp.delta))).sum()),
            "max_bias": max_bias,
            "target_mismatch": target_mismatch,
            "baseline": base,
            "rows": rows,
            "recommended": recommend(rows, max_bias, target_mismatch),
            "conventions": {
                "delta": CONVENTIONS["delta"],
                "pruned_mass": CONVENTIONS["pruned_mass"],
                "bias_bound": (
                    "per sequence: sum_t m(c_t) over its positions (docs/theory.md, 'The bias bound'); "
                    "its mean decides the recommendation, p95 is the 95th percentile "
                    "(linear interpolation)"
                ),
                "infinite_delta": (
                    "tokens the training side's own truncation removed (infinite delta): "
                    "outside every safe set, counted as pruned, excluded from means"
                ),
            },
        }
    )


def rows_frame(result: dict[str, Any]) -> pd.DataFrame:
    """The sweep's rows as a DataFrame (for --csv), with a boolean `recommended` column."""
    df = pd.DataFrame(result["rows"], columns=list(ROW_KEYS))
    rec = result["recommended"]["rho"]
    df["recommended"] = df["rho"] == rec if rec is not None else False
    return df


__all__ = [
    "MASS_COLUMN",
    "ROW_KEYS",
    "SWEEP_RULES",
    "SweepInputs",
    "baseline_row",
    "check_rule",
    "kept_mask",
    "load",
    "parse_rhos",
    "prepare",
    "recommend",
    "resolve_rhos",
    "rows_frame",
    "sweep",
    "sweep_columns",
    "sweep_row",
]
