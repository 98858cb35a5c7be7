"""`mismatch corrections RUN`: every correction of `correction_rules` applied to a run's
stored tokens, side by side: what each one masks, clips, leaves behind and costs, the
Pareto front and the decision (docs/corrections.md shows how to read the result).

Memory: `corrections(path)` streams the token table in batches (`tokens.TokenBatches`), in
three passes: seq_id (and step); the per-sequence sums and the DVP rules' sweeps; every
method on each batch, each accumulating its summaries (`Summary`: counts and sums, [S]
per-sequence kept rows and weights). Nothing of size N (tokens) is held beyond a batch.
Counts, sums, means, maxima, ESS and shares are exact (float64, summed batch by batch); the
p99 |delta| each method leaves is exact up to `quantiles.EXACT_LIMIT` finite tokens and
from the quantile sketch beyond (relative error <= 0.5%; the result's `quantiles` key says
which). A token with an infinite delta (the training side's own truncation removed it;
`kept_train` False) is masked by every method, since no framework can give it a finite
weight, and a sequence holding one is masked by every sequence-level method.

The DVP rows (`dvp-minp`, `dvp-abs`) are the seed paper's pruning, taken from `sweep.py`:
its recommendation rule picks rho (unless `--rho` / `--set dvp-*.rho=` gives one), its
`kept_mask` decides which sampled tokens leave the safe set, and its rows give the bias
bound and the curve through every grid value. A run without the pruned-mass grid (or
without `p_max_train` for min-p) gets a `skipped` note on those rows; the others still work.

Optional token columns: `advantage` (imported runs) gives each method's share of the
advantage-weighted signal removed (sum |A_t| over masked tokens / sum |A_t|) and makes it the
x axis of the Pareto front; `step` gives the masked fraction per training step.
No torch here: the command must start fast.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import kernels, metrics
from .correction_rules import (
    METHODS,
    SEQ_DECISIONS,
    Applied,
    SeqAccumulator,
    SeqDecision,
    check_methods,
    resolve_params,
    rule_dvp,
    rule_none,
)
from .errors import MismatchError
from .formatting import fmt, params_text, pct
from .per_sequence import BatchSeqs, SeqIndex, distinct
from .quantiles import EXACT_LIMIT, KeyedQuantiles
from .results import json_ready
from .tokens import BATCH_ROWS, TokenBatches, frame_tokens, open_run_tokens, prefetch

LOG2 = math.log(2.0)


# ----------------------------------------------------------------------------- run tokens

BASE_COLUMNS: tuple[str, ...] = ("seq_id", "delta", "p_train")
OPTIONAL_COLUMNS: tuple[str, ...] = ("kept_train", "advantage", "step", "p_max_train")


@dataclass
class RunTokens:
    """Token rows prepared for the rules and summaries (n rows): one batch of a streamed run,
    or a whole table in memory (`run_tokens`). Sequence and step indices are the run's."""

    delta: np.ndarray  # [n] float64, +inf where the training side's truncation removed it
    seq: np.ndarray  # [n] int64 sequence index 0..S-1
    num_sequences: int  # S, of the whole run
    bucket: np.ndarray  # [n] int64 bucket of p_train in `edges`, -1 outside
    edges: np.ndarray  # [B + 1]
    advantage: np.ndarray | None  # [n] float64, NaN -> 0
    step: np.ndarray | None  # [n] int64 index into step_values (-1: no step)
    step_values: np.ndarray | None  # [K] the run's distinct steps, ascending
    finite: np.ndarray  # [n] bool
    abs_delta: np.ndarray  # [n] |delta|, 0 where infinite
    k3: np.ndarray  # [n] k3_t = exp(d) - 1 - d, unclamped, 0 where infinite
    outside: np.ndarray  # [n] bool: r outside [0.5, 2]
    support: np.ndarray  # [n] bool: p_train > 0 and kept_train (the sweep's support)
    p_train: np.ndarray  # [n] float32 (DVP's kept mask)
    p_max_train: np.ndarray | None  # [n] float32 (DVP min-p)
    totals: dict[str, Any]  # sums over these rows; per method only the masked side is read

    @property
    def num_tokens(self) -> int:
        return int(self.delta.size)


def _token_delta(b: dict[str, np.ndarray]) -> np.ndarray:
    """delta [n] float64 with +inf where kept_train is False or delta is NaN."""
    delta = np.array(b["delta"], dtype=np.float64)  # a copy
    if "kept_train" in b:
        delta[~np.asarray(b["kept_train"], dtype=bool)] = np.inf
    delta[np.isnan(delta)] = np.inf  # NaN counts as infinite
    return delta


def _step_codes(values: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Index of each row's step in `values` (sorted), -1 where the step is missing. [n]"""
    missing = np.asarray(pd.isna(step), dtype=bool)
    codes = np.full(step.shape, -1, dtype=np.int64)
    codes[~missing] = np.searchsorted(values, step[~missing])
    return codes


def _ahead(src: TokenBatches, batches: Iterator[dict[str, np.ndarray]]) -> Iterator[Any]:
    """A file's batches decoded one ahead in a thread (`tokens.prefetch`: Arrow's decode
    beside the numpy and compiled work on this batch); a frame's as they are."""
    return prefetch(batches) if src.file is not None else batches


def _prepare(
    b: dict[str, np.ndarray],
    seq: np.ndarray,
    num_sequences: int,
    edges: np.ndarray,
    step_values: np.ndarray | None,
) -> RunTokens:
    """A batch of token columns (BASE_COLUMNS and the OPTIONAL_COLUMNS it has) as RunTokens."""
    from .aggregates import bucket_index

    delta = _token_delta(b)
    finite = np.isfinite(delta)
    abs_delta = np.where(finite, np.abs(delta), 0.0)
    p = np.asarray(b["p_train"], dtype=np.float64)
    support = p > 0
    if "kept_train" in b:
        support &= np.asarray(b["kept_train"], dtype=bool)
    adv = None
    if "advantage" in b:
        adv = np.nan_to_num(np.asarray(b["advantage"], dtype=np.float64), nan=0.0)
    step = None
    if step_values is not None and "step" in b:
        step = _step_codes(step_values, b["step"])
    t = RunTokens(
        delta=delta,
        seq=np.asarray(seq, dtype=np.int64),
        num_sequences=int(num_sequences),
        bucket=bucket_index(p, edges),
        edges=edges,
        advantage=adv,
        step=step,
        step_values=step_values if step is not None else None,
        finite=finite,
        abs_delta=abs_delta,
        k3=metrics.k3_per_token(np.where(finite, delta, 0.0)),
        outside=finite & (abs_delta > LOG2),
        support=support,
        p_train=p.astype(np.float32),
        p_max_train=(
            np.asarray(b["p_max_train"], dtype=np.float32) if "p_max_train" in b else None
        ),
        totals={},
    )
    t.totals = _totals(t)
    return t


def run_tokens(df: pd.DataFrame, edges: Sequence[float] | np.ndarray | None = None) -> RunTokens:
    """A whole token table in memory as RunTokens (seq_id, delta, p_train; optional
    kept_train, advantage, step, p_max_train): the streamed path's batch, in one batch."""
    from .aggregates import parse_edges

    src = frame_tokens(df, verb="correct", needed=BASE_COLUMNS, batch_rows=max(len(df), 1))
    cols = [*BASE_COLUMNS, *(c for c in OPTIONAL_COLUMNS if c in src.columns)]
    (b,) = src.read(cols, batch_rows=src.num_rows)
    seqs = SeqIndex.scan([b["seq_id"]])
    steps = _step_values([b["step"]]) if "step" in b else None
    return _prepare(b, seqs.codes(b["seq_id"]), seqs.num, parse_edges(edges), steps)


def _step_values(chunks: Iterable[np.ndarray]) -> np.ndarray | None:
    """The distinct non-missing steps, sorted (None when there are none)."""
    parts = [distinct(c[~np.asarray(pd.isna(c), dtype=bool)]) for c in chunks]
    parts = [p for p in parts if p.size]
    return np.unique(np.concatenate(parts)) if parts else None


def _totals(t: RunTokens) -> dict[str, Any]:
    """Sums over the rows, so that a method's kept-token sums are totals minus the
    (usually few) masked rows."""
    B = len(t.edges) - 1
    tot: dict[str, Any] = {
        "finite": int(np.count_nonzero(t.finite)),
        "abs": float(t.abs_delta.sum()),
        "k3": float(t.k3.sum()),
        "outside": int(np.count_nonzero(t.outside)),
        "bucket": np.bincount(t.bucket + 1, minlength=B + 1)[1:],
    }
    if t.advantage is not None:
        tot["adv"] = float(np.abs(t.advantage).sum())
    if t.step is not None and t.step_values is not None:
        K = len(t.step_values)
        tot["step"] = np.bincount(t.step + 1, minlength=K + 1)[1:]
        tot["step_abs"] = np.bincount(t.step + 1, weights=t.abs_delta, minlength=K + 1)[1:]
    return tot


# ----------------------------------------------------------------------------- summaries


def _share(part: float, total: float) -> float:
    return part / total if total > 0 else float("nan")


def _ess(w: np.ndarray) -> float:
    """(sum w)^2 / (n sum w^2) = 1 / mean((w / mean w)^2); NaN if empty or all zero."""
    s2 = float(np.dot(w, w))
    return float(w.sum()) ** 2 / (w.size * s2) if w.size and s2 > 0 else float("nan")


def _side(mask: np.ndarray, count: int) -> tuple[np.ndarray, bool]:
    """Row indices of the smaller side of a mask: (indices, True) of the True rows if they
    are at most half, else (indices of the False rows, False). Sums over a side are read
    from these rows only; the other side's are totals minus them."""
    if count <= mask.size // 2:
        return np.flatnonzero(mask), True
    return np.flatnonzero(~mask), False


def _per_group(idx: np.ndarray, on_true: bool, group: np.ndarray, total: np.ndarray) -> np.ndarray:
    """Rows of the mask's True side per group (-1 = none): from the side `idx` holds."""
    m = total.size + 1
    c = np.bincount(group[idx] + 1, minlength=m)[1:]
    return c if on_true else total - c


class Summary:
    """One method's summaries accumulated over batches of token rows: every per-method
    quantity of the issue (the keys of a method object, less name, params, level,
    bias_bound and skipped). Counts and sums are exact (float64); kept-token sums are a
    batch's totals minus its masked rows (or sums over the kept rows, whichever side is
    smaller); weights are 0 on masked tokens, so their sums run over all rows. Per
    sequence [S]: kept rows and the sum of weights (sequence ESS, sequences masked)."""

    def __init__(
        self,
        num_sequences: int,
        edges: np.ndarray,
        step_values: np.ndarray | None,
        has_advantage: bool,
    ) -> None:
        S, B = int(num_sequences), len(edges) - 1
        K = 0 if step_values is None else len(step_values)
        self.S, self.edges, self.step_values = S, edges, step_values
        self.has_advantage = has_advantage
        self.N = self.n_masked = self.n_clip = self.fin_total = self.fin_masked = 0
        self.abs_total = self.abs_kept = self.k3_kept = self.out_kept = 0.0
        self.sw = self.sw2 = self.excess = self.adv_total = self.adv_removed = 0.0
        self.abs_removed = self.w_mean = self.w_m2 = 0.0
        self.w_count = 0
        self.wmax = -math.inf
        self.kept_seq = np.zeros(S)  # [S] rows not masked
        self.w_seq = np.zeros(S)  # [S] sum of weights
        self.bucket_n = np.zeros(B, dtype=np.int64)
        self.masked_b = np.zeros(B, dtype=np.int64)
        self.clipped_b = np.zeros(B, dtype=np.int64)
        self.step_n = np.zeros(K, dtype=np.int64)
        self.step_masked = np.zeros(K, dtype=np.int64)
        self.step_clipped = np.zeros(K, dtype=np.int64)
        self.step_left_abs = np.zeros(K)

    def grow(self, k: int) -> None:
        """Make room for k more sequences (indices S..S+k-1): a stream whose batches bring
        new, whole sequences (`SequenceStream`)."""
        self.kept_seq = np.concatenate([self.kept_seq, np.zeros(k)])
        self.w_seq = np.concatenate([self.w_seq, np.zeros(k)])
        self.S += int(k)

    def add(self, a: Applied, t: RunTokens, bs: BatchSeqs) -> None:
        """Add a batch's rows `t` (sequences bs) under the rule's result `a`."""
        tot = t.totals
        n_rows = t.num_tokens
        n_masked = int(np.count_nonzero(a.masked))
        idx, on_masked = _side(a.masked, n_masked)
        mask = np.ascontiguousarray(a.masked, dtype=np.bool_)

        def sides(x: np.ndarray, total: float) -> tuple[float, float]:
            """(sum over the kept rows, over the masked rows), both summed directly in one
            pass: a total minus the other side would leave rounding of the order of the
            total (a k3 left of 3e-15 where every kept token has k3 = 0). x as it is (bool,
            float32 or float64: the kernel adds each value in float64), not cast first."""
            return kernels.split_sums(mask, np.ascontiguousarray(x))

        def kept_sum(x: np.ndarray, total: float) -> float:
            return sides(x, total)[0]

        self.N += n_rows
        self.n_masked += n_masked
        self.fin_total += tot["finite"]
        self.abs_total += tot["abs"]
        abs_kept, abs_removed = sides(t.abs_delta, tot["abs"])
        self.abs_kept += abs_kept
        self.abs_removed += abs_removed
        self.k3_kept += kept_sum(t.k3, tot["k3"])
        self.out_kept += kept_sum(t.outside, tot["outside"])
        kept = n_rows - n_masked  # all finite
        self.fin_masked += (
            int(np.count_nonzero(t.finite[idx])) if on_masked else tot["finite"] - kept
        )
        w = a.weight  # [n], 0 where masked
        self.sw += float(w.sum())
        self.sw2 += float(np.dot(w, w))
        wk = w[idx] if not on_masked else w[~a.masked]  # [kept] the unmasked weights
        if wk.size:  # Chan et al.'s merge of (count, mean, M2): std without cancellation
            m, m2 = float(wk.mean()), float(np.square(wk - wk.mean()).sum())
            n0, n1 = self.w_count, int(wk.size)
            step = m - self.w_mean
            self.w_mean += step * n1 / (n0 + n1)
            self.w_m2 += m2 + step * step * n0 * n1 / (n0 + n1)
            self.w_count = n0 + n1
        self.wmax = max(self.wmax, float(w.max()))
        self.kept_seq[bs.ids] += bs.part.sizes() - bs.part.sum(a.masked)
        bs.add(self.w_seq, w)
        if a.excess is not None:
            self.excess += float(a.excess.sum())
        if t.advantage is not None:
            self.adv_total += tot["adv"]
            self.adv_removed += sides(np.abs(t.advantage), tot["adv"])[1]
        self.bucket_n += tot["bucket"]
        self.masked_b += _per_group(idx, on_masked, t.bucket, tot["bucket"])
        n_clip = int(np.count_nonzero(a.clipped))
        self.n_clip += n_clip
        cidx, c_on = _side(a.clipped, n_clip)
        self.clipped_b += _per_group(cidx, c_on, t.bucket, tot["bucket"])
        if t.step is not None and self.step_values is not None:
            ks = tot["step"]
            self.step_n += ks
            self.step_masked += _per_group(idx, on_masked, t.step, ks)
            self.step_clipped += _per_group(cidx, c_on, t.step, ks)
            part = np.bincount(t.step[idx] + 1, weights=t.abs_delta[idx], minlength=ks.size + 1)
            self.step_left_abs += tot["step_abs"] - part[1:] if on_masked else part[1:]

    def result(self, p99: float, max_abs: float) -> dict[str, Any]:
        """The summaries; p99 and max_abs: the quantiles of |delta| over the kept tokens."""
        N, S = self.N, self.S
        n = N - self.n_masked  # tokens that still carry gradient (all finite)
        nan = float("nan")
        w_mean = self.sw / n if n else nan
        alive = self.kept_seq > 0  # [S] sequences not masked whole
        w_seq = self.w_seq[alive] / self.kept_seq[alive]
        adv_share = None
        if self.has_advantage:
            adv_share = _share(self.adv_removed, self.adv_total)
        e, kb = self.edges, self.bucket_n
        with np.errstate(invalid="ignore", divide="ignore"):
            by_bucket = [
                {"lo": e[i], "hi": e[i + 1], "num_tokens": kb[i],
                 "masked": self.masked_b[i] / kb[i], "clipped": self.clipped_b[i] / kb[i]}
                for i in range(len(e) - 1)
            ]  # fmt: skip
            by_step = None
            if self.step_values is not None:
                ks, ms, cs = self.step_n, self.step_masked, self.step_clipped
                by_step = [
                    {"step": v, "num_tokens": ks[i], "masked": ms[i] / ks[i],
                     "clipped": cs[i] / ks[i],
                     "left_mean_abs_delta": self.step_left_abs[i] / (ks[i] - ms[i])}
                    for i, v in enumerate(self.step_values)
                ]  # fmt: skip
        return {
            "tokens_masked": self.n_masked / N,
            "sequences_masked": float((~alive).mean()) if S else nan,
            "tokens_clipped": self.n_clip / N,
            "weight_mean": w_mean,
            "weight_std": math.sqrt(self.w_m2 / n) if n else nan,
            "weight_max": self.wmax if n else nan,  # weights are >= 0, masked ones 0
            "ess_token": self.sw**2 / (n * self.sw2) if n and self.sw2 > 0 else nan,
            "ess_seq": _ess(w_seq),
            "left_mean_abs_delta": self.abs_kept / n if n else nan,
            "left_k3": self.k3_kept / n if n else nan,
            "left_p99_abs_delta": p99,
            "left_max_abs_delta": max_abs,
            "left_frac_ratio_outside_0.5_2": self.out_kept / n if n else nan,
            "removed_token_share": _share(self.fin_masked, self.fin_total),
            "removed_abs_delta_share": _share(self.abs_removed, self.abs_total),
            "clipped_mass_per_seq": self.excess / S if S else 0.0,
            "removed_advantage_share": adv_share,
            "by_bucket": by_bucket,
            "by_step": by_step,
        }


def _keep_all(keys: np.ndarray) -> np.ndarray:
    return np.ones(keys.shape, dtype=bool)


def summarize_method(a: Applied, t: RunTokens) -> dict[str, Any]:
    """Every per-method quantity of a rule's result `a` on the rows `t` (one table in
    memory: the streamed path's `Summary` over one batch)."""
    acc = Summary(t.num_sequences, t.edges, t.step_values, t.advantage is not None)
    acc.add(a, t, BatchSeqs(t.seq))
    q = KeyedQuantiles()
    keep = ~a.masked  # finite tokens only
    q.add(t.abs_delta[keep], np.zeros(int(np.count_nonzero(keep)), dtype=np.int32))
    return acc.result(q.quantile(_keep_all, 0.99), q.quantile(_keep_all, 1.0))


class SequenceStream:
    """The corrections over a stream of batches that each hold WHOLE sequences (a
    trainer's steps: `monitor.StepMonitor`), with the same rules, decisions and summaries
    as `corrections` on a run: per batch, the sequence-level rules decide from that
    batch's per-sequence sums, every method applies to the batch's tokens, and each method's
    `Summary` accumulates over the stream (its sequences grow batch by batch). `add` returns
    the batch's own summaries; `rows()` the stream's, as `corrections` gives them for a run
    holding the same tokens. DVP rows need the pruned-mass grid and are not streamed here.

    delta = logp_infer - logp_train; non-finite deltas count as infinite (masked by every
    method, their sequences dropped by every sequence-level one), as everywhere."""

    def __init__(
        self,
        methods: Iterable[str] | None = None,
        overrides: Mapping[str, Mapping[str, float]] | None = None,
        edges: Sequence[float] | str | None = None,
        exact_limit: int = EXACT_LIMIT,
    ) -> None:
        from .aggregates import parse_edges

        names = [n for n in check_methods(methods) if METHODS[n].dvp_rule is None]
        overrides = overrides or {}
        self.params = {n: resolve_params(n, overrides.get(n)) for n in names}
        self.names = names
        self.edges = parse_edges(edges)
        self.total = {n: Summary(0, self.edges, None, False) for n in ["", *names]}
        self.bits = {n: 1 << j for j, n in enumerate(self.total)}  # "" : all tokens
        self.quantiles = KeyedQuantiles(exact_limit)
        self.num_tokens = 0

    def add(
        self, delta: np.ndarray, seq: np.ndarray, p_train: np.ndarray
    ) -> dict[str, dict[str, Any]]:
        """Add a batch: delta [n], seq [n] the sequence of each row (0..k-1, rows of one
        sequence together, every sequence whole), p_train [n]. Returns {method: its
        `Summary.result` on this batch} ("" is no correction, every token)."""
        seq = np.asarray(seq, dtype=np.int64)
        k = int(seq.max()) + 1 if seq.size else 0
        b = {"delta": np.asarray(delta, dtype=np.float64), "p_train": p_train}
        t = _prepare(b, seq, k, self.edges, None)
        local = BatchSeqs(seq)
        acc = SeqAccumulator(k)
        acc.add(t.delta, local)
        view = acc.view()
        decisions = {
            n: SEQ_DECISIONS[m.rule](view, **self.params[n])
            for n in self.names
            if (m := METHODS[n]).rule in SEQ_DECISIONS
        }
        start = self.total[""].S
        glob = BatchSeqs(seq + start)
        keys = np.zeros(t.num_tokens, dtype=np.int32)
        step_q = KeyedQuantiles(self.quantiles.exact_limit)
        step: dict[str, Summary] = {}
        for n, total in self.total.items():
            a = _apply(n, t, self.params.get(n, {}), decisions, {})
            total.grow(k)
            total.add(a, t, glob)
            step[n] = Summary(k, self.edges, None, False)
            step[n].add(a, t, local)
            keys |= np.where(a.masked, 0, self.bits[n]).astype(np.int32)
        self.quantiles.add(t.abs_delta[t.finite], keys[t.finite])
        step_q.add(t.abs_delta[t.finite], keys[t.finite])
        self.num_tokens += t.num_tokens
        return {n: self._result(s, step_q, n) for n, s in step.items()}

    def _result(self, s: Summary, q: KeyedQuantiles, name: str) -> dict[str, Any]:
        bit = self.bits[name]

        def kept(keys: np.ndarray) -> np.ndarray:
            return (keys & bit) != 0

        return s.result(q.quantile(kept, 0.99), q.quantile(kept, 1.0))

    def rows(self) -> list[dict[str, Any]]:
        """The stream's method rows (METHOD_KEYS each, bias_bound None): what
        `corrections` gives for a run of the same tokens."""
        return json_ready(
            [
                _row(n, self.params[n], self._result(self.total[n], self.quantiles, n))
                for n in self.names
            ]
        )


# Keys of every method object, in order (docs/formats.md).
METHOD_KEYS: tuple[str, ...] = (
    "name",
    "level",
    "kind",
    "params",
    "skipped",
    "tokens_masked",
    "sequences_masked",
    "tokens_clipped",
    "weight_mean",
    "weight_std",
    "weight_max",
    "ess_token",
    "ess_seq",
    "left_mean_abs_delta",
    "left_k3",
    "left_p99_abs_delta",
    "left_max_abs_delta",
    "left_frac_ratio_outside_0.5_2",
    "removed_token_share",
    "removed_abs_delta_share",
    "clipped_mass_per_seq",
    "bias_bound",
    "removed_advantage_share",
    "by_bucket",
    "by_step",
)
SCALAR_KEYS: tuple[str, ...] = tuple(
    k for k in METHOD_KEYS if k not in ("params", "by_bucket", "by_step")
)


def _skipped(name: str, params: dict[str, Any], why: str) -> dict[str, Any]:
    row = dict.fromkeys(METHOD_KEYS)
    m = METHODS[name]
    row.update(name=name, level=m.level, kind=m.kind, params=params, skipped=why)
    return row


def _row(name: str, params: dict[str, Any], summary: dict[str, Any], bias: Any = None) -> dict:
    m = METHODS[name]
    row = {"name": name, "level": m.level, "kind": m.kind, "params": params, "skipped": None}
    row.update(summary)
    row["bias_bound"] = bias
    return {k: row[k] for k in METHOD_KEYS}


# ----------------------------------------------------------------------------- DVP


def _dvp_plan(
    name: str, params: dict[str, Any], res: dict[str, Any], grid: np.ndarray, num_tokens: int
) -> tuple[dict[str, Any], float, dict[str, Any]] | str:
    """A DVP row's threshold from its rule's sweep result `res` (recommendation, or the
    given rho): (params with rho and rho_from, bias bound, the curve through every grid
    value), or why the row is skipped."""
    from . import sweep as sw

    rows, rec = res["rows"], res["recommended"]
    rho = params["rho"]
    chosen = "given"
    if rho is None:
        rho, chosen = rec["rho"], "recommended"
        if rho is None:
            return f"no rho recommended: {rec['reason']}"
    rho, _ = sw.resolve_rhos([rho], grid)[0]  # off-grid -> MismatchError
    row = next(r for r in rows if r["rho"] == rho)
    base = res["baseline"]
    n_support = num_tokens - base["pruned_tokens"]
    curve = {
        "name": name,
        "rule": res["rule"],
        "rho": rho,
        "recommended": rec["rho"],
        "points": [
            {
                "rho": r["rho"],
                "removed_token_share": _share(
                    r["pruned_tokens"] - base["pruned_tokens"], n_support
                ),
                "left_k3": r["kept_k3"],
                "left_p99_abs_delta": r["kept_p99_abs_delta"],
                "bias_bound": r["seq_bias_bound_mean"],
            }
            for r in rows
        ],
    }
    return {**params, "rho": rho, "rho_from": chosen}, row["seq_bias_bound_mean"], curve


# ----------------------------------------------------------------------------- Pareto, verdict


def pareto(rows: Sequence[dict[str, Any]], x: str, y: str = "left_k3") -> list[str]:
    """Names of the rows no other row beats on both `x` and `y` (lower is better on both;
    ties stay on the front), ordered by x. Rows with a missing x or y are left out."""
    pts = [
        (r["name"], r[x], r[y])
        for r in rows
        if r.get(x) is not None
        and r.get(y) is not None
        and math.isfinite(r[x])
        and math.isfinite(r[y])
    ]
    front = [
        (n, a, b)
        for n, a, b in pts
        if not any(a2 <= a and b2 <= b and (a2 < a or b2 < b) for _, a2, b2 in pts)
    ]
    return [n for n, _, _ in sorted(front, key=lambda p: (p[1], p[2]))]


# The decision: the method to use on this run, from the table (docs/corrections.md).
DECISION_BUDGET = 0.01  # at most this share of the tokens (or advantage signal) removed ...
DECISION_MIN_GAIN = 0.05  # ... for at least this relative cut of k3; else no correction


def decide(
    result: dict[str, Any], budget: float = DECISION_BUDGET, min_gain: float = DECISION_MIN_GAIN
) -> dict[str, Any]:
    """Which method to use on this run, and why: among the Pareto-front methods that remove
    at most `budget` of the finite tokens (of the advantage-weighted signal when the run
    has advantages), the one leaving the least k3, if it cuts k3 by at least `min_gain`
    relative to no correction; otherwise no correction (`none`). Ties go to the smaller
    share removed, then to registry order. A reweighting-only method never wins on k3 (it
    removes no token, so the k3 on the tokens is unchanged): it bounds weights instead.

    Returns {method, params, budget, min_gain, gain, removed, reason}: gain = 1 - k3 left /
    k3 none, removed = the share on the Pareto x axis."""
    x = result["pareto_axes"]["x"]
    rows = {r["name"]: r for r in result["methods"]}
    k0 = result["all_tokens"]["k3"]
    what = "advantage-weighted signal" if x == "removed_advantage_share" else "tokens"
    out: dict[str, Any] = {"budget": budget, "min_gain": min_gain}

    def gain(r: dict[str, Any]) -> float:
        return 1.0 - r["left_k3"] / k0 if k0 else 0.0

    cands = [
        rows[n] for n in result["pareto"]
        if n != "none" and rows[n][x] is not None and rows[n][x] <= budget
    ]  # fmt: skip
    order = {n: i for i, n in enumerate(rows)}
    best = min(cands, key=lambda r: (r["left_k3"], r[x], order[r["name"]]), default=None)
    if best is not None and k0 and gain(best) >= min_gain:
        out.update(method=best["name"], params=best["params"], gain=gain(best), removed=best[x])
        out["reason"] = (
            f"of the methods removing at most {pct(budget)} of the {what}, it leaves the least "
            f"mismatch: k3 {fmt(best['left_k3'])} ({1 - gain(best):.2f}x none) for "
            f"{pct(best[x])} removed"
        )
        return out
    out.update(method="none", params={}, gain=0.0, removed=0.0)
    if not k0:
        out["reason"] = "the tokens carry no mismatch (k3 = 0): there is nothing to correct"
        return out
    if best is None:
        why = f"no method removing at most {pct(budget)} of the {what} lowers k3"
    else:
        why = (
            f"within a budget of {pct(budget)} of the {what} removed, the best "
            f"({best['name']}) cuts k3 by only {pct(gain(best))} (less than {pct(min_gain)})"
        )
    beyond = [
        rows[n] for n in result["pareto"]
        if n != "none" and rows[n][x] is not None and rows[n][x] > budget and gain(rows[n]) > 0
    ]  # fmt: skip
    if beyond:
        cheapest = min(beyond, key=lambda r: r[x])
        why += (
            f"; the cheapest method that lowers it further, {cheapest['name']}, removes "
            f"{pct(cheapest[x])} for {1 - gain(cheapest):.2f}x"
        )
    out["reason"] = why
    return out


def _names(ns: Sequence[str], most: int = 3) -> str:
    """'a, b, c' or 'a, b, c and 7 more': long ties stay one short clause."""
    if len(ns) <= most:
        return ", ".join(ns)
    return f"{', '.join(ns[:most])} and {len(ns) - most} more"


def corrections_verdict(result: dict[str, Any]) -> str:
    """The plain-words paragraph, decision first (`decide`): which method to use and why,
    then the mismatch without a correction, the Pareto front (ties merged), the methods
    that only reweight or do nothing, DVP's cost, skipped rows."""
    rows = {r["name"]: r for r in result["methods"]}
    base = result["all_tokens"]
    x = result["pareto_axes"]["x"]
    what = "advantage-weighted signal" if x == "removed_advantage_share" else "tokens"
    k0 = base["k3"]
    d = result["decision"]
    if d["method"] == "none":
        parts = [f"Decision: no correction on this run. {d['reason'][0].upper()}{d['reason'][1:]}."]
    else:
        bounds = params_text(d["params"])
        parts = [
            f"Decision: use {d['method']} ({bounds}). {d['reason'][0].upper()}{d['reason'][1:]}."
        ]
    parts.append(
        f"Without a correction the {result['num_finite']:,} finite tokens carry k3 = "
        f"{fmt(k0)} (mean |delta| {fmt(base['mean_abs_delta'])}, p99 |delta| "
        f"{fmt(base['p99_abs_delta'])} nats)"
        + (
            f"; {result['num_infinite']:,} token(s) with an infinite delta are masked by every "
            "method."
            if result["num_infinite"]
            else "."
        )
    )
    groups: list[tuple[list[str], dict[str, Any]]] = []  # front points, ties merged
    for n in result["pareto"]:
        r = rows[n]
        if groups and (groups[-1][1][x], groups[-1][1]["left_k3"]) == (r[x], r["left_k3"]):
            groups[-1][0].append(n)
        else:
            groups.append(([n], r))
    front = []
    for ns, r in groups:
        rel = f", {r['left_k3'] / k0:.2f}x none" if k0 else ""
        front.append(f"{_names(ns)} ({pct(r[x])} removed, k3 {fmt(r['left_k3'])}{rel})")
    if front:
        parts.append(f"On the Pareto front of ({what} removed, k3 left): {'; '.join(front)}.")
    live = {n: r for n, r in rows.items() if r["skipped"] is None and n != "none"}
    reweight = [n for n, r in live.items() if not r["removed_token_share"] and r["tokens_clipped"]]
    if reweight:
        one = len(reweight) == 1
        parts.append(
            f"{_names(reweight)} only reweight{'s' if one else ''}: "
            f"{'it drops' if one else 'they drop'} no finite token, so the mismatch on the "
            "tokens that carry gradient stays where it was; the weights are bounded instead "
            "(clipped share and ESS in the table)."
        )
    idle = [n for n, r in live.items() if not r["removed_token_share"] and not r["tokens_clipped"]]
    if idle:
        parts.append(f"{_names(idle)} neither mask nor clip a token on this run at these bounds.")
    for n in ("dvp-minp", "dvp-abs"):
        r = rows.get(n)
        if r is not None and r["skipped"] is None:
            p = r["params"]
            parts.append(
                f"{n} at rho = {p['rho']:g} ({p['rho_from']}) removes {pct(r['removed_token_share'])}"
                f" of the tokens and leaves k3 {fmt(r['left_k3'])}, at a mean per-sequence bias "
                f"bound of {fmt(r['bias_bound'])}."
            )
    skipped = [f"{n} ({r['skipped']})" for n, r in rows.items() if r["skipped"] is not None]
    if skipped:
        parts.append(f"Skipped: {'; '.join(skipped)}.")
    return " ".join(parts)


# ----------------------------------------------------------------------------- entry


def corrections(
    source: pd.DataFrame | str | Path,
    methods: Iterable[str] | None = None,
    overrides: Mapping[str, Mapping[str, float]] | None = None,
    rho: float | None = None,
    edges: Sequence[float] | str | None = None,
    grid: Sequence[float] | None = None,
    *,
    batch_rows: int = BATCH_ROWS,
    exact_limit: int = EXACT_LIMIT,
    sweeps_out: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Apply every correction (or `methods`) to a run (path) or a token table.

    overrides: {method: {key: value}} (`parse_sets`); rho: the DVP threshold (default: the
    sweep's recommendation); edges: probability buckets of `by_bucket` (default the
    report's); grid: pruning grid of a DataFrame source (default schema.RHO_GRID).

    The table is streamed `batch_rows` rows at a time in three passes: seq_id (and step),
    then the per-sequence sums the sequence-level rules decide on (and the DVP rules'
    sweeps, with the pruned-mass grids), then every method on each batch. Memory holds one
    batch and S-sized arrays; quantiles are exact up to `exact_limit` finite tokens.
    Returns a strict-JSON dict: run, num_tokens, num_sequences, num_finite, num_infinite,
    edges, has_advantage, has_step, all_tokens, methods (METHOD_KEYS each, registry order),
    pareto (names), pareto_axes, dvp_curves, verdict, warnings, quantiles, conventions.
    `sweeps_out` (a dict): filled with each DVP rule's `sweep.SweepAccumulator` of the
    second pass, whose `result(run=...)` is `sweep.sweep` of the run for that rule (`plot`
    draws the sweep figure from it instead of reading the run again).
    """
    from . import sweep as sw
    from .aggregates import parse_edges
    from .schema import RHO_GRID

    names = check_methods(methods)
    overrides = overrides or {}
    for n in overrides:
        if n not in names:
            raise MismatchError(f"--set names {n}, which --method does not select")
    if rho is not None and not (0 < rho < 1):
        raise MismatchError(f"--rho must be in (0, 1), got {rho:g}")
    if rho is not None:
        dvp_rows = [n for n in names if METHODS[n].dvp_rule is not None]
        if not dvp_rows:
            raise MismatchError(
                "--rho sets the threshold of the DVP rows, but --method selects none of "
                f"{', '.join(n for n in METHODS if METHODS[n].dvp_rule is not None)}"
            )
    params = {n: resolve_params(n, overrides.get(n), rho) for n in names}
    warnings: list[str] = []
    run = None
    scored: MismatchError | None = None
    src: TokenBatches
    if isinstance(source, pd.DataFrame):
        src = frame_tokens(source, verb="correct", needed=BASE_COLUMNS, batch_rows=batch_rows)
        where = "the token table"
    else:
        run = str(source)
        src = open_run_tokens(source, verb="correct", needed=BASE_COLUMNS, batch_rows=batch_rows)
        assert src.run is not None and src.meta is not None
        warnings = src.warnings
        where = sw.run_where(src.run, src.meta)
        try:
            sw.check_scored_import(src.run, src.meta)
        except MismatchError as e:  # the DVP rows are skipped, the others work
            scored = e
        if grid is None and src.meta.rho_grid:
            grid = src.meta.rho_grid
    e = parse_edges(edges)
    g = np.asarray(RHO_GRID if grid is None else grid, dtype=np.float64)
    have = set(src.columns)

    rows: dict[str, dict[str, Any]] = {}
    dvp = {n: METHODS[n].dvp_rule for n in names if METHODS[n].dvp_rule is not None}
    rule_err = {r: scored or sw.rule_error(have, src.num_rows, r, where) for r in dvp.values()}
    for n, r in dvp.items():  # a given rho off the grid fails before any token is read
        if rule_err[r] is None and params[n]["rho"] is not None:
            sw.resolve_rhos([params[n]["rho"]], g)
    rules = [r for r in dict.fromkeys(dvp.values()) if rule_err[r] is None]

    # pass 1: the sequences (and steps)
    has_step = "step" in have
    seq_parts, step_parts = [], []
    for b in src.read(["seq_id", *(["step"] if has_step else [])]):
        seq_parts.append(distinct(b["seq_id"]))
        if has_step:
            step_parts.append(b["step"])
    seqs = SeqIndex.scan(seq_parts)
    step_values = _step_values(step_parts) if has_step else None
    del seq_parts, step_parts
    S = seqs.num

    # pass 2: per-sequence sums, and the sweep of each DVP rule
    acc = SeqAccumulator(S)
    sweeps = {r: sw.SweepAccumulator(r, g, S, exact_limit) for r in rules}
    cols = ["seq_id", "delta", *(["kept_train"] if "kept_train" in have else [])]
    cols += [c for c in sw.scalar_columns(rules, have) if c not in cols]
    for b in _ahead(src, src.read(cols, [sw.MASS_COLUMN[r] for r in rules])):
        seq = seqs.codes(b["seq_id"])
        bs = BatchSeqs(seq)
        acc.add(_token_delta(b), bs)
        for r in list(sweeps):
            try:
                sweeps[r].add_batch(b, seq, bs)
            except MismatchError as err:  # e.g. a grid of another width: the row says so
                rule_err[r] = err
                del sweeps[r]
    view = acc.view()
    del acc
    if sweeps_out is not None:
        sweeps_out.update(sweeps)
    num_tokens = int(view.T.sum())
    sweep_res = {r: s.result() for r, s in sweeps.items()}
    del sweeps
    curves, bias, dvp_live = [], {}, {}
    for n, r in dvp.items():
        err = rule_err[r]
        plan = str(err) if err is not None else _dvp_plan(n, params[n], sweep_res[r], g, num_tokens)
        if isinstance(plan, str):
            rows[n] = _skipped(n, params[n], plan)
            continue
        params[n], bias[n], curve = plan
        curves.append(curve)
        dvp_live[n] = (r, params[n]["rho"])

    # pass 3: every method on each batch
    live = [n for n in names if n not in rows]
    decisions = {
        n: SEQ_DECISIONS[m.rule](view, **params[n])
        for n in live
        if (m := METHODS[n]).rule in SEQ_DECISIONS
    }
    has_adv = "advantage" in have
    summaries = {n: Summary(S, e, step_values, has_adv) for n in ["", *live]}  # "": all tokens
    bits = {n: 1 << j for j, n in enumerate(summaries)}  # a token's key: the methods keeping it
    quantiles = KeyedQuantiles(exact_limit)
    cols = [*BASE_COLUMNS, *(c for c in OPTIONAL_COLUMNS if c in have)]
    if not any(r == "min-p" for r, _ in dvp_live.values()) and "p_max_train" in cols:
        cols.remove("p_max_train")
    for b in _ahead(src, src.read(cols)):
        seq = seqs.codes(b["seq_id"])
        t = _prepare(b, seq, S, e, step_values)
        bs = BatchSeqs(seq)
        keys = np.zeros(t.num_tokens, dtype=np.int32)
        for n, summary in summaries.items():
            a = _apply(n, t, params.get(n, {}), decisions, dvp_live)
            summary.add(a, t, bs)
            keys |= np.where(a.masked, 0, bits[n]).astype(np.int32)
        quantiles.add(t.abs_delta[t.finite], keys[t.finite])

    def summary_of(n: str) -> dict[str, Any]:
        bit = bits[n]
        kept = lambda k: (k & bit) != 0  # noqa: E731
        return summaries[n].result(quantiles.quantile(kept, 0.99), quantiles.quantile(kept, 1.0))

    base = summary_of("")
    for n in live:
        rows[n] = _row(n, params[n], summary_of(n), bias.get(n))
    rows_list = [rows[n] for n in names]
    x = "removed_advantage_share" if has_adv else "removed_token_share"
    steps = None
    if base["by_step"] is not None:
        steps = [
            {
                "step": r["step"],
                "num_tokens": r["num_tokens"],
                "mean_abs_delta": r["left_mean_abs_delta"],
            }
            for r in base["by_step"]
        ]
    n_fin = summaries[""].fin_total
    result: dict[str, Any] = {
        "run": run,
        "num_tokens": num_tokens,
        "num_sequences": S,
        "num_finite": n_fin,
        "num_infinite": num_tokens - n_fin,
        "edges": e,
        "has_advantage": has_adv,
        "has_step": step_values is not None,
        "all_tokens": {
            "mean_abs_delta": base["left_mean_abs_delta"],
            "k3": base["left_k3"],
            "p99_abs_delta": base["left_p99_abs_delta"],
            "max_abs_delta": base["left_max_abs_delta"],
        },
        "steps": steps,
        "methods": rows_list,
        "pareto_axes": {"x": x, "y": "left_k3"},
        "dvp_curves": curves,
        "warnings": warnings,
        "quantiles": quantiles.label,
        "conventions": CONVENTIONS_CORRECTIONS,
    }
    result = json_ready(result)
    result["pareto"] = pareto(result["methods"], x)
    result["decision"] = json_ready(decide(result))
    result["verdict"] = corrections_verdict(result)
    return result


def _apply(
    name: str,
    t: RunTokens,
    params: Mapping[str, Any],
    decisions: Mapping[str, SeqDecision],
    dvp_live: Mapping[str, tuple[str, float]],
) -> Applied:
    """Method `name` ("": no correction, the all-tokens baseline) on a batch of rows."""
    from . import sweep as sw

    if name in decisions:
        return decisions[name].tokens(t.seq)
    if name in dvp_live:
        rule, rho = dvp_live[name]
        kept = t.support & sw.kept_mask(t.p_train, t.p_max_train, rho, rule)  # [n]
        return rule_dvp(t.delta, t.seq, kept)
    if name == "":
        return rule_none(t.delta, t.seq)
    m = METHODS[name]
    assert m.rule is not None
    return m.rule(t.delta, t.seq, **params)


CONVENTIONS_CORRECTIONS: dict[str, str] = {
    "quantiles": (
        "counts, sums, means, maxima, ESS and shares are exact; p99 |delta| is exact up to "
        f"{EXACT_LIMIT:,} finite tokens, beyond from a quantile sketch with relative error "
        "<= 0.5% (the `quantiles` key says which)"
    ),
    "delta": "delta = logp_infer - logp_train (nats); d = -delta; r = exp(d) = p_train / p_infer",
    "sequence": "S = sum_t d_t, G = S / T over the sequence's token rows, recomputed in float64",
    "clamp": "weights use exp of the log-ratio (or S, G) clamped to +-20, as verl and SkyRL",
    "infinite_delta": (
        "a token with an infinite delta is masked by every method; a sequence holding one by "
        "every sequence-level method"
    ),
    "masked": (
        "tokens_masked over all token rows; sequences_masked = sequences with every token "
        "masked, over sequences with a token row; removed_* over finite tokens (the method's "
        "own cost); left_*, weight_*, ess_* over the tokens (sequences) not masked"
    ),
    "decision": (
        f"the Pareto-front method leaving the least k3 among those removing at most "
        f"{DECISION_BUDGET:.0%} of the finite tokens (advantage signal when present), if it "
        f"cuts k3 by at least {DECISION_MIN_GAIN:.0%}; else none"
    ),
    "clipped_mass": "per sequence sum_t |raw weight - weight| over clipped tokens, mean over sequences",
    "denominator": (
        "masked means no gradient: verl, OpenRLHF, TRL, slime and NeMo keep IcePop's zeroed "
        "tokens in the loss denominator, SkyRL removes them; counted the same here"
    ),
}


def methods_frame(result: dict[str, Any]) -> pd.DataFrame:
    """The method rows as a DataFrame (for --csv): scalar keys, params as 'k=v;k=v'."""
    recs = []
    for r in result["methods"]:
        rec = {k: r[k] for k in SCALAR_KEYS}
        rec["params"] = ";".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in (r["params"] or {}).items()
            if v is not None
        )
        rec["pareto"] = r["name"] in result["pareto"]
        recs.append(rec)
    cols = ["name", "level", "kind", "params", *SCALAR_KEYS[4:], "pareto"]
    return pd.DataFrame(recs, columns=cols)


__all__ = [
    "CONVENTIONS_CORRECTIONS",
    "METHOD_KEYS",
    "RunTokens",
    "SequenceStream",
    "Summary",
    "corrections",
    "corrections_verdict",
    "decide",
    "methods_frame",
    "pareto",
    "run_tokens",
    "summarize_method",
]
