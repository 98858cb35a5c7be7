"""The diagnose figure: one bar per variant (k3 and mean |delta|, log axes) and the bucket
curves overlaid. Drawn for the variant runs of a diagnose directory (`mismatch diagnose`,
`mismatch plot DIR`), or for any two or more runs with `--figure diagnose`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from ..errors import MismatchError
from ..formatting import bucket_label
from .data import RunData
from .style import NATS, PALETTE, new_fig

NAME = "diagnose"
TITLE = "Where the mismatch comes from: one bar per variant, on the same tokens"
DEFAULT = False  # drawn only when asked for (a diagnose directory, or --figure diagnose)
_LINESTYLES = ("-", "--", ":", "-.")
_HATCHES = ("", "///", "...", "xx")


def _cycle(i: int) -> int:
    """How many times the palette has wrapped at run i: runs sharing a colour differ by
    line style and bar hatching."""
    return (i // len(PALETTE)) % len(_LINESTYLES)


def plot_diagnose(runs: Sequence[RunData]) -> Figure:
    """Left: k3 = mean(exp(-delta) - 1 + delta) per run, right: mean |delta|, horizontal bars
    on log axes, largest k3 on top; a run at exactly 0 (the null check) is marked "0" at the
    axis' left end instead of a bar. Right panel: mean |delta| per p_train bucket, one curve
    per run (log y). Bars carry gid "k3:<label>" / "mean-abs:<label>", curves
    "bucket-curve:<label>"."""
    if len(runs) < 2:
        raise MismatchError(
            "the diagnose figure compares two or more runs (a diagnose directory's variants)"
        )
    k3 = np.array([r.metrics["k3"] for r in runs], dtype=np.float64)  # [R]
    mad = np.array([r.metrics["mean_abs_delta"] for r in runs], dtype=np.float64)  # [R]
    order = np.argsort(-np.nan_to_num(k3, nan=-1.0), kind="stable")  # largest k3 on top
    fig, (ax1, ax2, ax3) = new_fig(len(runs), ncols=3, width=15.0, height=5.4)
    ypos = np.arange(len(runs))[::-1]  # [R] first in order at the top
    for ax, vals, key, xlabel in (
        (ax1, k3, "k3", "k3 = mean(e^(-δ) - 1 + δ)   (log)"),
        (ax2, mad, "mean-abs", f"mean |δ|   ({NATS}, log)"),
    ):
        pos = vals[vals > 0]
        lo = float(pos.min()) / 4 if pos.size else 1e-12
        hi = float(pos.max()) * 3 if pos.size else 1.0
        for y, i in zip(ypos, order, strict=True):
            r, v = runs[i], vals[i]
            if v > 0:
                (bar,) = ax.barh(y, v - lo, left=lo, color=r.color, height=0.7,
                                 hatch=_HATCHES[_cycle(i)], edgecolor="white")  # fmt: skip
                bar.set_gid(f"{key}:{r.label}")
                ax.text(v * 1.15, y, f"{v:.2g}", va="center", fontsize=7.5)
            else:
                txt = "0 (exactly)" if v == 0 else "–"
                ax.text(lo * 1.5, y, txt, va="center", fontsize=8, color="0.2")
        ax.set_xscale("log")
        ax.set_xlim(lo, hi * 4)
        ax.set_yticks(ypos, [runs[i].label for i in order])
        ax.set_xlabel(xlabel)
        ax.grid(axis="y", visible=False)
    ax1.set_title("k3 per variant (KL(q‖p) estimate)", loc="left")
    ax2.set_title("mean |δ| per variant", loc="left")
    ax2.set_yticklabels([])

    edges = runs[0].edges
    nb = len(edges) - 1
    x = np.arange(nb)
    for i in order:
        r = runs[i]
        m = r.buckets["mean_abs_delta"].to_numpy(dtype=np.float64)  # [B]
        ok = np.isfinite(m) & (m > 0)
        if not ok.any():
            ax3.plot([], [], color=r.color, label=f"{r.label}: 0 in every bucket")
            continue
        (line,) = ax3.plot(
            x[ok],
            m[ok],
            marker="o",
            ms=3.5,
            lw=1.4,
            color=r.color,
            ls=_LINESTYLES[_cycle(i)],
            label=r.label,
        )
        line.set_gid(f"bucket-curve:{r.label}")
    ax3.set_yscale("log")
    ax3.set_xticks(x, [bucket_label(edges[k], edges[k + 1], k == nb - 1) for k in range(nb)],
                   rotation=45, ha="right")  # fmt: skip
    ax3.set_xlabel("p_train bucket")
    ax3.set_ylabel(f"mean |δ| in the bucket   ({NATS}, log)")
    ax3.set_title("mean |δ| by p_train bucket", loc="left")
    ax3.legend(fontsize=7, ncol=2)
    return fig
