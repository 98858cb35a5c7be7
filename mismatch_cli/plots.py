"""Figures of one or several runs (matplotlib, headless): the bound, the tail bias, the
accumulation over sequences, the distributions, and the pruning sweep.

Every figure is readable on its own: a title naming the model, both engines and dtypes, the
sampling settings and the token count of each run; axes in nats; a legend. With several
runs each figure overlays them, one colour per run (Okabe-Ito, colour-blind safe).

The numbers drawn come from `analysis` (the same functions `report` uses), and the drawn
series carry a gid ("bucket-mean:<label>", ...) so tests can read back what was plotted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from . import analysis as A
from . import metrics as M
from . import theory
from .errors import MismatchError

FIGURES: tuple[str, ...] = ("bound", "bias", "sequence", "distribution", "sweep")
FORMATS: tuple[str, ...] = ("png", "pdf", "svg")
DEFAULT_DPI = 200
# Okabe-Ito: distinguishable with every common colour-vision deficiency.
PALETTE: tuple[str, ...] = (
    "#0072B2",
    "#D55E00",
    "#009E73",
    "#CC79A7",
    "#E69F00",
    "#56B4E9",
    "#000000",
    "#F0E442",
)
STYLE: dict[str, Any] = {
    "font.size": 9.5,
    "axes.titlesize": 10.5,
    "axes.labelsize": 10,
    "legend.fontsize": 8.5,
    "figure.titlesize": 11.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "grid.linewidth": 0.6,
    "legend.frameon": False,
    "savefig.facecolor": "white",
    "figure.facecolor": "white",
}
PLOT_COLUMNS: tuple[str, ...] = (*A.REQUIRED_COLUMNS, "pos")
NATS = "nats"
MIN_SEQS_PER_POS = 10
X_FLOOR = 1e-12  # smallest p or 1 - p the bound figure draws


# ----------------------------------------------------------------------------- data


@dataclass
class RunData:
    """What the figures need of one run, computed once: the analysis arrays and tables."""

    label: str
    tokens: pd.DataFrame  # PLOT_COLUMNS
    arrays: A.TokenArrays
    buckets: pd.DataFrame  # analysis.bucket_stats
    seqs: pd.DataFrame  # analysis.sequence_stats
    eps: float
    eps_estimator: str
    edges: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    color: str = PALETTE[0]

    @property
    def num_tokens(self) -> int:
        return self.arrays.num_tokens

    def describe(self) -> str:
        """Model, engines and dtypes, sampling settings, token count: one line."""
        cfg = self.meta.get("config", {}) or {}
        model = (self.meta.get("model") or {}).get("name") or cfg.get("model") or "model ?"
        bits = [str(model)]
        if cfg.get("infer_engine"):
            bits.append(
                f"{cfg['infer_engine']} {cfg.get('infer_dtype', '?')} vs transformers "
                f"{cfg.get('train_dtype', '?')}"
            )
        if cfg.get("temperature") is not None:
            samp = f"T={cfg['temperature']:g}"
            for k in ("top_p", "top_k", "min_p"):
                if cfg.get(k) is not None:
                    samp += f" {k}={cfg[k]:g}"
            bits.append(samp)
        bits.append(f"{self.num_tokens:,} tokens")
        return ", ".join(bits)


def run_data(
    source: pd.DataFrame | str | Path,
    label: str | None = None,
    *,
    edges: Sequence[float] | str | None = A.DEFAULT_EDGES,
    eps: float | None = None,
    meta: dict[str, Any] | None = None,
) -> RunData:
    """Load a run (path) or take a token DataFrame, and compute what the figures draw."""
    path = None
    if isinstance(source, (str, Path)):
        path = Path(source)
        df, meta, _ = A.load_tokens(path, columns=PLOT_COLUMNS)
        label = label or path.name
    else:
        df = source
        if len(df) == 0:
            raise MismatchError("the token table is empty: nothing to plot")
        label = label or "run"
    e = A.parse_edges(edges)
    t = A.token_arrays(df, "train")
    est = theory.estimate_eps(t.eps_hat)
    eps_used = float(eps) if eps is not None else est
    return RunData(
        label=label,
        tokens=df,
        arrays=t,
        buckets=A.bucket_stats(t, e, eps=eps_used),
        seqs=A.sequence_stats(t),
        eps=eps_used,
        eps_estimator="--eps" if eps is not None else theory.eps_estimator_name(),
        edges=e,
        meta=meta or {},
        path=path,
    )


# ----------------------------------------------------------------------------- helpers


TITLE_IN = 0.42  # inches above the axes for the title
LINE_IN = 0.19  # inches per run-description line


def _new_fig(n_runs: int, ncols: int = 1, width: float = 7.5, height: float = 5.2):
    """A figure with a band at the top (title + one line per run) the layout keeps free."""
    top_in = TITLE_IN + LINE_IN * n_runs + 0.08
    fig = plt.figure(figsize=(width, height + top_in), layout="constrained")
    fig.get_layout_engine().set(rect=(0, 0, 1, height / (height + top_in)))
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _title(fig: Figure, what: str, runs: Sequence[RunData]) -> None:
    """Title (what is shown), then one line per run: model, engines and dtypes, sampling,
    tokens; each in its run's colour when several runs are overlaid."""
    H = fig.get_figheight()
    fig.text(0.5, 1 - 0.1 / H, what, ha="center", va="top", fontsize=12, fontweight="bold")
    for i, r in enumerate(runs):
        line = r.describe() if len(runs) == 1 else f"{r.label}: {r.describe()}"
        fig.text(
            0.5,
            1 - (TITLE_IN + LINE_IN * i) / H,
            line,
            ha="center",
            va="top",
            fontsize=8.5,
            color="0.25" if len(runs) == 1 else r.color,
        )


def _bucket_label(lo: float, hi: float, last: bool) -> str:
    def f(v: float) -> str:
        if 0 < v < 0.01:
            return f"1e{round(math.log10(v))}" if _is_pow10(v) else f"{v:.0e}"
        return f"{v:g}"

    return f"[{f(lo)}, {f(hi)}{']' if last else ')'}"


def _is_pow10(v: float) -> bool:
    e = math.log10(v)
    return abs(e - round(e)) < 1e-9


def _series(ax, gid: str):
    """The Line2D drawn with this gid (for tests and callers that read plotted data)."""
    for line in ax.get_lines():
        if line.get_gid() == gid:
            return line
    return None


def plotted(fig: Figure, gid: str) -> np.ndarray | None:
    """The y data of the series drawn with `gid` on any axes of `fig` (None if absent)."""
    for ax in fig.axes:
        line = _series(ax, gid)
        if line is not None:
            return np.asarray(line.get_ydata(), dtype=np.float64)
    return None


# ----------------------------------------------------------------------------- figures


def plot_bound(runs: Sequence[RunData]) -> Figure:
    """|delta| against (1 - p) on log-log axes (left: the bound's (1 - p) shape near p = 1)
    and against p (right: the tail, where it saturates near 2 eps). Token density, bucket
    means and 90 / 99 % quantiles, and the first-order and exact envelopes at each run's eps.
    The left panel's bucket means carry gid "bucket-mean:<label>"."""
    fig, (ax1, ax2) = _new_fig(len(runs), ncols=2, width=12.0, height=5.4)
    single = len(runs) == 1
    hidden = 0
    for r in runs:
        t = r.arrays
        x, y = t.one_minus_p, np.abs(t.delta)
        hidden += int(np.count_nonzero((x <= 0) | (y <= 0)))
    for ax, kind in ((ax1, "one_minus_p"), (ax2, "p")):
        hb = _bound_panel(ax, runs, kind)
        if hb is not None and kind == "p":
            cb = fig.colorbar(hb, ax=ax, pad=0.01, fraction=0.05, aspect=35)
            cb.set_label("tokens per hexagon (log scale)")
    ax1.set_xlabel("1 - p   (p = training-side probability of the sampled token)")
    ax2.set_xlabel("p = training-side probability of the sampled token")
    ax1.set_ylabel(f"|δ| = |logp_infer - logp_train|   ({NATS})")
    ax1.set_title("Against 1 - p: the mismatch vanishes as p → 1", loc="left")
    ax2.set_title("Against p: in the tail it saturates near 2ε", loc="left")
    ax2.sharey(ax1)
    est = runs[0].eps_estimator
    note = f"ε: {est}" + (f"; {hidden:,} tokens with δ = 0 or p = 1 not drawn" if hidden else "")
    ax1.text(
        0.99,
        0.02,
        note,
        transform=ax1.transAxes,
        ha="right",
        va="bottom",
        fontsize=7.5,
        color="0.35",
    )
    if single:
        ax1.legend(loc="upper left", fontsize=7.5)
    else:  # one legend for the line styles, one for the runs' colours
        ax1.legend(handles=_style_handles(), loc="upper left", fontsize=7.5)
        ax2.legend(handles=_run_handles(runs), loc="lower left", fontsize=7.5, title="run (ε)")
    # one colour scale for both panels' densities
    hbs = [c for ax in (ax1, ax2) for c in ax.collections if c.get_gid() == "density"]
    if len(hbs) == 2:
        vmax = max(float(np.max(h.get_array())) for h in hbs)
        for h in hbs:
            h.set_clim(0.6, vmax)
    return fig


ENVELOPE_EXACT_STYLE: dict[str, Any] = {"lw": 2.2, "ls": "-"}
ENVELOPE_FIRST_STYLE: dict[str, Any] = {"lw": 1.4, "ls": (0, (7, 2, 1, 2))}
QUANTILE_STYLE: dict[str, dict[str, Any]] = {
    "p90": {"ls": "--", "marker": "^", "ms": 3.5, "lw": 1.0},
    "p99": {"ls": ":", "marker": "v", "ms": 3.5, "lw": 1.0},
}


def _style_handles() -> list:
    """Legend entries for the line styles of the bound figure (in black)."""
    from matplotlib.lines import Line2D

    k = "0.15"
    return [
        Line2D([], [], color=k, marker="o", ms=5, lw=1.8, label="bucket mean |δ|"),
        Line2D([], [], color=k, **QUANTILE_STYLE["p90"], label="bucket 90th percentile"),
        Line2D([], [], color=k, **QUANTILE_STYLE["p99"], label="bucket 99th percentile"),
        Line2D(
            [], [], color=k, **ENVELOPE_EXACT_STYLE, label="exact bound log(1 + (1-p)(e^(2ε) - 1))"
        ),
        Line2D([], [], color=k, **ENVELOPE_FIRST_STYLE, label="first order 2ε(1 - p)"),
        Line2D([], [], color=k, lw=0.8, alpha=0.6, label="density: densest 50% / 90% of tokens"),
    ]


def _run_handles(runs: Sequence[RunData]) -> list:
    from matplotlib.lines import Line2D

    return [Line2D([], [], color=r.color, lw=3, label=f"{r.label} (ε = {r.eps:.3g})") for r in runs]


def _bound_panel(ax, runs: Sequence[RunData], kind: str):
    """One panel of the bound figure; x = 1 - p or p. Returns the hexbin (single run)."""
    single = len(runs) == 1
    hb = None
    xmins = []
    for r in runs:
        t = r.arrays
        xv = t.one_minus_p if kind == "one_minus_p" else t.p
        y = np.abs(t.delta)
        ok = (t.one_minus_p > 0) & (t.p > 0) & (y > 0)
        if not ok.any():
            continue
        # The x range stops near the 0.1% quantile: a few extreme tokens would otherwise
        # squeeze the plot (p down to 1e-50 happens); they stay in every statistic.
        floor = max(X_FLOOR, float(np.quantile(xv[ok], 1e-3)) / 3)
        ok &= xv >= floor
        xmins.append(floor)
        if single:
            hb = ax.hexbin(
                xv[ok],
                y[ok],
                xscale="log",
                yscale="log",
                bins="log",
                gridsize=(60, 40),
                mincnt=1,
                cmap="Greys",
                linewidths=0.0,
                rasterized=True,
                zorder=1,
            )
            hb.set_clim(vmin=0.6)
        else:
            _density_contours(ax, xv[ok], y[ok], r.color)
    ax.set_xscale("log")
    ax.set_yscale("log")
    tag = "" if kind == "one_minus_p" else "p-"
    for r in runs:
        b = r.buckets
        x_b = b["mean_one_minus_p"] if kind == "one_minus_p" else 1.0 - b["mean_one_minus_p"]
        draw = ((b["count"] > 0) & (x_b > 0) & (b["mean_abs_delta"] > 0)).to_numpy()
        bx = x_b.to_numpy()[draw]
        ax.plot(
            bx,
            b["mean_abs_delta"].to_numpy()[draw],
            "o-",
            color=r.color,
            ms=5,
            lw=1.8,
            zorder=5,
            gid=f"{tag}bucket-mean:{r.label}",
            label="bucket mean |δ|" if single else None,
        )
        for q in ("p90", "p99"):
            ax.plot(
                bx,
                b[f"{q}_abs_delta"].to_numpy()[draw],
                color=r.color,
                alpha=0.85,
                zorder=4,
                gid=f"{tag}bucket-{q}:{r.label}",
                label=f"bucket {q[1:]}th percentile" if single else None,
                **QUANTILE_STYLE[q],
            )
    lo = min(xmins, default=1e-6)
    grid = np.logspace(math.log10(lo), 0, 300)  # [G] the panel's x values
    if kind == "p":
        grid = grid[grid < 1]
    for r in runs:
        if not math.isfinite(r.eps) or r.eps <= 0:
            continue
        one_minus_p = grid if kind == "one_minus_p" else 1.0 - grid
        col = "black" if single else r.color
        ax.plot(
            grid,
            theory.envelope_exact(one_minus_p, r.eps),
            color=col,
            zorder=6,
            gid=f"{tag}envelope-exact:{r.label}",
            label=f"exact bound log(1 + (1-p)(e^(2ε) - 1)), ε = {r.eps:.3g}" if single else None,
            **ENVELOPE_EXACT_STYLE,
        )
        ax.plot(
            grid,
            theory.envelope_first_order(one_minus_p, r.eps),
            color=col,
            zorder=6,
            gid=f"{tag}envelope-first-order:{r.label}",
            label="first order 2ε(1 - p)" if single else None,
            **ENVELOPE_FIRST_STYLE,
        )
    return hb


def _density_contours(ax, x: np.ndarray, y: np.ndarray, color: str) -> None:
    """Lines enclosing the densest 50% and 90% of a run's tokens (a lightly smoothed
    log-log 2-D histogram): one density per run that several runs can share an axes with."""
    H, ex, ey = np.histogram2d(np.log10(x), np.log10(y), bins=(40, 30))  # [40, 30]
    if H.sum() < 50:
        ax.scatter(x, y, s=4, color=color, alpha=0.3, lw=0, zorder=2)
        return
    k = np.array([1.0, 2.0, 1.0]) / 4
    H = np.apply_along_axis(np.convolve, 0, np.pad(H, ((1, 1), (0, 0))), k, mode="valid")
    H = np.apply_along_axis(np.convolve, 1, np.pad(H, ((0, 0), (1, 1))), k, mode="valid")
    flat = np.sort(H.ravel())[::-1]
    cum = np.cumsum(flat) / flat.sum()
    levels = sorted({float(flat[min(np.searchsorted(cum, q), flat.size - 1)]) for q in (0.9, 0.5)})
    levels = [v for v in levels if v > 0]
    if not levels:
        return
    cx = 10 ** (0.5 * (ex[1:] + ex[:-1]))
    cy = 10 ** (0.5 * (ey[1:] + ey[:-1]))
    ax.contour(
        cx,
        cy,
        H.T,
        levels=levels,
        colors=[color],
        linewidths=[0.7, 1.1][: len(levels)],
        alpha=0.55,
        zorder=2,
    )


def plot_bias(runs: Sequence[RunData]) -> Figure:
    """Signed mean delta per probability bucket, +- 1.96 standard errors, and a zero line:
    the systematic tail bias of sampled tokens (theory.md s.3). Empty buckets are skipped;
    a bucket with one token (no standard error) is drawn hollow. The drawn means carry
    gid "bias-mean:<label>"."""
    fig, (ax,) = _new_fig(len(runs), width=9.0)
    edges = runs[0].edges
    nb = len(edges) - 1
    width = 0.8 / len(runs)
    multi = len(runs) > 1
    for i, r in enumerate(runs):
        b = r.buckets
        count = b["count"].to_numpy()
        draw = count > 0
        pos = np.arange(nb)[draw] + (i - (len(runs) - 1) / 2) * width  # [B'] dodged
        mean = b["mean_delta"].to_numpy()[draw]
        se = b["se_delta"].to_numpy()[draw]
        ax.errorbar(
            pos,
            mean,
            yerr=1.96 * np.nan_to_num(se, nan=0.0),
            fmt="none",
            ecolor=r.color,
            capsize=3,
            lw=1.3,
        )
        solid = np.isfinite(se)
        ax.plot(
            pos[solid],
            mean[solid],
            "o",
            color=r.color,
            ms=5.5,
            zorder=4,
            label=r.label if multi else "mean δ ± 1.96 SE (95% interval)",
        )
        if (~solid).any():
            ax.plot(
                pos[~solid],
                mean[~solid],
                "o",
                color=r.color,
                mfc="white",
                ms=5.5,
                zorder=4,
                label="one token: no SE" if not multi and i == 0 else None,
            )
        ax.plot(pos, mean, ls="none", gid=f"bias-mean:{r.label}")  # the drawn means
        for k, x in zip(
            np.arange(nb), np.arange(nb) + (i - (len(runs) - 1) / 2) * width, strict=True
        ):
            ax.annotate(
                f"{count[k]:,}" if count[k] else "–",
                (x, 0),
                xycoords=("data", "axes fraction"),
                xytext=(0, 3 + 8 * (len(runs) - 1 - i)) if multi else (0, 3),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=6.3,
                color=r.color if multi else "0.4",
            )
    ax.axhline(0.0, color="black", lw=1.0, zorder=0)
    labels = [_bucket_label(edges[k], edges[k + 1], k == nb - 1) for k in range(nb)]
    ax.set_xticks(np.arange(nb), labels, rotation=35, ha="right")
    ax.set_xlim(-0.6, nb - 0.4)
    ax.set_xlabel("bucket of p_train (training-side probability of the sampled token)")
    ax.set_ylabel(f"mean δ = mean(logp_infer - logp_train)   ({NATS})")
    ax.set_title(
        "Mean δ per bucket; > 0: the trainer under-rates the tokens the engine sampled",
        loc="left",
    )
    if multi:
        ax.legend(title="run: mean δ ± 1.96 SE (95%)", loc="upper right")
    else:
        ax.legend(loc="upper right")
    ax.annotate(
        "tokens per bucket ↓",
        (1.0, 0.0),
        xycoords="axes fraction",
        xytext=(0, 3 + 8 * len(runs)),
        textcoords="offset points",
        ha="right",
        va="bottom",
        fontsize=6.5,
        color="0.4",
    )
    ymin, ymax = ax.get_ylim()
    ax.set_ylim(ymin - 0.08 * len(runs) * (ymax - ymin), ymax)  # room for the counts
    return fig


def cumulative_by_position(r: RunData) -> pd.DataFrame:
    """Mean over sequences of the running sum of delta at each position t, with its SE.

    Sequences holding an infinite delta are left out; a sequence contributes to the
    positions it reaches. Columns: pos, n, mean, se.
    """
    df = r.tokens
    seq_ok = r.seqs.set_index("seq_id")["num_infinite"] == 0
    d = df[df["seq_id"].map(seq_ok).to_numpy(dtype=bool)]
    if "pos" in d.columns:
        d = d.sort_values(["seq_id", "pos"], kind="stable")
        pos = d["pos"].to_numpy()
    else:
        pos = d.groupby("seq_id", sort=False).cumcount().to_numpy()
    cum = d.groupby("seq_id", sort=False)["delta"].cumsum().to_numpy()  # [n]
    n = np.bincount(pos)
    s1 = np.bincount(pos, weights=cum)
    s2 = np.bincount(pos, weights=cum * cum)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / n
        var = (s2 - n * mean**2) / (n - 1)
        se = np.sqrt(np.maximum(var, 0) / n)
    out = pd.DataFrame({"pos": np.arange(n.size), "n": n, "mean": mean, "se": se})
    return out[out["n"] > 0].reset_index(drop=True)


def plot_sequence(runs: Sequence[RunData]) -> Figure:
    """Left: per-sequence sum delta against sum (1 - p). Right: mean cumulative delta along
    the completion, with a 95% band: does the mismatch drift with length?"""
    fig, (ax1, ax2) = _new_fig(len(runs), ncols=2, width=11.0, height=4.8)
    for r in runs:
        s = r.seqs[np.isfinite(r.seqs["sum_delta"])]
        x, y = s["sum_one_minus_p"].to_numpy(), s["sum_delta"].to_numpy()
        fit = A._ols(x, y)
        lab = f"{r.label}: " if len(runs) > 1 else ""
        ax1.scatter(
            x,
            y,
            s=7,
            color=r.color,
            alpha=0.45,
            lw=0,
            rasterized=True,
            label=f"{lab}one dot per sequence ({len(s):,})",
        )
        if math.isfinite(fit["slope"]):
            gx = np.linspace(x.min(), x.max(), 50)
            ax1.plot(
                gx,
                fit["intercept"] + fit["slope"] * gx,
                color=r.color,
                lw=1.6,
                gid=f"seq-fit:{r.label}",
                label=f"{lab}least squares: slope {fit['slope']:+.3g}, r = {fit['corr']:.2f}",
            )
        c = cumulative_by_position(r)
        keep = c["n"] >= MIN_SEQS_PER_POS  # positions few sequences reach are noise
        c = c[keep]
        ax2.plot(
            c["pos"],
            c["mean"],
            color=r.color,
            lw=1.6,
            gid=f"cum-mean:{r.label}",
            label=f"{lab}mean over sequences (positions ≥ {MIN_SEQS_PER_POS} reach)",
        )
        ax2.fill_between(
            c["pos"],
            c["mean"] - 1.96 * c["se"],
            c["mean"] + 1.96 * c["se"],
            color=r.color,
            alpha=0.2,
            lw=0,
            label=f"{lab}95% band (± 1.96 SE)",
        )
    ax1.axhline(0, color="black", lw=0.8, zorder=0)
    ax2.axhline(0, color="black", lw=0.8, zorder=0)
    ax1.set_xlabel(r"$\Sigma_t\,(1 - p_t)$ over the sequence   (tokens)")
    ax1.set_ylabel(rf"$\Sigma_t\,\delta_t$ over the sequence   ({NATS})")
    ax1.set_title("Per-sequence sum of δ against sum of (1 - p)", loc="left")
    ax2.set_xlabel("position t in the completion (tokens)")
    ax2.set_ylabel(rf"mean cumulative δ  $\Sigma_{{s \leq t}}\,\delta_s$   ({NATS})")
    ax2.set_title("Mean cumulative δ along the completion", loc="left")
    ax1.legend(loc="best", fontsize=7.5)
    ax2.legend(loc="best", fontsize=7.5)
    return fig


def _symlog_bins(v: np.ndarray, linthresh: float, per_decade: int = 8) -> np.ndarray:
    """Bin edges, linear inside +-linthresh and log-spaced beyond, covering v."""
    vmax = max(float(np.max(np.abs(v))) if v.size else linthresh, linthresh * 1.01)
    decades = max(math.log10(vmax / linthresh), 0.1)
    pos = np.logspace(math.log10(linthresh), math.log10(vmax) + 1e-9, int(decades * per_decade) + 2)
    lin = np.linspace(-linthresh, linthresh, 5)[1:-1]
    return np.concatenate([-pos[::-1], lin, pos])


def plot_distribution(runs: Sequence[RunData]) -> Figure:
    """Left: histogram of delta (symmetric-log x, log-spaced bins). Right: histogram of the
    sequence log importance ratio log prod rho_t = -sum delta. Caps 2, 3, 5 marked on both
    (a token's ratio rho = exp(-delta) exceeds C where delta < -log C)."""
    fig, (ax1, ax2) = _new_fig(len(runs), ncols=2, width=11.5, height=4.8)
    multi = len(runs) > 1
    all_d = np.concatenate([r.arrays.delta for r in runs])
    nz = np.abs(all_d[all_d != 0])
    lt = float(np.quantile(nz, 0.01)) if nz.size else 1e-6
    lt = 10 ** math.floor(math.log10(max(lt, 1e-12)))  # linear region of the symlog axis
    bins = _symlog_bins(all_d, lt)
    seq_all = [-r.seqs["sum_delta"][np.isfinite(r.seqs["sum_delta"])].to_numpy() for r in runs]
    cat = np.concatenate(seq_all)
    lo = min(float(cat.min()) if cat.size else -1.0, -math.log(5) * 1.1)
    hi = max(float(cat.max()) if cat.size else 1.0, math.log(5) * 1.1)
    sbins = np.linspace(lo, hi, 50)
    for r, sd in zip(runs, seq_all, strict=True):
        d = r.arrays.delta
        fr = [100 * float(np.mean(np.exp(-d) > c)) if d.size else math.nan for c in M.CAPS]
        fs = [100 * float(np.mean(np.exp(sd) > c)) if sd.size else math.nan for c in M.CAPS]
        who = f"{r.label}: " if multi else ""
        _, _, ph = ax1.hist(
            d,
            bins=bins,
            histtype="step",
            color=r.color,
            lw=1.5,
            label=f"{who}{d.size:,} tokens; ρ above 2 / 3 / 5: "
            + " / ".join(f"{v:.2g}%" for v in fr),
        )
        for patch in ph:
            patch.set_gid(f"delta-hist:{r.label}")
        ax2.hist(sd, bins=sbins, histtype="stepfilled", color=r.color, alpha=0.2, lw=0)
        _, _, ph = ax2.hist(
            sd,
            bins=sbins,
            histtype="step",
            color=r.color,
            lw=1.5,
            label=f"{who}{sd.size:,} sequences; above 2 / 3 / 5: "
            + " / ".join(f"{v:.2g}%" for v in fs),
        )
        for patch in ph:
            patch.set_gid(f"seq-log-ratio-hist:{r.label}")
    for c, ls in zip(M.CAPS, ("--", "-.", ":"), strict=True):
        ax1.axvline(-math.log(c), color="0.25", ls=ls, lw=1.0, label=f"ρ = {c:g}  (δ = -log {c:g})")
        ax2.axvline(math.log(c), color="0.25", ls=ls, lw=1.0, label=f"cap {c:g}  (log {c:g})")
    ax1.set_xscale("symlog", linthresh=lt, linscale=0.5)
    for ax in (ax1, ax2):
        ax.set_yscale("log")
        ymin, ymax = ax.get_ylim()
        ax.set_ylim(max(ymin, 0.5), ymax * 15)  # headroom for the legend
    ax1.set_xlabel(f"δ = logp_infer - logp_train   ({NATS}; symmetric log, linear within ±{lt:g})")
    ax1.set_ylabel("tokens per bin (bins equal in log |δ|)")
    ax1.set_title("Per-token δ (finite tokens) and token ratio caps", loc="left")
    ax2.set_xlabel(
        rf"sequence log importance ratio  $\Sigma_t \log\rho_t = -\Sigma_t \delta_t$   ({NATS})"
    )
    ax2.set_ylabel("sequences per bin")
    ax2.set_title("Sequence log importance ratio and caps 2 / 3 / 5", loc="left")
    ax1.legend(loc="upper center", fontsize=7)
    ax2.legend(loc="upper left", fontsize=7)
    return fig


def plot_sweep(runs: Sequence[RunData], sweeps: Sequence[dict[str, Any]] | None = None) -> Figure:
    """Kept-token mismatch against the bias bound (pruned mass summed over a sequence) for
    each pruning threshold rho, the recommended rho marked. `sweeps`: one `sweep.sweep`
    result per run (computed from the run paths if None). The drawn kept-token means carry
    gid "sweep-<key>:<label>"."""
    from matplotlib.lines import Line2D

    if sweeps is None:
        from . import sweep as S  # lazy: the sweep module is only needed here

        sweeps = [S.sweep(r.path if r.path is not None else _sweep_source(r)) for r in runs]
    fig, (ax1, ax2) = _new_fig(len(runs), ncols=2, width=11.5, height=4.8)
    multi = len(runs) > 1
    run_handles = []
    for i, (r, sw) in enumerate(zip(runs, sweeps, strict=True)):
        rows = [row for row in sw["rows"] if row["seq_bias_bound_mean"] is not None]
        rec = sw["recommended"]["rho"]
        rec_txt = f"recommended ρ = {_rho_str(rec)}" if rec is not None else "no ρ recommended"
        run_handles.append(
            Line2D(
                [], [], color=r.color, lw=2.5, label=f"{r.label}: {rec_txt}" if multi else rec_txt
            )
        )
        if not rows:
            continue
        x = np.array([row["seq_bias_bound_mean"] for row in rows], dtype=float)
        xpos = np.where(x > 0, x, np.nan)  # [R] a log axis cannot show 0
        rho = np.array([row["rho"] for row in rows], dtype=float)
        for ax, key in ((ax1, "kept_mean_abs_delta"), (ax2, "kept_mean_delta")):
            y = np.array([np.nan if row[key] is None else row[key] for row in rows], dtype=float)
            ax.plot(xpos, y, "o-", color=r.color, ms=4, lw=1.5, gid=f"sweep-{key}:{r.label}")
            base = sw["baseline"][key]
            if base is not None:
                ax.axhline(base, color=r.color, ls=":", lw=1.1)
            if i == 0:  # label the decades of the first run only: legible
                for xi, yi, ri in zip(xpos, y, rho, strict=True):
                    if np.isfinite(xi) and np.isfinite(yi) and _is_label_rho(ri):
                        ax.annotate(
                            f"ρ={_rho_str(ri)}",
                            (xi, yi),
                            xytext=(2, 5),
                            textcoords="offset points",
                            fontsize=6.5,
                            color="0.3",
                        )
            if rec is not None:
                k = int(np.argmin(np.abs(rho - rec)))
                ax.plot(
                    xpos[k],
                    y[k],
                    marker="*",
                    ms=15,
                    color=r.color,
                    mec="black",
                    mew=0.8,
                    ls="none",
                    zorder=6,
                )
    max_bias = sweeps[0]["max_bias"]
    ax1.axvline(max_bias, color="0.35", ls="--", lw=1.0)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel(r"mean per-sequence bias bound $\Sigma_t m(c_t)$   (pruned probability mass)")
    ax2.axhline(0, color="black", lw=0.8, zorder=0)
    ax1.set_ylabel(f"kept-token mean |δ|   ({NATS})")
    ax2.set_ylabel(f"kept-token mean δ   ({NATS})")
    rule = sweeps[0]["rule"]
    ax1.set_title(f"Mismatch left after pruning ({rule} rule) vs the bias it costs", loc="left")
    ax2.set_title("Signed mean δ of the kept tokens (tail bias)", loc="left")
    k = "0.2"
    style = [
        Line2D([], [], color=k, marker="o", ms=4, lw=1.5, label="kept tokens, one point per ρ"),
        Line2D([], [], color=k, ls=":", lw=1.1, label="no pruning"),
        Line2D([], [], color=k, marker="*", ms=12, mec="black", ls="none", label="recommended ρ"),
        Line2D([], [], color="0.35", ls="--", lw=1.0, label=f"--max-bias {max_bias:g}"),
    ]
    ax1.legend(handles=style, loc="best", fontsize=7.5)
    ax2.legend(handles=run_handles, loc="best", fontsize=7.5)
    return fig


def _rho_str(r: float) -> str:
    """1e-05 -> 1e-5, 0.0002 -> 2e-4, 0.5 -> 0.5."""
    if r >= 0.01:
        return f"{r:g}"
    m, e = f"{r:.0e}".split("e")
    return f"{m}e{int(e)}"


def _is_label_rho(r: float) -> bool:
    """Label every other decade of the 1-2-5 grid (1e-8, 1e-6, ...), 0.1 and 0.5."""
    if abs(r - 0.5) < 1e-12 or abs(r - 0.1) < 1e-12:
        return True
    return _is_pow10(r) and round(math.log10(r)) % 2 == 0


def _sweep_source(r: RunData) -> Any:
    raise MismatchError(f"the sweep figure of {r.label} needs a run directory, not a table")


# ----------------------------------------------------------------------------- output

PLOTTERS: dict[str, Callable[[Sequence[RunData]], Figure]] = {
    "bound": plot_bound,
    "bias": plot_bias,
    "sequence": plot_sequence,
    "distribution": plot_distribution,
    "sweep": plot_sweep,
}
TITLES: dict[str, str] = {
    "bound": "The (1 - p) bound: |δ| against 1 - p",
    "bias": "Tail bias: signed mean δ per probability bucket",
    "sequence": "Accumulation over sequences",
    "distribution": "Distributions of δ and of the importance ratio",
    "sweep": "Vocabulary-pruning sweep: remaining mismatch vs bias",
}


def check_formats(formats: Sequence[str]) -> list[str]:
    """Validated, de-duplicated output formats (MismatchError on an unknown one)."""
    out: list[str] = []
    for f in formats:
        for part in str(f).split(","):
            part = part.strip().lower().lstrip(".")
            if not part:
                continue
            if part not in FORMATS:
                raise MismatchError(f"unknown --format {part!r}; use one of {', '.join(FORMATS)}")
            if part not in out:
                out.append(part)
    if not out:
        raise MismatchError(f"--format needs a value: one of {', '.join(FORMATS)}")
    return out


def check_figures(figures: Sequence[str] | None) -> list[str]:
    """Validated figure names (all of FIGURES when None or empty)."""
    if not figures:
        return list(FIGURES)
    bad = [f for f in figures if f not in FIGURES]
    if bad:
        raise MismatchError(f"unknown figure {bad[0]!r}; choose from {', '.join(FIGURES)}")
    return [f for f in FIGURES if f in figures]


def load_runs(
    run_paths: Sequence[str | Path],
    labels: Sequence[str] | None = None,
    *,
    edges: Sequence[float] | str | None = A.DEFAULT_EDGES,
    eps: float | None = None,
) -> list[RunData]:
    """RunData of each run, coloured in order; labels default to the directory names."""
    if not run_paths:
        raise MismatchError("no runs given: pass one or more run directories")
    if labels and len(labels) != len(run_paths):
        raise MismatchError(
            f"got {len(labels)} --label value(s) for {len(run_paths)} run(s): give one per run"
        )
    runs = []
    for i, p in enumerate(run_paths):
        r = run_data(p, labels[i] if labels else None, edges=edges, eps=eps)
        r.color = PALETTE[i % len(PALETTE)]
        runs.append(r)
    names = [r.label for r in runs]
    if len(set(names)) < len(names):  # same directory names: disambiguate by position
        for i, r in enumerate(runs):
            r.label = f"{i + 1}:{r.label}"
    return runs


def make_figures(
    run_paths: Sequence[str | Path],
    out_dir: str | Path,
    formats: Sequence[str] = ("png",),
    labels: Sequence[str] | None = None,
    *,
    figures: Sequence[str] | None = None,
    dpi: int = DEFAULT_DPI,
    edges: Sequence[float] | str | None = A.DEFAULT_EDGES,
    eps: float | None = None,
    notes: list[str] | None = None,
) -> list[Path]:
    """Draw the figures of one or several runs into out_dir as <figure>.<format>.

    A figure that cannot be drawn for these runs (e.g. `sweep` on a run without a stored
    pruning grid) is skipped with a line appended to `notes`. Returns the written paths.
    """
    from .runs import check_writable_dir

    fmts = check_formats(formats)
    names = check_figures(figures)
    out = Path(out_dir)
    runs = load_runs(run_paths, labels, edges=edges, eps=eps)
    check_writable_dir(out)
    written: list[Path] = []
    with plt.rc_context(STYLE):
        for name in names:
            try:
                fig = PLOTTERS[name](runs)
            except MismatchError as e:
                if notes is not None:
                    notes.append(f"{name}: skipped ({e})")
                continue
            except ImportError as e:
                if notes is not None:
                    notes.append(f"{name}: skipped ({e})")
                continue
            _title(fig, TITLES[name], runs)
            for fmt in fmts:
                path = out / f"{name}.{fmt}"
                try:
                    fig.savefig(path, dpi=dpi, format=fmt)
                except OSError as e:
                    plt.close(fig)
                    raise MismatchError(f"cannot write {path}: {e.strerror or e}") from e
                written.append(path)
            plt.close(fig)
    return written


def figure(name: str, runs: Sequence[RunData]) -> Figure:
    """One figure by name, styled and titled as make_figures draws it (not saved)."""
    with plt.rc_context(STYLE):
        fig = PLOTTERS[check_figures([name])[0]](runs)
        _title(fig, TITLES[name], runs)
    return fig


__all__ = [
    "FIGURES",
    "FORMATS",
    "PALETTE",
    "RunData",
    "check_formats",
    "cumulative_by_position",
    "figure",
    "load_runs",
    "make_figures",
    "plot_bias",
    "plot_bound",
    "plot_distribution",
    "plot_sequence",
    "plot_sweep",
    "plotted",
    "run_data",
]
