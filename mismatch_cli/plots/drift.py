"""The drift figure: how the mismatch moves over training steps (imported runs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from ..errors import MismatchError
from .data import RunData
from .style import NATS, new_fig

NAME = "drift"
TITLE = "Mismatch over training steps"

# (key of analysis.group_metrics, axis label, a share drawn in percent)
PANELS: tuple[tuple[str, str, bool], ...] = (
    ("mean_abs_delta", f"mean |δ|   ({NATS})", False),
    ("k3", "k3 = mean(r - 1 - log r)   (KL estimate)", False),
    ("tail_abs_delta_share", "tail (p_train < 0.1) share of Σ|δ|", True),
    ("frac_ratio_outside_0.5_2", "tokens with r outside [0.5, 2]", True),
)


def drift_groups(r: RunData) -> list[dict] | None:
    """Per-step headline metrics of a run (`analysis.group_metrics` by step), or None when
    the run has no step column or fewer than two steps."""
    groups = r.steps  # streamed with the run (`analysis.GroupAccumulator`)
    return groups if groups is not None and len(groups) >= 2 else None


def applies(runs: Sequence[RunData]) -> bool:
    """Drawn by default only for runs that carry training steps (imported runs)."""
    return any(r.steps is not None for r in runs)


def plot_drift(runs: Sequence[RunData]) -> Figure:
    """Four panels against the training step: mean |delta|, k3, the tail (p_train < 0.1)
    share of sum |delta|, and the fraction of tokens whose importance ratio r = exp(-delta)
    lies outside [0.5, 2]; one line per run. Runs without steps (or with one step) are left
    out; with none left the figure is skipped. Drawn series carry gid "drift-<key>:<label>"."""
    data = [(r, drift_groups(r)) for r in runs]
    data = [(r, g) for r, g in data if g is not None]
    if not data:
        what = "no step column" if all(r.steps is None for r in runs) else "one step only"
        raise MismatchError(
            f"{what}: drift needs a run imported with two or more training steps (`mismatch import`)"
        )
    fig, (ax0,) = new_fig(len(runs), width=10.0, height=6.6)
    ax0.remove()
    axes = fig.subplots(2, 2, sharex=True).ravel()
    for r, groups in data:
        step = np.array([g["step"] for g in groups], dtype=float)
        for ax, (key, _, _) in zip(axes, PANELS, strict=True):
            y = np.array([np.nan if g[key] is None else g[key] for g in groups], dtype=float)
            ax.plot(
                step,
                y,
                "o-",
                color=r.color,
                ms=3.5,
                lw=1.4,
                label=r.label,
                gid=f"drift-{key}:{r.label}",
            )
    for ax, (_, label, share) in zip(axes, PANELS, strict=True):
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ys = np.concatenate([np.asarray(ln.get_ydata(), float) for ln in ax.get_lines()])
        ys = ys[np.isfinite(ys)]
        if share:
            ax.yaxis.set_major_formatter(FuncFormatter(_percent))
        pos = ys[ys > 0]
        if not share and pos.size and pos.max() > 10 * pos.min():
            ax.set_yscale("log")  # once the values span more than a decade
        elif ys.size:
            _at_least(ax, ys)
    for ax in axes[2:]:
        ax.set_xlabel("training step")
    axes[0].set_title("Mismatch per token", loc="left")
    axes[2].set_title("Where it lives, and what importance sampling sees", loc="left")
    if len(runs) > 1:
        axes[0].legend(loc="best")
    return fig


def _at_least(ax: Any, ys: np.ndarray, rel: float = 0.2) -> None:
    """A linear axis spans at least `rel` of its largest |value|: a series that moves by
    0.1% is drawn flat, not as a cliff from the top of the panel to the bottom."""
    lo, hi = float(ys.min()), float(ys.max())
    if lo == hi == 0:  # all zero: 0 at the bottom, no negative shares
        ax.set_ylim(-0.0005, 0.01)
        return
    need = rel * max(abs(lo), abs(hi))
    if need > 0 and hi - lo < need:
        mid = (lo + hi) / 2
        bottom = mid - need / 2
        if lo >= 0 > bottom:  # quantities that cannot be negative keep 0 as the floor
            bottom = 0.0
        ax.set_ylim(bottom, bottom + max(need, hi - bottom + need / 2))


def _percent(v: float, _pos: int) -> str:
    return f"{100 * v:.3g}%"
