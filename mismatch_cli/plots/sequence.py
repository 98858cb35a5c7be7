"""The sequence figure: accumulation of delta over a completion."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .. import analysis as A
from ..errors import MismatchError
from .data import RunData
from .style import NATS, new_fig

MIN_SEQS_PER_POS = 10


NAME = "sequence"
TITLE = "Accumulation over sequences"


def cumulative_by_position(r: RunData) -> pd.DataFrame:
    """Mean over sequences of the running sum of delta at each position t, with its SE
    (from the streamed `PositionSums`).

    Sequences holding an infinite delta are left out; a sequence contributes to the
    positions it reaches. Columns: pos, n, mean, se. Raises MismatchError when a
    sequence's rows were not stored in position order (no running sum can be streamed).
    """
    ps = r.positions
    if not ps.ordered:
        raise MismatchError(
            f"{r.label}: the rows of a sequence are not stored in position order across the "
            "token table, so its running sum cannot be streamed"
        )
    n, s1, s2 = ps.n, ps.s1, ps.s2
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / n
        var = (s2 - n * mean**2) / (n - 1)
        se = np.sqrt(np.maximum(var, 0) / n)
    out = pd.DataFrame({"pos": np.arange(n.size), "n": n, "mean": mean, "se": se})
    return out[out["n"] > 0].reset_index(drop=True)


def plot_sequence(runs: Sequence[RunData]) -> Figure:
    """Left: per-sequence sum delta against sum (1 - p). Right: mean cumulative delta along
    the completion, with a 95% band: does the mismatch drift with length?"""
    if not any(np.isfinite(r.seqs["sum_delta"]).sum() >= 2 for r in runs):
        raise MismatchError("too few sequences: fewer than 2 without an infinite delta")
    fig, (ax1, ax2) = new_fig(len(runs), ncols=2, width=11.0, height=4.8)
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
