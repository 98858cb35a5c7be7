"""The distribution figure: delta and the sequence log importance ratio."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from .. import metrics as M
from ..errors import MismatchError
from .data import DeltaHist, RunData
from .style import NATS, new_fig

NAME = "distribution"
TITLE = "Distributions of δ and of the importance ratio"


def plot_distribution(runs: Sequence[RunData]) -> Figure:
    """Left: histogram of delta (symmetric-log x, bins of 1/8 decade of |delta|, linear
    within +-lt). Right: histogram of the sequence log importance ratio log prod r_t =
    -sum delta. Caps 2, 3, 5 marked on both (a token's ratio r = exp(-delta) exceeds C where
    delta < -log C). The delta histogram is the streamed `DeltaHist` of each run, drawn on
    bins shared by the runs: lt is the decade of the 1% quantile of nonzero |delta|."""
    if not any(r.num_finite for r in runs):
        raise MismatchError("too few tokens: no finite delta")
    fig, (ax1, ax2) = new_fig(len(runs), ncols=2, width=11.5, height=4.8)
    multi = len(runs) > 1
    hists = [r.deltas for r in runs]
    lt = DeltaHist.linear_threshold(hists)  # linear region of the symlog axis
    vmax = max(max(h.max_abs for h in hists), lt * 1.01)
    bins = hists[0].edges(lt, vmax)  # [2K + 5]
    num_outer = (bins.size - 5) // 2
    seq_all = [-r.seqs["sum_delta"][np.isfinite(r.seqs["sum_delta"])].to_numpy() for r in runs]
    cat = np.concatenate(seq_all)
    lo = min(float(cat.min()) if cat.size else -1.0, -math.log(5) * 1.1)
    hi = max(float(cat.max()) if cat.size else 1.0, math.log(5) * 1.1)
    sbins = np.linspace(lo, hi, 50)
    for r, sd in zip(runs, seq_all, strict=True):
        n = r.num_finite
        fr = [100 * r.metrics[f"frac_token_above_cap_{c:g}"] if n else math.nan for c in M.CAPS]
        fs = [100 * float(np.mean(np.exp(sd) > c)) if sd.size else math.nan for c in M.CAPS]
        who = f"{r.label}: " if multi else ""
        _, _, ph = ax1.hist(
            bins[:-1],  # one entry per bin, weighted by its count
            bins=bins,
            weights=r.deltas.counts(lt, num_outer),
            histtype="step",
            color=r.color,
            lw=1.5,
            label=f"{who}{n:,} tokens; r above 2 / 3 / 5: " + " / ".join(f"{v:.2g}%" for v in fr),
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
        ax1.axvline(-math.log(c), color="0.25", ls=ls, lw=1.0, label=f"r = {c:g}  (δ = -log {c:g})")
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
        rf"sequence log importance ratio  $\Sigma_t \log r_t = -\Sigma_t \delta_t$   ({NATS})"
    )
    ax2.set_ylabel("sequences per bin")
    ax2.set_title("Sequence log importance ratio and caps 2 / 3 / 5", loc="left")
    ax1.legend(loc="upper center", fontsize=7)
    ax2.legend(loc="upper left", fontsize=7)
    return fig
