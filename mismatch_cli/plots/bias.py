"""The bias figure: signed mean delta per probability bucket."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from ..errors import MismatchError
from ..formatting import bucket_label
from .data import RunData
from .style import NATS, new_fig

NAME = "bias"
TITLE = "Tail bias: signed mean δ per probability bucket"


def plot_bias(runs: Sequence[RunData]) -> Figure:
    """Signed mean delta per probability bucket, +- 1.96 standard errors, and a zero line:
    the systematic tail bias of sampled tokens (docs/theory.md, "Why sampled tail tokens are
    biased"). Empty buckets are skipped;
    a bucket with one token (no standard error) is drawn hollow. The drawn means carry
    gid "bias-mean:<label>"."""
    if not any(int(r.buckets["count"].sum()) for r in runs):
        raise MismatchError("too few tokens: no token with a finite delta inside the buckets")
    fig, (ax,) = new_fig(len(runs), width=9.0)
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
    labels = [bucket_label(edges[k], edges[k + 1], k == nb - 1) for k in range(nb)]
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
