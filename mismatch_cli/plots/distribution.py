"""The distribution figure: delta and the sequence log importance ratio."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from .. import metrics as M
from ..errors import MismatchError
from .data import RunData
from .style import NATS, new_fig

NAME = "distribution"
TITLE = "Distributions of δ and of the importance ratio"


def _symlog_bins(v: np.ndarray, linthresh: float, per_decade: int = 8) -> np.ndarray:
    """Bin edges, linear inside +-linthresh and log-spaced beyond, covering v."""
    vmax = max(float(np.max(np.abs(v))) if v.size else linthresh, linthresh * 1.01)
    decades = max(math.log10(vmax / linthresh), 0.1)
    pos = np.logspace(math.log10(linthresh), math.log10(vmax) + 1e-9, int(decades * per_decade) + 2)
    lin = np.linspace(-linthresh, linthresh, 5)[1:-1]
    return np.concatenate([-pos[::-1], lin, pos])


def plot_distribution(runs: Sequence[RunData]) -> Figure:
    """Left: histogram of delta (symmetric-log x, log-spaced bins). Right: histogram of the
    sequence log importance ratio log prod r_t = -sum delta. Caps 2, 3, 5 marked on both
    (a token's ratio r = exp(-delta) exceeds C where delta < -log C)."""
    if not any(r.arrays.num_finite for r in runs):
        raise MismatchError("too few tokens: no finite delta")
    fig, (ax1, ax2) = new_fig(len(runs), ncols=2, width=11.5, height=4.8)
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
