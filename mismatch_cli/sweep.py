"""Threshold sweep for dynamic vocabulary pruning (docs/theory.md, "Dynamic vocabulary pruning
(DVP)"), and a recommended rho.

For every candidate threshold rho of a pruning rule
    min-p      S_rho(c) = {a : p(a|c) >= rho * max_b p(b|c)}
    absolute   S_tau(c) = {a : p(a|c) >= tau}
the sweep reports, from a stored run and without any model:
    removed    sampled tokens outside S (a pruned rollout never produces them), the
               sequences holding one, and their share of the run's sum |delta|
    remaining  mismatch on kept tokens: mean |delta|, signed mean delta (§5's bias),
               k3, mean |sum_t delta_t| per sequence (each also relative to no pruning), and
               the tail: p99 and max |delta|, share with r = exp(-delta) outside [0.5, 2]
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

Memory. `sweep(path)` streams the token table in batches (`tokens.TokenBatches`): a pass
over seq_id gives each row its sequence index, one pass over the sweep's columns fills a
`SweepAccumulator` (every row at once). Memory holds one batch and S-sized arrays (S
sequences), never a per-token array of the run, so a 10^8-token run fits in a few GB.
Counts, sums, means, maxima, and the bias bound's mean and p95 (over the S per-sequence
sums, which are kept) are exact; the p99 of kept |delta| is exact up to
`quantiles.EXACT_LIMIT` finite tokens and from the quantile sketch beyond (relative error
<= 0.5%, `quantiles.QuantileSketch`); the result's `quantiles` key says which.

No torch here: the command must start fast.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import kernels, metrics
from .errors import MismatchError
from .formatting import number_list
from .per_sequence import BatchSeqs, SeqIndex
from .quantiles import EXACT_LIMIT, KeyedQuantiles
from .results import json_ready
from .runs import RunMeta
from .schema import CONVENTIONS, FORMAT_VERSION, RHO_GRID
from .tokens import BATCH_ROWS, TokenBatches, frame_tokens, open_run_tokens

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
    "kept_p99_abs_delta",
    "kept_max_abs_delta",
    "kept_frac_ratio_outside_0.5_2",
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


def check_scored_import(path: Path, meta: RunMeta) -> None:
    """A run imported with both sides as dumped ("scored") has no training-side
    distribution, so no pruned-mass grid: say how to get one (`import --rescore`)."""
    source = meta.source
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
                f"there); use grid values: {number_list(g)}"
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


def sweep_columns(rule: str) -> list[str]:
    """The tokens.parquet columns the sweep reads under `rule`."""
    cols = ["seq_id", "p_train", "delta", "kept_train", MASS_COLUMN[check_rule(rule)]]
    if rule == "min-p":
        cols.insert(2, "p_max_train")
    return cols


def scalar_columns(rules: Sequence[str], have: Collection[str]) -> list[str]:
    """The scalar columns (not the grid) the sweeps of `rules` read, those the table has."""
    cols = [c for r in rules for c in sweep_columns(r) if c != MASS_COLUMN[r]]
    return [c for c in dict.fromkeys(cols) if c in have]


def _grid_size_error(column: str, got: Any, size: int) -> MismatchError:
    return MismatchError(
        f"column {column} holds {got} values per token but the grid has {size}; the run's "
        "rho_grid and its table disagree"
    )


def rule_error(
    columns: Collection[str], num_rows: int, rule: str, where: str = "the token table"
) -> MismatchError | None:
    """Why a table with these columns and rows cannot be swept under `rule` (None: it can):
    no pruned-mass grid, a missing scalar column, no tokens. `where` names the table."""
    mass_col = MASS_COLUMN[check_rule(rule)]
    if mass_col not in columns:
        return _no_grid_error(where, mass_col)
    need = [c for c in sweep_columns(rule) if c not in ("kept_train", mass_col)]
    missing = [c for c in need if c not in columns]
    if missing:
        return MismatchError(f"the token table lacks column(s) {', '.join(missing)}")
    if num_rows == 0:
        return MismatchError("the run has no generated tokens: nothing to sweep")
    return None


def run_where(path: Path, meta: RunMeta) -> str:
    """How errors name a run's token table (with its format version)."""
    return f"run {path} (format_version {meta.format_version})"


def sweep_tokens(path: str | Path, batch_rows: int = BATCH_ROWS) -> TokenBatches:
    """A complete run's tokens.parquet as `TokenBatches` (`tokens.open_run_tokens`; the
    columns are checked per rule by `rule_error`); a run imported without rescoring is
    refused (`check_scored_import`)."""
    src = open_run_tokens(
        path, verb="sweep", needed=(), batch_rows=batch_rows, complete=True, allow_empty=True
    )
    assert src.run is not None and src.meta is not None
    check_scored_import(src.run, src.meta)
    return src


def _grid_of(meta: RunMeta, grid: Sequence[float] | None) -> np.ndarray:
    g = grid if grid is not None else (meta.rho_grid or RHO_GRID)
    return np.asarray(g, dtype=np.float64)


@dataclass(frozen=True)
class SweepInputs:
    """A sweep's per-token arrays in memory (N tokens, S sequences, G grid values): what
    `load` / `prepare` give for a small run or a test; `sweep` takes them as one batch.
    `sweep(path)` never builds them: it streams the table (`SweepAccumulator`)."""

    rule: str
    grid: np.ndarray  # [G] float64, the run's pruning grid
    p_train: np.ndarray  # [N] float32, training-side probability of the sampled token
    p_max_train: np.ndarray | None  # [N] float32 (min-p rule only)
    delta: np.ndarray  # [N] float64, +inf where the training side pruned the token
    support: np.ndarray  # [N] bool: kept by the training side's own truncation
    seq: np.ndarray  # [N] int64 sequence index in 0..S-1
    num_sequences: int
    pruned_mass: np.ndarray  # [N, G] float32 pruned mass per grid value

    @property
    def num_tokens(self) -> int:
        return int(self.delta.shape[0])


def _batch_arrays(
    b: dict[str, np.ndarray], rule: str
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
    """(p_train float32, p_max_train float32 or None, delta float64, support bool) of a batch
    of token columns; support = p_train > 0 and kept_train (when the table has it)."""
    p = np.asarray(b["p_train"], dtype=np.float64)
    support = p > 0
    if "kept_train" in b:
        support &= np.asarray(b["kept_train"], dtype=bool)
    p_max = np.asarray(b["p_max_train"], dtype=np.float32) if rule == "min-p" else None
    return p.astype(np.float32), p_max, np.asarray(b["delta"], dtype=np.float64), support


def _inputs(src: TokenBatches, rule: str, grid: np.ndarray) -> SweepInputs:
    """The whole table in one batch as `SweepInputs` (small runs: `load`, `prepare`)."""
    mass_col = MASS_COLUMN[rule]
    cols = scalar_columns([rule], src.columns)
    (b,) = src.read(cols, [mass_col], batch_rows=max(src.num_rows, 1))
    mass = np.array(b[mass_col], dtype=np.float32)  # [N, G], a writable copy
    if mass.shape[1] != grid.size:
        raise _grid_size_error(mass_col, mass.shape[1], grid.size)
    p, p_max, delta, support = _batch_arrays(b, rule)
    seqs = SeqIndex.scan([b["seq_id"]])
    return SweepInputs(
        rule, grid, p, p_max, delta, support, seqs.codes(b["seq_id"]), seqs.num, mass
    )


def prepare(
    tokens: pd.DataFrame, rule: str = "min-p", grid: Sequence[float] = RHO_GRID
) -> SweepInputs:
    """A token table (tokens.parquet columns) in memory as `SweepInputs`; checks columns
    and the grid's width."""
    err = rule_error([str(c) for c in tokens.columns], len(tokens), rule)
    if err is not None:
        raise err
    src = frame_tokens(tokens, verb="sweep", needed=(), batch_rows=max(len(tokens), 1))
    return _inputs(src, rule, np.asarray(grid, dtype=np.float64))


def load(path: str | Path, rule: str = "min-p", grid: Sequence[float] | None = None) -> SweepInputs:
    """A run's sweep columns read into memory (grid: the run's `rho_grid`), for small runs
    and tests; `sweep(path)` streams instead."""
    src = sweep_tokens(path)
    assert src.run is not None and src.meta is not None
    err = rule_error(src.columns, src.num_rows, rule, run_where(src.run, src.meta))
    if err is not None:
        raise err
    return _inputs(src, rule, _grid_of(src.meta, grid))


def _ratio(a: float, b: float) -> float:
    return a / b if (b != 0 and math.isfinite(a) and math.isfinite(b)) else float("nan")


def _suffix(x: np.ndarray) -> np.ndarray:
    """out[t] = sum(x[t:]) along the last axis (float64)."""
    return np.cumsum(x[..., ::-1], axis=-1, dtype=np.float64)[..., ::-1]


class SweepAccumulator:
    """Every row of one rule's sweep, accumulated over batches of token rows in one pass,
    whatever the grid size (N tokens, S sequences, G grid values, nb = G + 2 levels).

    The safe sets are nested (a larger rho keeps a subset: float32(rho) * p_max and the
    comparison are monotone), so each token has a level L: 0 outside the training side's
    support, else 1 + the number of grid values (ascending) that keep it. The tokens kept
    at the j-th smallest rho are those with L >= j + 2 (the baseline: L >= 1), and every
    kept-token sum of a row is a suffix sum of per-level sums. Held across batches: the
    per-level counts and sums [nb], each sequence's lowest and highest level [S] and its
    sum of delta per level [S, nb], and of the pruned-mass grid the total, the maximum [G]
    and each sequence's sum [S, G] (the bias bound). All exact; the p99 of kept |delta| is
    a `KeyedQuantiles` keyed by L (exact up to `exact_limit` finite tokens, the sketch
    beyond)."""

    def __init__(
        self, rule: str, grid: Sequence[float], num_sequences: int, exact_limit: int = EXACT_LIMIT
    ) -> None:
        self.rule = check_rule(rule)
        self.grid = np.asarray(grid, dtype=np.float64)  # [G]
        G, S = self.grid.size, int(num_sequences)
        nb = G + 2
        self.num_sequences, self.nb = S, nb
        self.order = np.argsort(self.grid, kind="stable")  # [G] ascending
        self.level_of = np.empty(G, dtype=np.int64)  # grid index -> threshold t
        self.level_of[self.order] = np.arange(G) + 2
        self.num_tokens = 0
        self.num_infinite = 0
        self.total_abs = 0.0
        self.n = np.zeros(nb, dtype=np.int64)  # tokens per level
        self.sums = {k: np.zeros(nb) for k in ("fin", "abs", "d", "k3", "out")}  # [nb] each
        self.level_max = np.full(nb, -np.inf)  # largest finite |delta| per level
        self.seq_min_L = np.full(S, nb, dtype=np.int16)  # a sequence holds a pruned token iff < t
        self.seq_max_L = np.full(S, -1, dtype=np.int16)  # holds a kept finite one iff >= t
        self.seq_sum = np.zeros((S, nb))  # [S, nb] sum of delta over its tokens of level L
        self.mass_total = np.zeros(G)
        self.mass_max = np.full(G, -np.inf)
        self.mass_seq = np.zeros((S, G))  # [S, G] per-sequence sums of m(rho)
        self.quantiles = KeyedQuantiles(exact_limit)

    def add_batch(
        self, b: dict[str, np.ndarray], seq: np.ndarray, bs: BatchSeqs | None = None
    ) -> None:
        """Add a batch of token columns (`sweep_columns`) whose rows have sequence index seq [n]."""
        mass = b[MASS_COLUMN[self.rule]]
        if mass.shape[1] != self.grid.size:
            raise _grid_size_error(MASS_COLUMN[self.rule], mass.shape[1], self.grid.size)
        p, p_max, delta, support = _batch_arrays(b, self.rule)
        self.add(seq, p, p_max, delta, support, mass.astype(np.float32, copy=False), bs)

    def add(
        self,
        seq: np.ndarray,
        p_train: np.ndarray,
        p_max_train: np.ndarray | None,
        delta: np.ndarray,
        support: np.ndarray,
        mass: np.ndarray,
        bs: BatchSeqs | None = None,
    ) -> None:
        """Add n token rows: seq [n] sequence index, p_train / p_max_train [n] float32, delta
        [n] float64, support [n] bool, mass [n, G] float32 (bs: BatchSeqs of seq, if built)."""
        nb = self.nb
        L = support.astype(np.int16)  # [n]
        for g in self.order:
            L += support & kept_mask(p_train, p_max_train, self.grid[g], self.rule)
        fin = np.isfinite(delta)  # [n]
        absd = np.where(fin, np.abs(delta), 0.0)  # [n]
        d = np.where(fin, delta, 0.0)
        k3 = metrics.k3_per_token(d)  # [n], 0 where not finite
        outside = fin & ((d > math.log(2)) | (d < -math.log(2)))  # r outside [0.5, 2]
        self.num_tokens += int(delta.size)
        self.num_infinite += int(np.count_nonzero(~(support & fin)))
        self.total_abs += float(absd.sum())
        part = np.empty((len(self.sums), nb))  # [5, nb] this batch's sums per level
        kernels.level_sums(L, fin, absd, d, k3, outside, self.n, part, self.level_max)
        for k, row in zip(self.sums, part, strict=True):  # fin, abs, d, k3, out
            self.sums[k] += row
        bs = BatchSeqs(seq) if bs is None else bs
        bs.minimum(self.seq_min_L, L)
        bs.maximum(self.seq_max_L, np.where(fin, L, -1).astype(np.int16))
        k = bs.ids.size
        M = np.bincount(bs.local * nb + L, weights=d, minlength=k * nb)  # [k * nb]
        self.seq_sum[bs.ids] += M.reshape(k, nb)
        kernels.column_stats(np.ascontiguousarray(mass), self.mass_total, self.mass_max)
        bs.add_rows(self.mass_seq, mass)
        self.quantiles.add(absd[fin], L[fin])

    def result(
        self,
        rhos: Sequence[float] | None = None,
        max_bias: float = DEFAULT_MAX_BIAS,
        target_mismatch: float | None = None,
        run: str | None = None,
    ) -> dict[str, Any]:
        """The sweep's result dict (`sweep`) from what was added."""
        picked = resolve_rhos(rhos, self.grid)
        tab = _Table(self)
        base = tab.row(1, None, None)
        base = _with_rel(base, base)
        rows = [_with_rel(tab.row(int(self.level_of[i]), rho, i), base) for rho, i in picked]
        return json_ready(
            {
                "run": run,
                "rule": self.rule,
                "grid": self.grid.tolist(),
                "num_tokens": self.num_tokens,
                "num_sequences": self.num_sequences,
                "num_infinite": self.num_infinite,
                "max_bias": max_bias,
                "target_mismatch": target_mismatch,
                "baseline": base,
                "rows": rows,
                "recommended": recommend(rows, max_bias, target_mismatch),
                "conventions": CONVENTIONS_SWEEP,
                "quantiles": (
                    "exact"
                    if self.quantiles.exact
                    else f"sketch (relative error <= {self.quantiles.alpha:g})"
                ),
            }
        )


class _Table:
    """The rows of a `SweepAccumulator`: suffix sums over levels (row t = tokens with L >= t)."""

    def __init__(self, acc: SweepAccumulator) -> None:
        self.acc = acc
        s = acc.sums
        self.n_suf = _suffix(acc.n)  # [nb] tokens with L >= t
        self.nf_suf = _suffix(s["fin"])  # finite ones
        self.abs_suf, self.d_suf = _suffix(s["abs"]), _suffix(s["d"])
        self.abs_pre = np.cumsum(np.r_[0.0, s["abs"]])  # [nb + 1] |delta| of tokens with L < t
        self.k3_suf, self.out_suf = _suffix(s["k3"]), _suffix(s["out"])
        self.max_suf = np.maximum.accumulate(acc.level_max[::-1])[::-1]  # [nb]
        self.seq_sum = _suffix(acc.seq_sum)  # [S, nb] per-sequence sum of delta over L >= t
        S = acc.num_sequences
        self.mass_mean = acc.mass_total / acc.num_tokens  # [G]
        self.bound_mean = acc.mass_total / S  # mean over sequences of their sums
        self.bound_p95 = np.percentile(acc.mass_seq, BIAS_QUANTILE, axis=0)  # [G]

    def row(self, t: int, rho: float | None, g: int | None) -> dict[str, Any]:
        """The row of the tokens with L >= t (grid index g; None: the baseline, t = 1)."""
        acc = self.acc
        N = acc.num_tokens
        nf = self.nf_suf[t]
        has = acc.seq_max_L >= t  # [S]
        pruned = N - int(self.n_suf[t])

        def mean(x: np.ndarray) -> float:
            return float(x[t] / nf) if nf else float("nan")

        return {
            "rho": rho,
            "pruned_tokens": pruned,
            "pruned_token_frac": pruned / N,
            "pruned_seq_frac": float((acc.seq_min_L < t).mean()),
            "pruned_abs_delta_share": (
                float(self.abs_pre[t]) / acc.total_abs if acc.total_abs > 0 else float("nan")
            ),
            "kept_mean_abs_delta": mean(self.abs_suf),
            "kept_mean_delta": mean(self.d_suf),
            "kept_k3": mean(self.k3_suf),
            "kept_seq_mean_abs_sum_delta": (
                float(np.abs(self.seq_sum[has, t]).mean()) if has.any() else float("nan")
            ),
            "kept_p99_abs_delta": acc.quantiles.quantile(lambda L: L >= t, 0.99),
            "kept_max_abs_delta": float(self.max_suf[t]) if nf else float("nan"),
            "kept_frac_ratio_outside_0.5_2": mean(self.out_suf),
            "mean_pruned_mass": 0.0 if g is None else float(self.mass_mean[g]),
            "max_pruned_mass": 0.0 if g is None else float(acc.mass_max[g]),
            "seq_bias_bound_mean": 0.0 if g is None else float(self.bound_mean[g]),
            "seq_bias_bound_p95": 0.0 if g is None else float(self.bound_p95[g]),
        }


def _with_rel(row: dict, base: dict) -> dict:
    for k in _REL_KEYS:
        row[f"{k}_rel"] = _ratio(row[k], base[k])
    return {k: row[k] for k in ROW_KEYS}


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
    *,
    batch_rows: int = BATCH_ROWS,
    exact_limit: int = EXACT_LIMIT,
) -> dict[str, Any]:
    """Sweep the pruning threshold over a run (path), a token table or prepared inputs.

    rhos: thresholds to evaluate (grid values; None: the whole grid). grid: the run's
    pruning grid (None: run.json's `rho_grid`, else schema.RHO_GRID). The recommendation
    uses the MEAN per-sequence bias bound against `max_bias` (see `recommend`).
    A path or table is streamed `batch_rows` rows at a time (a pass over seq_id, then one
    over the sweep's columns); quantiles are exact up to `exact_limit` finite tokens.
    Returns a strict-JSON-ready dict: run, rule, grid, num_tokens, num_sequences,
    num_infinite, max_bias, target_mismatch, baseline (a row with rho None), rows (ROW_KEYS
    each), recommended {rho, reason, criterion}, conventions, quantiles ("exact" or
    "sketch ...").
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
        resolve_rhos(rhos, inp.grid)
        acc = SweepAccumulator(rule, inp.grid, inp.num_sequences, exact_limit)
        acc.add(inp.seq, inp.p_train, inp.p_max_train, inp.delta, inp.support, inp.pruned_mass)
        return acc.result(rhos, max_bias, target_mismatch, run)
    if isinstance(source, pd.DataFrame):
        src, where = TokenBatches(source, batch_rows), "the token table"
        g = np.asarray(RHO_GRID if grid is None else grid, dtype=np.float64)
    else:
        run = str(source)
        src = sweep_tokens(source, batch_rows)
        assert src.run is not None and src.meta is not None
        where, g = run_where(src.run, src.meta), _grid_of(src.meta, grid)
    err = rule_error(src.columns, src.num_rows, rule, where)
    if err is not None:
        raise err
    resolve_rhos(rhos, g)  # a bad --rho fails before any token is read
    seqs = SeqIndex.scan(b["seq_id"] for b in src.read(["seq_id"]))
    acc = SweepAccumulator(rule, g, seqs.num, exact_limit)
    for b in src.read(scalar_columns([rule], src.columns), [MASS_COLUMN[rule]]):
        acc.add_batch(b, seqs.codes(b["seq_id"]))
    return acc.result(rhos, max_bias, target_mismatch, run)


CONVENTIONS_SWEEP: dict[str, str] = {
    "delta": CONVENTIONS["delta"],
    "pruned_mass": CONVENTIONS["pruned_mass"],
    "bias_bound": (
        "per sequence: sum_t m(c_t) over its positions (docs/theory.md §6 'The bias bound'); "
        "its mean decides the recommendation, p95 is the 95th percentile "
        "(linear interpolation)"
    ),
    "infinite_delta": (
        "tokens the training side's own truncation removed (infinite delta): "
        "outside every safe set, counted as pruned, excluded from means"
    ),
    "quantiles": (
        "counts, sums, means, maxima and the bias bound's p95 are exact; kept_p99_abs_delta is "
        f"exact up to {EXACT_LIMIT:,} finite tokens, beyond from a quantile sketch with "
        "relative error <= 0.5% (the `quantiles` key says which)"
    ),
}


def sweep_frame(result: dict[str, Any]) -> pd.DataFrame:
    """The sweep's rows as a DataFrame (for --csv), with a boolean `recommended` column."""
    df = pd.DataFrame(result["rows"], columns=list(ROW_KEYS))
    rec = result["recommended"]["rho"]
    df["recommended"] = df["rho"] == rec if rec is not None else False
    return df


__all__ = [
    "MASS_COLUMN",
    "ROW_KEYS",
    "SWEEP_RULES",
    "SweepAccumulator",
    "SweepInputs",
    "check_rule",
    "check_scored_import",
    "kept_mask",
    "load",
    "parse_rhos",
    "prepare",
    "recommend",
    "resolve_rhos",
    "rule_error",
    "run_where",
    "scalar_columns",
    "sweep",
    "sweep_columns",
    "sweep_frame",
    "sweep_tokens",
]
