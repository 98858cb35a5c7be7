"""Side-by-side comparison of runs: the headline metrics, the bucket means and the
distribution-level measures, one column per run, with each run's ratio to the first; and,
for runs that share rollouts (same seq_ids, positions and tokens), how much each side's
log-probs moved between them, token by token. The numbers behind `mismatch compare` and
`mismatch diagnose`. Reads run directories only; importing it does not import torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import metrics as M
from .aggregates import (
    DEFAULT_EDGES,
    Aggregates,
    Scanner,
    bucket_index,
    parse_edges,
    report_tokens,
    scan,
)
from .analysis import report
from .errors import MismatchError
from .pairing import KEYS, PairCounts, pair_runs
from .results import json_ready
from .runs import RunMeta, run_labels
from .tokens import BATCH_ROWS, SIDES, TokenBatches, open_run_tokens, prefetch

# The headline metrics, in display order: (key, label). The ratio to the first run is
# given for each.
HEADLINE: tuple[tuple[str, str], ...] = (
    ("mean_abs_delta", "mean |delta|"),
    ("k3", "k3"),
    ("p99_abs_delta", "p99 |delta|"),
    ("max_abs_delta", "max |delta|"),
    ("tail_abs_delta_share", "tail share of |delta|"),
    ("eps_hat", "eps estimate"),
    ("tv_coarse_mean", "TV lower bound, mean"),
    ("kl_qp_coarse_mean", "KL(q||p) lower bound, mean"),
    ("kl_pq_coarse_mean", "KL(p||q) lower bound, mean"),
)


def describe_sides(meta: RunMeta) -> tuple[str, str]:
    """Short descriptions of a run's inference and training sides, e.g. ("vllm decode
    bfloat16", "transformers float32 eager, batch 4096 tokens"), from run.json's `engines`
    (and `config` for runs that predate a key)."""
    cfg, inf, tr = meta.config, meta.infer, meta.train

    def words(*xs: Any) -> str:
        return " ".join(str(x) for x in xs if x)

    infer = words(
        inf.get("engine") or cfg.get("infer_engine"),
        inf.get("mode") or "decode",
        inf.get("dtype") or cfg.get("infer_dtype"),
        inf.get("attn_implementation"),
    )
    engine = tr.get("engine", "transformers")
    train = words(
        engine,
        tr.get("mode"),
        tr.get("dtype") or cfg.get("train_dtype"),
        tr.get("attn_implementation")
        or (cfg.get("attn_implementation") if engine == "transformers" else None),
    )
    if engine == "transformers" and cfg.get("rescore_batch_tokens"):
        train += f", batch {cfg['rescore_batch_tokens']} tokens"
    return infer, train


def run_summary(
    path: str | Path,
    label: str | None = None,
    edges: Sequence[float] | str | None = DEFAULT_EDGES,
    *,
    batch_rows: int = BATCH_ROWS,
) -> dict[str, Any]:
    """One run's headline numbers (HEADLINE keys), its bucket means and its verdict, from
    one streamed `aggregates.scan` (the report) and the p99 of |delta| over finite tokens
    (exact up to the scan's exact limit, the sketch beyond)."""
    src = report_tokens(Path(path), batch_rows, complete=True)
    return _summary(src, scan(src, edges=parse_edges(edges)), label)


def _summary(src: TokenBatches, agg: Aggregates, label: str | None) -> dict[str, Any]:
    """`run_summary` of a run's token table from its scan's aggregates."""
    meta = src.meta
    assert meta is not None and src.run is not None
    path = Path(src.run)
    rep = report(agg, None, src.warnings)
    p99 = float(agg.abs_delta_quantile(0.99)[0]) if agg.num_finite else math.nan
    m = rep["metrics"]
    dist = rep.get("distribution_level") or {}
    infer, train = describe_sides(meta)
    out: dict[str, Any] = {
        "label": label or path.name,
        "path": str(path),
        "inference": infer,
        "training": train,
        "rescored_from": meta.rescored_from.get("run"),
        "num_tokens": rep["num_tokens"],
        "num_infinite": rep["num_infinite"],
        "mean_abs_delta": m["mean_abs_delta"],
        "k3": m["k3"],
        "p99_abs_delta": p99,
        "max_abs_delta": m["max_abs_delta"],
        "tail_abs_delta_share": rep["tail"]["abs_delta_share"],
        "tail_threshold": rep["tail"]["threshold"],
        "eps_hat": rep["eps_hat"],
        "verdict": rep["verdict"],
        "buckets": [
            {k: b[k] for k in ("lo", "hi", "count", "mean_abs_delta", "mean_delta")}
            for b in rep["buckets"]
        ],
        "distribution_level": dist or None,
        "quantiles": rep["quantiles"],
    }
    for c, s in (dist.get("overall") or {}).items():
        out[f"{c}_mean"] = s["mean"]
        out[f"{c}_p99"] = s["p99"]
    return json_ready(out)


def _ratio(a: Any, b: Any) -> float:
    if a is None or b is None or not b:
        return math.nan
    return a / b


_MOVE_COLUMNS = ["seq_id", "pos", "token_id", "logp_infer", "logp_train", "p_train"]


class _Moves(PairCounts):
    """`moved`'s sums, streamed: per side s, over matched rows finite in both runs, of
    m = logp_s(b) - logp_s(a) (count, sum |m|, max |m|, zeros, sum of k3 terms), and by
    bucket of a's p_train; plus the matched rows and those holding different tokens."""

    def __init__(self, edges: np.ndarray) -> None:
        super().__init__()
        self.edges = edges
        nb = len(edges) - 1
        self.side = {
            s: {
                "n": 0, "n_bad": 0, "sum": 0.0, "max": -math.inf, "zeros": 0, "k3": 0.0,
                "count": np.zeros(nb, np.int64), "bsum": np.zeros(nb), "bmax": np.full(nb, np.nan),
            }
            for s in SIDES
        }  # fmt: skip

    def add(self, a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
        """Matched rows: a's and b's columns, row i of one matching row i of the other."""
        n = self.count(a, b)
        if not n:
            return
        nb = len(self.edges) - 1
        idx = bucket_index(np.asarray(a["p_train"], dtype=np.float64), self.edges)  # [n]
        for side, acc in self.side.items():
            la = np.asarray(a[f"logp_{side}"], dtype=np.float64)
            lb = np.asarray(b[f"logp_{side}"], dtype=np.float64)
            ok = np.isfinite(la) & np.isfinite(lb)
            m = lb[ok] - la[ok]  # [n'] how far b moved from a
            am = np.abs(m)
            acc["n"] += int(m.size)
            acc["n_bad"] += int(n - m.size)
            if not m.size:
                continue
            acc["sum"] += float(am.sum())
            acc["max"] = max(acc["max"], float(am.max()))
            acc["zeros"] += int(np.count_nonzero(m == 0))
            acc["k3"] += float(M.k3_per_token(m).sum())
            bi = idx[ok]
            inb = bi >= 0
            acc["count"] += np.bincount(bi[inb], minlength=nb)
            acc["bsum"] += np.bincount(bi[inb], weights=am[inb], minlength=nb)
            np.fmax.at(acc["bmax"], bi[inb], am[inb])

    def result(self) -> dict[str, Any]:
        e = self.edges
        out: dict[str, Any] = {"shared": True, "reason": None, "edges": e}
        for side, acc in self.side.items():
            n = acc["n"]
            with np.errstate(invalid="ignore", divide="ignore"):
                mean_b = acc["bsum"] / acc["count"]
            out[side] = {
                "num_tokens": n,
                "num_not_finite": acc["n_bad"],
                "mean_abs": acc["sum"] / n if n else math.nan,
                "max_abs": acc["max"] if n else math.nan,
                "frac_identical": acc["zeros"] / n if n else math.nan,
                "k3": acc["k3"] / n if n else math.nan,
                "buckets": pd.DataFrame(
                    {
                        "lo": e[:-1],
                        "hi": e[1:],
                        "count": acc["count"],
                        "mean_abs": mean_b,
                        "max_abs": acc["bmax"],
                    }
                ),
            }
        return out


def moved(
    a: str | Path,
    b: str | Path,
    edges: Sequence[float] | str | None = DEFAULT_EDGES,
    *,
    batch_rows: int = BATCH_ROWS,
) -> dict[str, Any]:
    """How the log-probs moved from run `a` to run `b` over the tokens they share.

    Rows are matched on (seq_id, pos). The runs share rollouts when at least one row matches
    and every matched row has the same token_id; otherwise `shared` is False with the reason.
    For each side s in (train, infer): m = logp_s(b) - logp_s(a) over matched rows finite in
    both: mean_abs, max_abs, frac_identical (m == 0 exactly), k3 = mean(e^-m - 1 + m) (b's
    log-probs in the role of logp_infer, a's in that of logp_train: `metrics.k3` of m), and
    by bucket of a's p_train: count, mean_abs, max_abs. `num_common` / `num_only_a` / `num_only_b` count rows.
    Streamed `batch_rows` rows at a time: row against row when both runs hold the same
    (seq_id, pos) in the same order (rescored runs do), else a merge join by sequence.
    """
    e = parse_edges(edges)
    acc = pair_runs(a, b, _MOVE_COLUMNS, lambda: _Moves(e), batch_rows=batch_rows)
    return _moved_result(a, b, acc)


def _moved_result(a: str | Path, b: str | Path, acc: _Moves) -> dict[str, Any]:
    """`moved`'s dict from its accumulator."""
    base: dict[str, Any] = {
        "a": str(a),
        "b": str(b),
        "num_common": acc.num_common,
        "num_only_a": acc.num_only_a,
        "num_only_b": acc.num_only_b,
    }
    if (why := acc.unshared()) is not None:
        return {**base, "shared": False, "reason": why}
    return json_ready({**base, **acc.result()})


def _lockstep(
    src_a: TokenBatches, src_b: TokenBatches, edges: np.ndarray, scan_a: bool
) -> tuple[Aggregates | None, Aggregates, _Moves | None]:
    """One read of each of two runs: every batch of a (when `scan_a`) and of b feeds its
    run's report scan (`aggregates.Scanner`) and, while the two hold the same (seq_id,
    pos) row for row (a rescored run and its source do), the moves between them. Returns
    (a's aggregates or None, b's aggregates, the moves; None when the rows did not pair
    row for row, and `moved` joins them in a pass of its own)."""
    sa = Scanner(src_a, edges=edges) if scan_a else None
    try:
        sb = Scanner(src_b, edges=edges)
    except BaseException:
        if sa is not None:
            sa.close()
        raise
    try:
        return _lockstep_pass(src_a, src_b, edges, sa, sb)
    finally:  # an error anywhere, finish's included: no worker thread left running
        for sc in (sa, sb):
            if sc is not None:
                sc.close()


def _lockstep_pass(
    src_a: TokenBatches,
    src_b: TokenBatches,
    edges: np.ndarray,
    sa: Scanner | None,
    sb: Scanner,
) -> tuple[Aggregates | None, Aggregates, _Moves | None]:
    """`_lockstep`'s pass, its scanners made (and closed) by it."""
    moves: _Moves | None = None
    if src_a.num_rows == src_b.num_rows and all(
        c in src.columns for src in (src_a, src_b) for c in _MOVE_COLUMNS
    ):
        moves = _Moves(edges)
    extra = _MOVE_COLUMNS if moves is not None else []
    cols_a = list(dict.fromkeys([*(sa.columns if sa is not None else []), *extra]))
    cols_b = list(dict.fromkeys([*sb.columns, *extra]))
    it_a = prefetch(src_a.read(cols_a)) if cols_a else None
    it_b = prefetch(src_b.read(cols_b))
    try:
        for rb in it_b:
            ra = next(it_a, None) if it_a is not None else None
            if ra is not None and sa is not None:
                sa.feed(ra)
            sb.feed(rb)
            if moves is None:
                continue
            if ra is not None and all(np.array_equal(ra[k], rb[k]) for k in KEYS):
                moves.add(ra, rb)
                continue
            moves = None  # not row for row: `moved` joins them instead
            if sa is None and it_a is not None:
                it_a.close()
                it_a = None
        if it_a is not None:
            for ra in it_a:  # a's batches beyond b's (the same rows in other batches)
                moves = None
                if sa is not None:
                    sa.feed(ra)
    finally:
        for it in (it_a, it_b):
            if it is not None:
                it.close()
    return (sa.finish() if sa is not None else None), sb.finish(), moves


def compare(
    paths: Sequence[str | Path],
    labels: Sequence[str] | None = None,
    edges: Sequence[float] | str | None = DEFAULT_EDGES,
    reference: str | Path | None = None,
) -> dict[str, Any]:
    """Compare complete runs side by side (a strict-JSON dict).

    With `reference` (a run over the same rollouts scored precisely, e.g. a diagnose
    directory's `reference/`), `attribution` holds each run's two sides against it
    (`attribution.attribution_row`, with its `verdict`), else None.

    Keys: runs (each `run_summary`), reference (the first run's label), headline (the
    HEADLINE (key, label) pairs, in display order), edges, ratios (for
    each later run, HEADLINE value / the first run's, by key), bucket_means (one row per
    bucket: lo, hi, and each run's mean |delta| under its label), moved (for each later run
    sharing rollouts with the first: `moved(first, run)` with `label`; runs that do not are
    listed with shared False and the reason).
    """
    if len(paths) < 2:
        raise MismatchError(
            f"compare needs two or more runs, got {len(paths)}: `mismatch compare RUN RUN ...` "
            "(the first is the reference; `mismatch report RUN` summarises one)"
        )
    e = parse_edges(edges)
    if reference is not None:  # a missing or unreadable REF fails before any work
        open_run_tokens(reference, verb="compare --reference", needed=["logp_train"])
    names = run_labels(paths, labels)
    # every run opened (a missing or damaged one fails in one line before any reading),
    # then one read of each: the first run against each later one in lockstep
    srcs = [report_tokens(Path(p), BATCH_ROWS, complete=True) for p in paths]
    runs: list[dict[str, Any]] = []
    moves: list[dict[str, Any]] = []
    for k in range(1, len(paths)):
        agg_a, agg_b, mv = _lockstep(srcs[0], srcs[k], e, scan_a=k == 1)
        if agg_a is not None:
            runs.append(_summary(srcs[0], agg_a, names[0]))
        runs.append(_summary(srcs[k], agg_b, names[k]))
        moved_k = _moved_result(paths[0], paths[k], mv) if mv is not None else None
        moves.append({"label": names[k], **(moved_k or moved(paths[0], paths[k], e))})
    ref = runs[0]
    ratios = [
        {"label": r["label"], **{k: _ratio(r.get(k), ref.get(k)) for k, _ in HEADLINE}}
        for r in runs[1:]
    ]
    bucket_means = [
        {"lo": float(e[i]), "hi": float(e[i + 1]),
         **{r["label"]: r["buckets"][i]["mean_abs_delta"] for r in runs}}
        for i in range(len(e) - 1)
    ]  # fmt: skip
    attribution = None
    if reference is not None:
        from .attribution import attribution_row, attribution_verdict, side_errors

        attribution = []
        for r, p in zip(runs, paths, strict=True):
            row = attribution_row(r["label"], side_errors(reference, p, e))
            attribution.append({**row, "verdict": attribution_verdict(row, r["label"])})
    return json_ready(
        {
            "runs": runs,
            "reference": ref["label"],
            "headline": [list(h) for h in HEADLINE],
            "edges": e,
            "ratios": ratios,
            "bucket_means": bucket_means,
            "moved": moves,
            "attribution_reference": None if reference is None else str(reference),
            "attribution": attribution,
        }
    )


__all__ = ["HEADLINE", "compare", "describe_sides", "moved", "run_summary"]
