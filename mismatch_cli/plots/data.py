"""What the figures need of a run, computed once in the report's streamed passes (`RunData`):
the report's aggregates and tables, and three streamed aggregates of its own (`BoundHist`,
`DeltaHist`, `PositionSums`), so no figure holds a per-token array of the run: a 10^8-token
run is drawn in the memory of one batch."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import aggregates as G
from .. import analysis as A
from ..quantiles import EXACT_LIMIT
from ..results import json_ready
from ..runs import RunMeta
from ..tokens import BATCH_ROWS, REQUIRED_COLUMNS
from .style import PALETTE

PLOT_COLUMNS: tuple[str, ...] = (*REQUIRED_COLUMNS, "pos")  # pos: optional (row order)
OPTIONAL_PLOT_COLUMNS: tuple[str, ...] = ("step",)  # read when present (imported runs)


class LogGrid:
    """A fixed log10 grid: `per_decade` bins per decade from 10^lo to 10^hi. bin(v) is the
    bin of each v > 0 ([n] -> [n] int64; -1 below the grid, the last bin above it)."""

    def __init__(self, lo: int, hi: int, per_decade: int) -> None:
        self.lo, self.hi, self.per_decade = lo, hi, per_decade
        self.size = (hi - lo) * per_decade

    def bin(self, v: np.ndarray) -> np.ndarray:
        k = np.floor((np.log10(v) - self.lo) * self.per_decade)  # [n]
        return np.clip(k, -1, self.size - 1).astype(np.int64)

    def edge(self, i: Any) -> Any:
        """Lower edge of bin i (i = size: the top of the grid)."""
        return 10.0 ** (self.lo + np.asarray(i) / self.per_decade)


class BoundHist:
    """The bound figure's token densities, streamed: 2-D histograms of |delta| (y) against
    1 - p and against p (x) over finite tokens with 0 < p < 1 and delta != 0, on fixed
    log grids (X: 10^-12..1, 40 bins per decade; Y: 10^-16..10^4), plus, per panel, the
    tokens left of the x grid (their share sets the drawn x range, as the 0.1% quantile
    did). 2 x 480 x 800 counts (6 MB) whatever the run size."""

    X = LogGrid(-12, 0, 40)
    Y = LogGrid(-16, 4, 40)
    KINDS = ("one_minus_p", "p")
    columns: tuple[str, ...] = ()

    def __init__(self) -> None:
        shape = (self.X.size, self.Y.size)
        self.h = {k: np.zeros(shape, np.int64) for k in self.KINDS}  # [X, Y]
        self.below = dict.fromkeys(self.KINDS, 0)
        self.drawable = 0  # finite tokens with 1 - p > 0 and |delta| > 0
        self.num_finite = 0

    def start(self, agg: G.Aggregates) -> None:
        pass

    def add(self, b: G.Batch) -> None:
        if not b.m:
            return
        x, p, y = b.x, b.p, b.ad  # [m]
        ok = (x > 0) & (y > 0)
        self.num_finite += b.m
        self.drawable += int(np.count_nonzero(ok))
        ok &= p > 0
        iy = self.Y.bin(y[ok])  # [k]
        np.maximum(iy, 0, out=iy)  # |delta| below 1e-16: the lowest row
        for kind, v in (("one_minus_p", x[ok]), ("p", p[ok])):
            ix = self.X.bin(v)  # [k]
            inside = ix >= 0
            self.below[kind] += int(ix.size - np.count_nonzero(inside))
            flat = ix[inside] * self.Y.size + iy[inside]
            self.h[kind] += np.bincount(flat, minlength=self.h[kind].size).reshape(
                self.h[kind].shape
            )

    def x_floor(self, kind: str, q: float = 1e-3, floor: float = 1e-12) -> float:
        """About the q-quantile of x over the drawn tokens, divided by 3 (at least `floor`):
        where the x axis starts, so a few extreme tokens do not squeeze the plot (they stay
        in every statistic). From the grid: the lower edge of the bin holding the rank."""
        col = self.h[kind].sum(axis=1)  # [X]
        total = self.below[kind] + int(col.sum())
        if not total:
            return floor
        rank = q * (total - 1)
        if rank < self.below[kind]:
            return floor
        i = int(np.searchsorted(np.cumsum(col) + self.below[kind], rank, side="right"))
        return max(floor, float(self.X.edge(min(i, self.X.size - 1))) / 3)

    def density(
        self, kind: str, x_from: float, bins: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Counts on a coarser grid over the data right of x_from: about bins[0] x bins[1]
        cells, each a block of fine cells (aligned: no fine cell is split). Returns
        (H [nx, ny], x edges [nx + 1], y edges [ny + 1]); an empty H when nothing is drawn."""
        h = self.h[kind]
        i0 = max(0, math.floor((math.log10(x_from) - self.X.lo) * self.X.per_decade))
        h = h[i0:]
        cols, rows = np.flatnonzero(h.sum(axis=1)), np.flatnonzero(h.sum(axis=0))
        if not cols.size:
            return np.zeros((0, 0), np.int64), np.zeros(1), np.zeros(1)
        h = h[: cols[-1] + 1, rows[0] : rows[-1] + 1]
        kx = max(1, math.ceil(h.shape[0] / bins[0]))
        ky = max(1, math.ceil(h.shape[1] / bins[1]))
        nx, ny = math.ceil(h.shape[0] / kx), math.ceil(h.shape[1] / ky)
        pad = np.zeros((nx * kx, ny * ky), np.int64)
        pad[: h.shape[0], : h.shape[1]] = h
        H = pad.reshape(nx, kx, ny, ky).sum(axis=(1, 3))  # [nx, ny]
        xe = self.X.edge(i0 + kx * np.arange(nx + 1))
        ye = self.Y.edge(rows[0] + ky * np.arange(ny + 1))
        return H, xe, ye


class DeltaHist:
    """The distribution figure's histogram of delta, streamed: |delta| of finite tokens on
    a fixed log grid (10^-12..10^4, 48 bins per decade: 6 per drawn bin of 1/8 decade) for
    each sign, with the values below the grid in bin 0 of their sign and exact zeros apart,
    and the largest |delta|; `edges` / `counts` give the drawn bins."""

    G = LogGrid(-12, 4, 48)
    DRAWN_PER_DECADE = 8
    INNER = 14  # fine bins in [lt 10^(-14/48), lt) = [~lt / 2, lt), the inner linear bin
    columns: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.pos = np.zeros(self.G.size + 1, np.int64)  # [1 + fine]: bin 0 below the grid
        self.neg = np.zeros(self.G.size + 1, np.int64)
        self.zeros = 0
        self.max_abs = 0.0
        self.n = 0

    def start(self, agg: G.Aggregates) -> None:
        pass

    def add(self, b: G.Batch) -> None:
        if not b.m:
            return
        d, ad = b.delta, b.ad  # [m]
        self.n += b.m
        self.max_abs = max(self.max_abs, float(ad.max()))
        nz = ad > 0
        self.zeros += int(b.m - np.count_nonzero(nz))
        k = self.G.bin(ad[nz]) + 1  # [k'] 0: below the grid
        neg = d[nz] < 0
        self.pos += np.bincount(k[~neg], minlength=self.pos.size)
        self.neg += np.bincount(k[neg], minlength=self.neg.size)

    @staticmethod
    def linear_threshold(hists: Sequence[DeltaHist], q: float = 0.01) -> float:
        """10^floor(log10 of the q-quantile of the nonzero |delta| of all runs), at least
        1e-12: the half-width of the linear region of the symmetric-log axis."""
        counts = sum(h.pos + h.neg for h in hists)  # [1 + fine]
        total = int(np.sum(counts))
        if not total:
            return 1e-6
        # the bin of the upper order statistic numpy's linear quantile interpolates to
        i = int(np.searchsorted(np.cumsum(counts), math.ceil(q * (total - 1)), side="right"))
        G = DeltaHist.G
        return 10.0 ** (G.lo + max(i - 1, 0) // G.per_decade)  # the decade of bin i

    def edges(self, lt: float, vmax: float) -> np.ndarray:
        """The drawn bins: linear inside +-lt (edges -lt, -~lt/2, 0, ~lt/2, lt), then 8 per
        decade of |delta| up to the first edge at or above vmax."""
        K = max(1, math.ceil(self.DRAWN_PER_DECADE * math.log10(max(vmax, lt) / lt) - 1e-9))
        pos = lt * 10.0 ** (np.arange(K + 1) / self.DRAWN_PER_DECADE)  # [K + 1]
        inner = lt * 10.0 ** (-self.INNER / self.G.per_decade)
        return np.concatenate([-pos[::-1], [-inner, 0.0, inner], pos])

    def counts(self, lt: float, num_outer: int) -> np.ndarray:
        """Tokens per drawn bin of `edges(lt, vmax)`, whose outer bins number `num_outer`
        per sign (the last one also takes anything beyond). [2 num_outer + 4]"""
        step = self.G.per_decade // self.DRAWN_PER_DECADE
        i_lt = round((math.log10(lt) - self.G.lo) * self.G.per_decade) + 1  # fine bin of lt
        i_in = max(i_lt - self.INNER, 0)

        def side(h: np.ndarray) -> tuple[int, int, np.ndarray]:
            """(below the inner bin, inner bin, outer bins [num_outer]) of one sign."""
            outer = np.zeros(num_outer * step, np.int64)
            rest = h[i_lt:]
            take = min(rest.size, outer.size)
            outer[:take] = rest[:take]
            out = outer.reshape(num_outer, step).sum(axis=1)
            out[-1] += int(rest[take:].sum())
            return int(h[:i_in].sum()), int(h[i_in:i_lt].sum()), out

        p_small, p_inner, p_out = side(self.pos)
        n_small, n_inner, n_out = side(self.neg)
        return np.concatenate(
            [n_out[::-1], [n_inner, n_small, p_small + self.zeros, p_inner], p_out]
        )


class PositionSums:
    """The sequence figure's mean cumulative delta by position, streamed: over sequences
    without an infinite delta, the running sum of delta along each completion (carried
    across batches per sequence), and at each position t the count, sum and sum of squares
    of those running sums. Positions are the `pos` column (the row order within a sequence
    without it). A batch's rows are put in (sequence, position) order; a sequence must
    continue across batches in order (writers store it so), else `ordered` is False."""

    columns: tuple[str, ...] = ("pos",)
    needs_sequences = True  # S-sized arrays from `start`: the scan lists them first

    def __init__(self) -> None:
        self.n = np.zeros(0, np.int64)  # [T] sequences reaching position t
        self.s1 = np.zeros(0)  # [T] sum of the running sums
        self.s2 = np.zeros(0)  # [T] sum of their squares
        self.ordered = True

    def start(self, agg: G.Aggregates) -> None:
        S = agg.num_sequences
        assert agg.seq_infinite is not None, "scan(..., flag_infinite=True)"
        self.ok = ~agg.seq_infinite  # [S]
        self.carry = np.zeros(S)  # running sum at the last row seen
        self.seen = np.zeros(S, np.int64)  # rows seen
        self.last = np.full(S, -1, np.int64)  # last position seen

    def add(self, b: G.Batch) -> None:
        assert b.seq is not None
        keep = self.ok[b.seq]  # [n] rows of sequences without an infinite delta
        if not keep.any():
            return
        seq = b.seq[keep]
        d = np.asarray(b.rows["delta"], dtype=np.float64)[keep]
        pos = np.asarray(b.rows["pos"], dtype=np.int64)[keep] if "pos" in b.rows else None
        in_order = bool(np.all(seq[1:] >= seq[:-1]))
        if in_order and pos is not None:
            same = seq[1:] == seq[:-1]
            in_order = bool(np.all(pos[1:][same] > pos[:-1][same]))
        if not in_order:
            order = np.lexsort((pos, seq)) if pos is not None else np.argsort(seq, kind="stable")
            seq, d = seq[order], d[order]
            pos = pos[order] if pos is not None else None
        starts = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])  # [k] segments
        sizes = np.diff(np.r_[starts, seq.size])
        sid = seq[starts]  # [k]
        if pos is None:
            pos = np.repeat(self.seen[sid] - starts, sizes) + np.arange(seq.size)
        elif np.any(pos[starts] <= self.last[sid]):
            self.ordered = False  # a sequence's rows came back out of order
        c = np.cumsum(d)  # [n'] running sum within each segment, then the carry
        before = np.r_[0.0, c[starts[1:] - 1]]  # [k] sum before each segment
        cum = c + np.repeat(self.carry[sid] - before, sizes)
        ends = starts + sizes - 1
        self.carry[sid], self.seen[sid], self.last[sid] = (
            cum[ends],
            self.seen[sid] + sizes,
            pos[ends],
        )
        T = int(pos.max()) + 1
        if T > self.n.size:
            grow = T - self.n.size
            self.n = np.r_[self.n, np.zeros(grow, np.int64)]
            self.s1, self.s2 = np.r_[self.s1, np.zeros(grow)], np.r_[self.s2, np.zeros(grow)]
        self.n[:T] += np.bincount(pos, minlength=T)
        self.s1[:T] += np.bincount(pos, weights=cum, minlength=T)
        self.s2[:T] += np.bincount(pos, weights=cum * cum, minlength=T)


@dataclass
class RunData:
    """What the figures need of one run, computed once in streamed passes: the report's
    aggregates and tables, and the figures' own aggregates (`BoundHist`, `DeltaHist`,
    `PositionSums`, per-step metrics)."""

    label: str
    agg: G.Aggregates
    buckets: pd.DataFrame  # analysis.bucket_stats
    seqs: pd.DataFrame  # analysis.sequence_stats
    metrics: dict[str, float]  # analysis.rl_metrics
    eps: float
    eps_estimator: str
    edges: np.ndarray
    bound: BoundHist
    deltas: DeltaHist
    positions: PositionSums
    steps: list[dict[str, Any]] | None  # analysis.group_metrics by step; None: no step column
    by_position: list[dict[str, Any]] | None  # report's by_position; None: no pos column
    columns: tuple[str, ...]  # the token table's columns
    frame: pd.DataFrame | None = None  # the token table, when given as a DataFrame
    meta: RunMeta = field(default_factory=lambda: RunMeta(status="complete"))
    path: Path | None = None
    color: str = PALETTE[0]
    warnings: list[str] = field(default_factory=list)  # the reader's (e.g. an incomplete run)
    # what one figure computed and another reuses (`corrections_of`)
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.agg.num_tokens

    @property
    def num_finite(self) -> int:
        return self.agg.num_finite

    def describe(self) -> str:
        """Model, engines and dtypes, sampling settings, token count: one line."""
        meta = self.meta
        cfg = meta.config
        bits = [str(meta.model_name or "model not recorded")]
        if "mode" in meta.infer or "mode" in meta.train:
            from ..compare import describe_sides  # a rescored or repeated side: say how

            infer, train = describe_sides(meta)
            bits.append(f"{infer} vs {train}")
        elif cfg.get("infer_engine"):
            train = meta.train.get("engine")
            infer = " ".join(filter(None, (cfg["infer_engine"], cfg.get("infer_dtype"))))
            train = " ".join(filter(None, (train or "transformers", cfg.get("train_dtype"))))
            bits.append(f"{infer} vs {train}")
        if cfg.get("temperature") is not None:
            samp = f"T={cfg['temperature']:g}"
            for k in ("top_p", "top_k", "min_p"):
                if cfg.get(k) is not None:
                    samp += f" {k}={cfg[k]:g}"
            bits.append(samp)
        bits.append(f"{self.num_tokens:,} tokens")
        return ", ".join(bits)


def corrections_of(r: RunData) -> dict[str, Any]:
    """`corrections.corrections` of a run, computed once per RunData (the corrections
    figure and, when both are drawn, the sweep figure read it: its second pass holds the
    min-p sweep, so the run is not read again for it). Its DVP rules' sweep accumulators
    are kept in r.cache["sweeps"]."""
    if "corrections" not in r.cache:
        from .. import corrections as C  # lazy: the module is only needed here

        sweeps: dict[str, Any] = {}
        src = r.path if r.path is not None else r.frame
        r.cache["corrections"] = C.corrections(src, edges=r.edges, sweeps_out=sweeps)
        r.cache["sweeps"] = sweeps
    return r.cache["corrections"]


def run_data(
    source: pd.DataFrame | str | Path,
    label: str | None = None,
    *,
    edges: Sequence[float] | str | None = G.DEFAULT_EDGES,
    eps: float | None = None,
    meta: RunMeta | None = None,
    batch_rows: int = BATCH_ROWS,
    exact_limit: int = EXACT_LIMIT,
) -> RunData:
    """Stream a run (path) or a token DataFrame once through the report's passes and the
    figures' aggregates (memory independent of the number of tokens)."""
    path, frame = None, None
    src = G.report_tokens(source, batch_rows)
    if isinstance(source, (str, Path)):
        path = Path(source)
        meta = src.meta
        label = label or path.name
    else:
        frame = source
        label = label or "run"
    e = G.parse_edges(edges)
    bound, deltas, positions = BoundHist(), DeltaHist(), PositionSums()
    by_position = A.PositionAccumulator()
    extras: list[Any] = [bound, deltas, positions, by_position]
    steps = A.GroupAccumulator("step") if "step" in src.columns else None
    if steps is not None:
        extras.append(steps)
    agg = G.scan(
        src,
        edges=e,
        by="train",
        eps=eps,
        exact_limit=exact_limit,
        extras=extras,
        flag_infinite=True,
    )
    seqs = agg.sequences()
    return RunData(
        label=label,
        agg=agg,
        buckets=agg.buckets(),
        seqs=seqs,
        metrics=agg.metrics(seqs),
        eps=math.nan if agg.eps is None else agg.eps,
        eps_estimator=agg.eps_estimator,
        edges=e,
        bound=bound,
        deltas=deltas,
        positions=positions,
        steps=steps.result() if steps is not None else None,
        by_position=json_ready(by_position.result()),
        columns=tuple(src.columns),
        frame=frame,
        meta=meta if meta is not None else RunMeta(status="complete"),
        path=path,
        warnings=list(src.warnings),
    )


def load_runs(
    run_paths: Sequence[str | Path],
    labels: Sequence[str] | None = None,
    *,
    edges: Sequence[float] | str | None = G.DEFAULT_EDGES,
    eps: float | None = None,
) -> list[RunData]:
    """RunData of each run, coloured in order; labels default to the directory names."""
    from ..errors import MismatchError
    from ..runs import run_labels

    if not run_paths:
        raise MismatchError("no runs given: pass one or more run directories")
    names = run_labels(run_paths, labels)
    runs = []
    for i, (p, name) in enumerate(zip(run_paths, names, strict=True)):
        r = run_data(p, name, edges=edges, eps=eps)
        r.color = PALETTE[i % len(PALETTE)]
        runs.append(r)
    return runs
