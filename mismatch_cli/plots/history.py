"""The history figure: a trainer's own mismatch metrics over its steps (`mismatch history`),
the drift figure's counterpart for logs with no tokens.

Not one of `FIGURES` (those read run directories): it draws `history.history` results, one
panel per kind of quantity found (|delta|, KL estimates, importance ratios, shares,
|delta p|), one line per logged key and log, the steps where the drift alarm was raised
shaded. Drawn series carry gid "history-<key>:<label>".
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..errors import MismatchError
from .style import DEFAULT_DPI, NATS, PALETTE, STYLE

NAME = "history"
TITLE = "Mismatch over training steps, from the trainer's own log"
# panel: axis label, in the order drawn
HISTORY_PANELS: dict[str, str] = {
    "abs": f"|δ|   ({NATS})",
    "kl": f"KL estimates, mean δ   ({NATS})",
    "ratio": "importance ratio r = exp(-δ)",
    "share": "shares, ESS, correlation",
    "prob": "|p_train - p_infer|",
}
LINESTYLES = ("-", "--", ":", "-.")


def plot_history(results: Sequence[dict[str, Any]]) -> Figure:
    """One panel per kind of quantity present, sharing the step axis."""
    panels = [
        p for p in HISTORY_PANELS if any(s["panel"] == p for r in results for s in r["series"])
    ]
    if not panels:
        raise MismatchError("no mismatch series to draw")
    fig, axes = plt.subplots(
        len(panels), 1, sharex=True, figsize=(9.0, 1.2 + 2.4 * len(panels)), layout="constrained"
    )
    axes = np.atleast_1d(axes)
    for li, r in enumerate(results):
        ls = LINESTYLES[li % len(LINESTYLES)]
        for ax, panel in zip(axes, panels, strict=True):
            mine = [s for s in r["series"] if s["panel"] == panel]
            for si, s in enumerate(mine):
                label = s["key"] if len(results) == 1 else f"{r['label']}: {s['key']}"
                ax.plot(
                    s["steps"],
                    s["values"],
                    ls,
                    marker="o" if len(s["steps"]) <= 40 else None,
                    ms=3,
                    lw=1.3,
                    color=PALETTE[si % len(PALETTE)],
                    label=label,
                    gid=f"history-{s['key']}:{r['label']}",
                )
        for i, st in enumerate(r["alert"]["raised_steps"]):
            for ax in axes:
                lab = "drift alarm raised" if i == 0 and li == 0 and ax is axes[0] else None
                ax.axvspan(st - 0.5, st + 0.5, color="#D55E00", alpha=0.08, lw=0, label=lab)
    for ax, panel in zip(axes, panels, strict=True):
        ax.set_ylabel(HISTORY_PANELS[panel])
        ax.legend(loc="best")
        ys = np.concatenate([np.asarray(ln.get_ydata(), float) for ln in ax.get_lines()])
        ys = ys[np.isfinite(ys)]
        # log scale once positive values span more than a decade (a signed series stays linear)
        if panel in ("abs", "kl") and ys.size and (ys > 0).all() and ys.max() > 10 * ys.min():
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("training step")
    names = ", ".join(f"{r['label']} ({r['format']})" for r in results)
    fig.suptitle(f"{TITLE}\n{names}", fontsize=11)
    return fig


def write_history_figure(
    results: Sequence[dict[str, Any]], out_dir: str | Path, formats: Sequence[str] = ("png",)
) -> list[Path]:
    """Draw the history figure into out_dir/history.<format>; returns the written paths."""
    from ..runs import check_writable_dir

    out = Path(out_dir)
    check_writable_dir(out)
    written = []
    with plt.rc_context(STYLE):
        fig = plot_history(results)
        try:
            for fmt in formats:
                path = out / f"{NAME}.{fmt}"
                try:
                    fig.savefig(path, dpi=DEFAULT_DPI, format=fmt)
                except OSError as e:
                    raise MismatchError(f"cannot write {path}: {e.strerror or e}") from e
                written.append(path)
        finally:
            plt.close(fig)
    return written
