"""Threshold sweep for dynamic vocabulary pruning (docs/theory.md, "Dynamic vocabulary pruning
(DVP)"), and a recommended rho.

For every candidate threshold rho of a pruning rule
    min-p      S_rho(c) = {a : p(a|c) >= rho * max_b p(b|c)}
    absolute   S_tau(c) = {a : p(a|c) >= tau}
the sweep reports, from a stored run and without any model:
    removed    sampled tokens outside S (a pruned rollout never produces them), the
               sequences holding one, and their share of the run's sum |delta|
    remaining  mismatch on kept tokens: mean |delta|, signed mean delta (section 3's bias),
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
from .grouped import Segments, TopValues
from .results import json_ready
from .runs import open_run, read_tokens
from .schema import CONVENTIONS, FORMAT_VERSION, RHO_GRID, TOKENS_FILE

SWEEP_RULES: tuple[str, ...] = ("min-p", "absolute")
MASS_COLUMN: dict[str, str] = {"min-p": "pruned_mass_minp", "absolute": "pruned_mass_abs"}
DEFAULT_MAX_BIAS = 0.05
GRID_RTOL = 1e-9  # a --rho value within this relative distance of a grid value IS that value
BIAS_QUANTILE = 95.0
MASS_BATCH_ROWS = 1 << 20  # token rows of the pruned-mass grid streamed at a time

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
class MassStats:
    """What the sweep reads of the pruned-mass grid (N positions, G grid values, S sequences)."""

    total: np.ndarray  # [G] float64, sum over positions of m(rho)
    max: np.ndarray  # [G] float64, largest m(rho) at any position
    seq_sum: np.ndarray  # [S, G] float64, per-sequence sum_t m(c_t): the bias bound
    count: int  # N

    @classmethod
    def of(cls, mass: np.ndarray, seg: Segments) -> MassStats:
        """From the whole grid in memory, mass [N, G]."""
        return cls(
            mass.sum(axis=0, dtype=np.float64),
            mass.max(axis=0).astype(np.float64),
            seg.sum_rows(mass),
            mass.shape[0],
        )


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
    pruned_mass: np.ndarray | None  # [N, G] float32 pruned mass per grid value (None: streamed)
    mass_stats: MassStats | None = None  # its summaries (computed from pruned_mass if None)

    @property
    def num_tokens(self) -> int:
        return int(self.delta.shape[0])

    @property
    def segments(self) -> Segments:
        """The sequences of the token rows (built once)."""
        seg = self.__dict__.get("_segments")
        if seg is None:
            seg = Segments.of(self.seq, self.num_sequences)
            object.__setattr__(self, "_segments", seg)
        return seg

    @property
    def stats(self) -> MassStats:
        """The pruned-mass summaries: given, or computed once from `pruned_mass`."""
        st = self.mass_stats or self.__dict__.get("_stats")
        if st is None:
            assert self.pruned_mass is not None
            st = MassStats.of(self.pruned_mass, self.segments)
            object.__setattr__(self, "_stats", st)
        return st


def sweep_columns(rule: str) -> list[str]:
    """The tokens.parquet columns the sweep reads under `rule`."""
    cols = ["seq_id", "p_train", "delta", "kept_train", MASS_COLUMN[check_rule(rule)]]
    if rule == "min-p":
        cols.insert(2, "p_max_train")
    return cols


def _grid_size_error(column: str, got: Any, size: int) -> MismatchError:
    return MismatchError(
        f"column {column} holds {got} values per token but the grid has {size}; the run's "
        "rho_grid and its table disagree"
    )


def prepare(
    tokens: pd.DataFrame,
    rule: str = "min-p",
    grid: Sequence[float] = RHO_GRID,
    mass: np.ndarray | None = None,
    mass_stats: MassStats | None = None,
) -> SweepInputs:
    """Turn a token table (tokens.parquet columns) into `SweepInputs`; checks shapes.

    mass: the pruned-mass grid [N, G] already read; mass_stats: its summaries, streamed by
    `load` (then the grid itself is not needed); both None take the grid from the table's
    list column."""
    check_rule(rule)
    mass_col = MASS_COLUMN[rule]
    if mass is None and mass_stats is None and mass_col not in tokens.columns:
        raise _no_grid_error("the token table", mass_col)
    _check_columns(tokens, rule)
    g = np.asarray(grid, dtype=np.float64)
    if mass is None and mass_stats is None:
        try:
            mass = np.stack(tokens[mass_col].to_numpy()).astype(np.float32, copy=False)  # [N, G]
        except (ValueError, TypeError) as e:
            raise MismatchError(
                f"column {mass_col} is not a list of {g.size} values per token"
            ) from e
    if mass is not None and (mass.ndim != 2 or mass.shape[1] != g.size):
        raise _grid_size_error(mass_col, mass.shape[-1], g.size)
    p = tokens["p_train"].to_numpy(dtype=np.float64)
    support = p > 0
    if "kept_train" in tokens.columns:
        support &= tokens["kept_train"].to_numpy(dtype=bool)
    seq, num = _seq_codes(tokens)
    return SweepInputs(
        rule=rule,
        grid=g,
        p_train=p.astype(np.float32),
        p_max_train=(tokens["p_max_train"].to_numpy(dtype=np.float32) if rule == "min-p" else None),
        delta=tokens["delta"].to_numpy(dtype=np.float64),
        support=support,
        seq=seq,
        num_sequences=num,
        pruned_mass=mass,
        mass_stats=mass_stats,
    )


def _check_columns(tokens: pd.DataFrame, rule: str) -> None:
    """The scalar columns `rule` needs are there, and the table is not empty."""
    need = [c for c in sweep_columns(rule) if c not in ("kept_train", MASS_COLUMN[rule])]
    missing = [c for c in need if c not in tokens.columns]
    if missing:
        raise MismatchError(f"the token table lacks column(s) {', '.join(missing)}")
    if len(tokens) == 0:
        raise MismatchError("the run has no generated tokens: nothing to sweep")


def _seq_codes(tokens: pd.DataFrame) -> tuple[np.ndarray, int]:
    """Sequence index 0..S-1 of each row (ordered by seq_id) [N], and S."""
    seq, uniq = pd.factorize(tokens["seq_id"], sort=True)
    return seq.astype(np.int64), len(uniq)


def load(
    path: str | Path,
    rule: str = "min-p",
    grid: Sequence[float] | None = None,
    keep_mass: bool = False,
    tokens: pd.DataFrame | None = None,
) -> SweepInputs:
    """Read the columns the sweep needs from a run directory (grid: the run's `rho_grid`).

    The pruned-mass grid is streamed into its summaries (`MassStats`), so memory never holds
    the [N, G] array; keep_mass=True also keeps it (`SweepInputs.pruned_mass`). tokens: the
    other columns (`sweep_columns`), when the caller has already read them from this run."""
    out = load_rules(path, [rule], grid, keep_mass, tokens)[rule]
    if isinstance(out, MismatchError):
        raise out
    return out


def load_rules(
    path: str | Path,
    rules: Sequence[str],
    grid: Sequence[float] | None = None,
    keep_mass: bool = False,
    tokens: pd.DataFrame | None = None,
) -> dict[str, SweepInputs | MismatchError]:
    """`load` for several rules at once, their pruned-mass columns streamed together; a
    rule the run cannot sweep (no grid column, no p_max_train) gets its MismatchError."""
    for r in rules:
        check_rule(r)
    run, meta = open_run(path, allow_incomplete=False)
    try:
        check_scored_import(run.path, meta)
    except MismatchError as e:  # corrections skips the DVP rows; the sweep command fails
        return {r: e for r in rules}
    file = run.path / TOKENS_FILE
    have = set(pq.read_schema(file).names) if file.is_file() else set()
    version = meta.get("format_version", 0)
    if grid is None:
        grid = meta.get("rho_grid") or RHO_GRID
    out: dict[str, SweepInputs | MismatchError] = {}
    ok = []
    for r in rules:
        if file.is_file() and MASS_COLUMN[r] not in have:
            out[r] = _no_grid_error(f"run {run.path} (format_version {version})", MASS_COLUMN[r])
        else:
            ok.append(r)
    if not ok:
        return out
    if tokens is None:  # the scalar columns of every rule, those the run has
        cols = [c for r in ok for c in sweep_columns(r) if c != MASS_COLUMN[r]]
        tokens = read_tokens(run.path, columns=[c for c in dict.fromkeys(cols) if c in have])
    for r in list(ok):  # a rule lacking a scalar column fails before any grid is read
        try:
            _check_columns(tokens, r)
        except MismatchError as e:
            out[r] = e
            ok.remove(r)
    if not ok:
        return {r: out[r] for r in rules}
    seq, num = _seq_codes(tokens)
    seg = Segments.of(seq, num)
    grids = read_mass_grids(file, [MASS_COLUMN[r] for r in ok], seg, len(grid), keep_mass)
    for r in ok:
        mass, stats = grids[MASS_COLUMN[r]]
        out[r] = prepare(tokens, r, grid, mass, stats)
    return {r: out[r] for r in rules}


def read_mass_grid(
    file: Path, column: str, seg: Segments, grid_size: int, keep: bool = False
) -> tuple[np.ndarray | None, MassStats]:
    """Stream one pruned-mass list column of a tokens.parquet (`read_mass_grids`)."""
    return read_mass_grids(file, [column], seg, grid_size, keep)[column]


def read_mass_grids(
    file: Path, columns: Sequence[str], seg: Segments, grid_size: int, keep: bool = False
) -> dict[str, tuple[np.ndarray | None, MassStats]]:
    """Stream pruned-mass list columns of a tokens.parquet, decoded in parallel (one thread
    per column): each one's `MassStats` and, if `keep`, its [N, G] float32 array. Memory
    holds one batch (no Python list per token); a sequence split across batches is summed
    in parts (`Segments.sum_rows`)."""
    import pyarrow.compute as pc

    N, S, G = seg.seq.size, seg.num, grid_size
    acc = {
        c: {
            "out": np.empty((N, G), dtype=np.float32) if keep else None,  # [N, G]
            "total": np.zeros(G),
            "max": np.full(G, -np.inf),
            "seq": np.zeros((S, G)),
        }
        for c in columns
    }
    i = 0
    # no pre-buffering: Arrow would otherwise keep every row group's pages (GBs at 10^7 rows)
    pf = pq.ParquetFile(file, pre_buffer=False, buffer_size=1 << 22)
    for batch in pf.iter_batches(columns=list(columns), batch_size=MASS_BATCH_ROWS):
        n = batch.num_rows
        if n == 0:
            continue
        if i + n > N:
            raise MismatchError(f"{file} does not have one row per token ({N} tokens)")
        sb = seg.seq[i : i + n]  # [n] the batch's sequences
        if seg.starts is not None:  # grouped in order: consecutive indices from sb[0]
            ids, local = sb[0] + np.arange(sb[-1] - sb[0] + 1), sb - sb[0]
        else:
            ids, local = np.unique(sb, return_inverse=True)
        part = Segments.of(local, ids.size)
        for c in columns:
            arr = batch.column(c)
            lengths = pc.min_max(pc.list_value_length(arr))
            lo, hi = lengths["min"].as_py(), lengths["max"].as_py()
            if arr.null_count or lo != G or hi != G:
                raise _grid_size_error(c, lo if lo != G else hi, G)
            vals = arr.flatten().to_numpy(zero_copy_only=False).reshape(n, G)  # [n, G]
            a = acc[c]
            if a["out"] is not None:
                a["out"][i : i + n] = vals
            a["total"] += vals.sum(axis=0, dtype=np.float64)
            np.maximum(a["max"], vals.max(axis=0), out=a["max"])
            np.add.at(a["seq"], ids, part.sum_rows(vals))
        i += n
    if i != N:
        raise MismatchError(f"{file} does not have one row per token ({N} tokens)")
    return {c: (a["out"], MassStats(a["total"], a["max"], a["seq"], N)) for c, a in acc.items()}


def _ratio(a: float, b: float) -> float:
    return a / b if (b != 0 and math.isfinite(a) and math.isfinite(b)) else float("nan")


def _suffix(x: np.ndarray) -> np.ndarray:
    """out[t] = sum(x[t:]) along the last axis (float64)."""
    return np.cumsum(x[..., ::-1], axis=-1, dtype=np.float64)[..., ::-1]


class _Table:
    """Every row of a sweep from a few passes over the tokens, whatever the grid size.

    The safe sets are nested (a larger rho keeps a subset: float32(rho) * p_max and the
    comparison are monotone), so each token has a level L: 0 outside the training side's
    support, else 1 + the number of grid values (ascending) that keep it. The tokens kept
    at the j-th smallest rho are those with L >= j + 2 (the baseline: L >= 1), and every
    kept-token sum of a row is a suffix sum of a per-level bincount. Quantiles come from
    the largest |delta| only (`_kept_quantile`).
    """

    def __init__(self, inp: SweepInputs) -> None:
        S, G = inp.num_sequences, inp.grid.size
        self.inp = inp
        self.order = np.argsort(inp.grid, kind="stable")  # [G] ascending
        self.level_of = np.empty(G, dtype=np.int64)  # grid index -> threshold t
        self.level_of[self.order] = np.arange(G) + 2
        L = inp.support.astype(np.int16)  # [N]
        for g in self.order:
            L += inp.support & kept_mask(inp.p_train, inp.p_max_train, inp.grid[g], inp.rule)
        self.L = L
        nb = G + 2
        fin = np.isfinite(inp.delta)  # [N]
        self.abs = np.where(fin, np.abs(inp.delta), 0.0)  # [N]
        d = np.where(fin, inp.delta, 0.0)
        k3 = metrics.k3_per_token(d)  # [N], 0 where not finite
        outside = fin & ((d > math.log(2)) | (d < -math.log(2)))  # r outside [0.5, 2]
        self.total_abs = float(self.abs.sum())
        self.n_suf = _suffix(np.bincount(L, minlength=nb))  # [nb] tokens with L >= t
        self.nf_suf = _suffix(np.bincount(L, weights=fin, minlength=nb))  # finite ones
        self.abs_suf = _suffix(np.bincount(L, weights=self.abs, minlength=nb))
        self.d_suf = _suffix(np.bincount(L, weights=d, minlength=nb))
        self.k3_suf = _suffix(np.bincount(L, weights=k3, minlength=nb))
        self.out_suf = _suffix(np.bincount(L, weights=outside, minlength=nb))
        lmax = np.full(nb, -np.inf)
        np.maximum.at(lmax, L, np.where(fin, self.abs, -np.inf))
        self.max_suf = np.maximum.accumulate(lmax[::-1])[::-1]  # [nb]
        seg = inp.segments
        self.seq_min_L = seg.min(L)  # [S] a sequence holds a pruned token iff < t
        self.seq_max_L = seg.max(np.where(fin, L, -1).astype(np.int16))  # holds a kept one iff >= t
        # per-sequence sum of delta over tokens with L >= t: [S, nb]
        M = np.bincount(inp.seq * nb + L, weights=d, minlength=S * nb).reshape(S, nb)
        self.seq_sum = _suffix(M)
        self.fin = fin
        self._top: TopValues | None = None
        # the pruned-mass grid: [G] mean and max, [S, G] per-sequence sums (bias bound)
        st = inp.stats
        self.mass_mean, self.mass_max = st.total / st.count, st.max
        self.bound_mean = st.total / S  # mean over sequences of their sums
        self.bound_p95 = np.percentile(st.seq_sum, BIAS_QUANTILE, axis=0)

    def _kept_quantile(self, t: int, q: float) -> float:
        """The q-quantile of |delta| over the finite tokens with L >= t (`TopValues`)."""
        if self._top is None:
            self._top = TopValues(self.abs, self.fin)
            self._top_L = self.L[self._top.index]
        return self._top.quantile(
            self._top_L >= t, int(self.nf_suf[t]), q, lambda: self.fin & (self.L >= t)
        )

    def row(self, t: int, rho: float | None, g: int | None) -> dict[str, Any]:
        """The row of the tokens with L >= t (grid index g; None: the baseline, t = 1)."""
        N = self.inp.num_tokens
        nf = self.nf_suf[t]
        has = self.seq_max_L >= t  # [S]
        pruned = N - int(self.n_suf[t])

        def mean(x: np.ndarray) -> float:
            return float(x[t] / nf) if nf else float("nan")

        return {
            "rho": rho,
            "pruned_tokens": pruned,
            "pruned_token_frac": pruned / N,
            "pruned_seq_frac": float((self.seq_min_L < t).mean()),
            "pruned_abs_delta_share": (
                (self.total_abs - float(self.abs_suf[t])) / self.total_abs
                if self.total_abs > 0
                else float("nan")
            ),
            "kept_mean_abs_delta": mean(self.abs_suf),
            "kept_mean_delta": mean(self.d_suf),
            "kept_k3": mean(self.k3_suf),
            "kept_seq_mean_abs_sum_delta": (
                float(np.abs(self.seq_sum[has, t]).mean()) if has.any() else float("nan")
            ),
            "kept_p99_abs_delta": self._kept_quantile(t, 0.99),
            "kept_max_abs_delta": float(self.max_suf[t]) if nf else float("nan"),
            "kept_frac_ratio_outside_0.5_2": mean(self.out_suf),
            "mean_pruned_mass": 0.0 if g is None else float(self.mass_mean[g]),
            "max_pruned_mass": 0.0 if g is None else float(self.mass_max[g]),
            "seq_bias_bound_mean": 0.0 if g is None else float(self.bound_mean[g]),
            "seq_bias_bound_p95": 0.0 if g is None else float(self.bound_p95[g]),
        }


def _table(inp: SweepInputs) -> _Table:
    """The inputs' `_Table`, built on first use and kept with them."""
    t = inp.__dict__.get("_table")
    if t is None:
        t = _Table(inp)
        object.__setattr__(inp, "_table", t)
    return t


def _with_rel(row: dict, base: dict) -> dict:
    for k in _REL_KEYS:
        row[f"{k}_rel"] = _ratio(row[k], base[k])
    return {k: row[k] for k in ROW_KEYS}


def baseline_row(inp: SweepInputs) -> dict[str, Any]:
    """The no-pruning row: only the training side's own truncation removes tokens."""
    base = _table(inp).row(1, None, None)
    return _with_rel(base, base)


def sweep_row(inp: SweepInputs, rho: float, index: int, base: dict[str, Any]) -> dict[str, Any]:
    """The row at grid value `rho` = inp.grid[index]; `base` is `baseline_row(inp)`."""
    tab = _table(inp)
    return _with_rel(tab.row(int(tab.level_of[index]), rho, index), base)


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
    "MassStats",
    "SweepInputs",
    "baseline_row",
    "check_rule",
    "kept_mask",
    "load",
    "load_rules",
    "parse_rhos",
    "prepare",
    "read_mass_grid",
    "read_mass_grids",
    "recommend",
    "resolve_rhos",
    "rows_frame",
    "sweep",
    "sweep_columns",
    "sweep_row",
]
