"""The sweep figure: kept-token mismatch against the bias bound, per pruning threshold."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..errors import MismatchError
from ..formatting import edge
from .data import RunData, corrections_of
from .style import NATS, is_pow10, new_fig

NAME = "sweep"
TITLE = "Vocabulary-pruning sweep: remaining mismatch vs bias"


def plot_sweep(runs: Sequence[RunData], sweeps: Sequence[dict[str, Any]] | None = None) -> Figure:
    """Kept-token mismatch against the bias bound (pruned mass summed over a sequence) for
    each pruning threshold rho, the recommended rho marked. `sweeps`: one `sweep.sweep`
    result per run (computed from the run paths if None). The drawn kept-token means carry
    gid "sweep-<key>:<label>"."""
    from matplotlib.lines import Line2D

    if sweeps is None:
        from .. import sweep as S  # lazy: the sweep module is only needed here

        sweeps = [_sweep_of(r, S) for r in runs]
    fig, (ax1, ax2) = new_fig(len(runs), ncols=2, width=11.5, height=4.8)
    multi = len(runs) > 1
    run_handles = []
    for i, (r, sw) in enumerate(zip(runs, sweeps, strict=True)):
        rows = [row for row in sw["rows"] if row["seq_bias_bound_mean"] is not None]
        rec = sw["recommended"]["rho"]
        rec_txt = f"recommended ρ = {edge(rec)}" if rec is not None else "no ρ recommended"
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
                            f"ρ={edge(ri)}",
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


def _is_label_rho(r: float) -> bool:
    """Label every other decade of the 1-2-5 grid (1e-8, 1e-6, ...), 0.1 and 0.5."""
    if abs(r - 0.5) < 1e-12 or abs(r - 0.1) < 1e-12:
        return True
    return is_pow10(r) and round(math.log10(r)) % 2 == 0


def _sweep_of(r: RunData, S: Any) -> dict[str, Any]:
    """`sweep.sweep` of a run (min-p), from the corrections' pass when the corrections
    figure is drawn too (r.cache["share_corrections"], set by `make_figures`), else its own."""
    if r.path is None:
        return S.sweep(_sweep_source(r))
    if r.cache.get("share_corrections"):
        try:
            corrections_of(r)
        except MismatchError:
            pass  # the corrections figure says why; the sweep gets its own pass below
        acc = r.cache.get("sweeps", {}).get("min-p")
        if acc is not None:
            return acc.result(run=str(r.path))
    return S.sweep(r.path)


def _sweep_source(r: RunData) -> Any:
    raise MismatchError(f"the sweep figure of {r.label} needs a run directory, not a table")
