"""The position figure: the mismatch against the position of a token in its completion."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from ..errors import MismatchError
from .data import RunData
from .style import NATS, new_fig

NAME = "position"
TITLE = "Mismatch by position in the completion"
DEFAULT = False  # drawn when asked for (`--figure position`): most runs fill one bucket only

_PANELS: tuple[tuple[str, str], ...] = (
    ("mean_abs_delta", f"mean |δ|   ({NATS})"),
    ("k3", "k3 = mean(r - 1 - log r)   (KL estimate)"),
)


def filled(r: RunData) -> list[dict]:
    """The run's position buckets that hold finite tokens (`report --json` by_position)."""
    return [b for b in r.by_position or [] if b["num_tokens"] and b["mean_abs_delta"] is not None]


def plot_position(runs: Sequence[RunData]) -> Figure:
    """Two panels against the position bucket (0-63, 64-255, ... tokens into the completion):
    mean |delta| and k3, one line per run, each point labelled with its token count. A growth
    along the completion points to errors that accumulate with context (KV cache, attention
    kernels at long context). Drawn series carry gid "position-<key>:<label>"."""
    if not any(filled(r) for r in runs):
        raise MismatchError("no position column: the position figure needs the token table's pos")
    labels = next([b["position"] for b in r.by_position] for r in runs if r.by_position is not None)
    fig, (ax0, ax1) = new_fig(len(runs), ncols=2, width=11.0, height=4.6)
    for r in runs:
        rows = filled(r)
        if not rows:
            continue
        x = np.array([labels.index(b["position"]) for b in rows], dtype=float)
        for ax, (key, _) in zip((ax0, ax1), _PANELS, strict=True):
            y = np.array([np.nan if b[key] is None else b[key] for b in rows], dtype=float)
            ax.plot(x, y, "o-", color=r.color, ms=4, lw=1.4, label=r.label,
                    gid=f"position-{key}:{r.label}")  # fmt: skip
        if len(runs) == 1:
            for xi, b in zip(x, rows, strict=True):
                ax0.annotate(f"{b['num_tokens']:,}", (xi, b["mean_abs_delta"]), fontsize=7,
                             xytext=(0, 5), textcoords="offset points", ha="center")  # fmt: skip
    for ax, (_, ylabel) in zip((ax0, ax1), _PANELS, strict=True):
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlim(-0.4, len(labels) - 0.6)
        ax.set_xlabel("tokens into the completion")
        ax.set_ylabel(ylabel)
        ys = np.concatenate([np.asarray(ln.get_ydata(), float) for ln in ax.get_lines()])
        top = np.nanmax(ys) if np.isfinite(ys).any() else 0.0
        ax.set_ylim(0, top * 1.15 if top > 0 else 1e-3)  # room for the point labels
    ax0.set_title("Mismatch per token, by position" + (" (labels: tokens)" if len(runs) == 1
                                                        else ""), loc="left")  # fmt: skip
    if len(runs) > 1:
        ax0.legend(loc="best")
    return fig
