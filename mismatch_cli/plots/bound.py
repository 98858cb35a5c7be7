"""The bound figure: |delta| against 1 - p and p, with the envelopes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .. import theory
from ..errors import MismatchError
from .data import RunData
from .style import NATS, new_fig

X_FLOOR = 1e-12  # smallest p or 1 - p the bound figure draws
DENSITY_BINS = (85, 57)  # cells of about the area of the former hexbin's (60, 40) grid
CONTOUR_BINS = (40, 30)  # the density a contour is drawn from (several runs)

NAME = "bound"
TITLE = "The (1 - p) bound: |δ| against 1 - p"


def plot_bound(runs: Sequence[RunData]) -> Figure:
    """|delta| against (1 - p) on log-log axes (left: the bound's (1 - p) shape near p = 1)
    and against p (right: the tail, where it saturates near 2 eps). Token density (a
    streamed 2-D histogram on log-log bins), bucket means and 90 / 99 % quantiles, and the
    first-order and exact envelopes at each run's eps. The left panel's bucket means carry
    gid "bucket-mean:<label>", the densities "density"."""
    drawable = sum(r.bound.drawable for r in runs)
    if drawable == 0:
        raise MismatchError("too few tokens: none has p < 1 and delta != 0 to draw on log axes")
    fig, (ax1, ax2) = new_fig(len(runs), ncols=2, width=12.0, height=5.4)
    single = len(runs) == 1
    hidden = sum(r.bound.num_finite - r.bound.drawable for r in runs)
    for ax, kind in ((ax1, "one_minus_p"), (ax2, "p")):
        hb = _bound_panel(ax, runs, kind)
        if hb is not None and kind == "p":
            cb = fig.colorbar(hb, ax=ax, pad=0.01, fraction=0.05, aspect=35)
            cb.set_label("tokens per bin (log scale)")
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
    """One panel of the bound figure; x = 1 - p or p. Returns the density mesh (single run)."""
    from matplotlib.colors import LogNorm

    single = len(runs) == 1
    hb = None
    xmins = []
    for r in runs:
        if not r.bound.drawable:
            continue
        # The x range stops near the 0.1% quantile: a few extreme tokens would otherwise
        # squeeze the plot (p down to 1e-50 happens); they stay in every statistic.
        floor = max(X_FLOOR, r.bound.x_floor(kind))
        xmins.append(floor)
        if single:
            H, xe, ye = r.bound.density(kind, floor, DENSITY_BINS)
            if not H.size:
                continue
            hb = ax.pcolormesh(
                xe,
                ye,
                np.ma.masked_equal(H.T, 0),  # [ny, nx]: empty cells stay blank
                cmap="Greys",
                norm=LogNorm(vmin=0.6, vmax=max(float(H.max()), 1.0)),
                linewidth=0,
                rasterized=True,
                zorder=1,
            )
            hb.set_gid("density")
        else:
            _density_contours(ax, *r.bound.density(kind, floor, CONTOUR_BINS), r.color)
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


def _density_contours(ax, H: np.ndarray, xe: np.ndarray, ye: np.ndarray, color: str) -> None:
    """Lines enclosing the densest 50% and 90% of a run's tokens (its log-log 2-D histogram
    H [nx, ny] on edges xe, ye, lightly smoothed): one density per run that several runs
    can share an axes with. Under 50 tokens: a dot per occupied cell."""
    if not H.size:
        return
    cx = np.sqrt(xe[1:] * xe[:-1])  # [nx] geometric centres
    cy = np.sqrt(ye[1:] * ye[:-1])  # [ny]
    if H.sum() < 50:
        ix, iy = np.nonzero(H)
        ax.scatter(cx[ix], cy[iy], s=4, color=color, alpha=0.3, lw=0, zorder=2)
        return
    H = H.astype(np.float64)
    k = np.array([1.0, 2.0, 1.0]) / 4
    H = np.apply_along_axis(np.convolve, 0, np.pad(H, ((1, 1), (0, 0))), k, mode="valid")
    H = np.apply_along_axis(np.convolve, 1, np.pad(H, ((0, 0), (1, 1))), k, mode="valid")
    flat = np.sort(H.ravel())[::-1]
    cum = np.cumsum(flat) / flat.sum()
    levels = sorted({float(flat[min(np.searchsorted(cum, q), flat.size - 1)]) for q in (0.9, 0.5)})
    levels = [v for v in levels if v > 0]
    if not levels or min(H.shape) < 2:
        return
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
