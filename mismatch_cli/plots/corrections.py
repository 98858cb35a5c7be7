"""The corrections figure: what each mismatch correction removes against what it leaves."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from ..correction_rules import (
    KINDS,
    MASKS_SEQUENCES,
    MASKS_TOKENS,
    METHODS,
    PRUNES,
    REWEIGHTS,
    methods_of_kind,
)
from ..errors import MismatchError
from ..formatting import bucket_label, edge
from .data import RunData, corrections_of
from .style import LINE_IN, NATS, TITLE_IN

NAME = "corrections"
TITLE = "Mismatch corrections: signal removed vs mismatch left"

# Marker per kind of method (`correction_rules.KINDS`, declared by each method), so a reader
# sees at a glance what a point does; a kind without a marker here fails the figure's test.
MARKERS: dict[str, str] = {REWEIGHTS: "o", MASKS_TOKENS: "s", PRUNES: "*", MASKS_SEQUENCES: "^"}
DVP_STYLE = {"dvp-minp": "--", "dvp-abs": "-."}
LINTHRESH = 1e-4  # symlog x: linear below 0.01% removed
CMAP = "cividis"  # colour-blind safe, monotone in lightness
HEAT_MIN = 1e-4  # lowest share on the heatmap's log colour scale


def marker(name: str) -> str:
    """The marker of a registered method, by its kind."""
    return MARKERS[METHODS[name].kind]


def _kind_label(kind: str) -> str:
    """'masks tokens (icepop, icepop-narrow)': the kind and the methods of it."""
    names = [n for n in methods_of_kind(kind) if n != "none"]
    return f"{kind} ({', '.join(names)})" if names else kind


def _results(runs: Sequence[RunData]) -> list[dict[str, Any]]:
    return [corrections_of(r) for r in runs]


def _points(res: dict[str, Any], y: str) -> list[tuple[str, float, float]]:
    """(name, x, y) of the methods drawn: not skipped, x and y defined (y > 0 for log)."""
    x = res["pareto_axes"]["x"]
    out = []
    for r in res["methods"]:
        if r["skipped"] is None and r[x] is not None and r[y] is not None:
            out.append((r["name"], float(r[x]), float(r[y])))
    return out


def _pct_tick(v: float, _pos: Any) -> str:
    if v == 0:
        return "0"
    p = 100 * v
    return f"{p:g}%" if p >= 0.01 else f"{p:.0e}%"


def _front_line(ax: Any, pts: list[tuple[str, float, float]], front: list[str], **kw: Any) -> None:
    """The Pareto front as a staircase through its points (lower-left is better)."""
    f = sorted((x, y) for n, x, y in pts if n in front)
    if not f:
        return
    xs, ys = zip(*f, strict=True)
    ax.step(xs, ys, where="post", **kw)


def _annotate(ax: Any, pts: list[tuple[str, float, float]]) -> None:
    """One label per drawn position (coincident methods share it: 'none and 9 more'),
    alternately above and below in x order so neighbours do not overwrite each other."""
    groups: dict[tuple[float, float], list[str]] = {}
    for n, x, y in pts:
        groups.setdefault((round(x, 12), round(y, 15)), []).append(n)
    for k, ((x, y), names) in enumerate(sorted(groups.items())):
        text = " = ".join(names) if len(names) <= 2 else f"{names[0]} and {len(names) - 1} more"
        ax.annotate(
            text, (x, y), xytext=(4, 5 if k % 2 == 0 else -11), textcoords="offset points",
            fontsize=6.5, color="0.2", rotation=0,
        )  # fmt: skip


def _ylim(ax: Any, results: list[dict[str, Any]], y: str, curve_y: str) -> None:
    """Zoom on the methods: the y range of their points and of the DVP curves up to the
    largest share any method removes (compare at equal cost); the curves run on below."""
    ys, xmax = [], 0.0
    for res in results:
        pts = _points(res, y)
        ys += [p[2] for p in pts]
        xmax = max([xmax, *(p[1] for p in pts)])
    for res in results:
        for c in res["dvp_curves"]:
            ys += [
                p[curve_y]
                for p in c["points"]
                if p[curve_y] is not None and p["removed_token_share"] is not None
                and p["removed_token_share"] <= max(xmax, 1e-3) * 1.5
            ]  # fmt: skip
    ys = [v for v in ys if v > 0]
    if ys:
        lo, hi = min(ys), max(ys)
        pad = max((hi / lo) ** 0.08, 1.15)
        ax.set_ylim(lo / pad, hi * pad)


def _scatter_panel(
    ax: Any, runs: Sequence[RunData], results: list[dict[str, Any]], y: str, curve_y: str
) -> None:
    multi = len(runs) > 1
    for i, (r, res) in enumerate(zip(runs, results, strict=True)):
        pts = _points(res, y)
        for n, px, py in pts:
            ax.plot(
                [px], [py], ls="none", marker=marker(n), ms=9 if marker(n) == "*" else 6,
                color=r.color, mec="black" if n in res["pareto"] else r.color, mew=0.8,
                alpha=0.9, zorder=5, gid=f"{y}-{n}:{r.label}",
            )  # fmt: skip
        _front_line(
            ax, pts, res["pareto"], color=r.color, lw=1.2, alpha=0.6, gid=f"pareto-{y}:{r.label}"
        )
        for c in res["dvp_curves"]:
            xs = np.array([p["removed_token_share"] for p in c["points"]], dtype=float)
            ys = np.array([np.nan if p[curve_y] is None else p[curve_y] for p in c["points"]])
            ax.plot(
                xs, ys, ls=DVP_STYLE[c["name"]], lw=1.1, marker=".", ms=3, color=r.color,
                alpha=0.75, zorder=3, gid=f"dvp-{y}-{c['name']}:{r.label}",
            )  # fmt: skip
            if i == 0 and c is res["dvp_curves"][0]:  # label one curve: legible
                rhos = [p["rho"] for p in c["points"]]
                for k in range(0, len(rhos), 6):
                    if np.isfinite(xs[k]) and np.isfinite(ys[k]):
                        ax.annotate(
                            f"ρ={edge(rhos[k])}", (xs[k], ys[k]), xytext=(-4, -9),
                            textcoords="offset points", fontsize=5.5, color="0.45",
                        )  # fmt: skip
        if i == 0 and not multi:
            _annotate(ax, pts)
        if i == 0:
            gone = [m["name"] for m in res["methods"] if m["skipped"] is None and m[y] is None]
            if gone:
                ax.text(
                    0.99, 0.99, f"not drawn, every token masked: {', '.join(gone)}",
                    transform=ax.transAxes, ha="right", va="top", fontsize=6.5, color="0.3",
                )  # fmt: skip
        base = res["all_tokens"]["k3" if y == "left_k3" else "p99_abs_delta"]
        if base is not None:
            ax.axhline(base, color=r.color, ls=":", lw=0.9, zorder=1)
    ax.set_xscale("symlog", linthresh=LINTHRESH, linscale=0.6)
    ax.set_xlim(left=0)
    ax.xaxis.set_major_formatter(FuncFormatter(_pct_tick))
    ys = [p[2] for res in results for p in _points(res, y)]
    if ys and min(ys) > 0:
        ax.set_yscale("log")
        _ylim(ax, results, y, curve_y)


def _heatmap(ax: Any, run: RunData, res: dict[str, Any], fig: Figure) -> None:
    """Masked-or-clipped share per p_train bucket (columns) and method (rows)."""
    rows = [r for r in res["methods"] if r["skipped"] is None]
    if not rows:
        ax.set_axis_off()
        return
    buckets = rows[0]["by_bucket"]
    M = np.array(
        [
            [np.nan if not b["num_tokens"] else b["masked"] + b["clipped"] for b in r["by_bucket"]]
            for r in rows
        ],
        dtype=float,
    )  # [methods, buckets]
    cmap = plt.get_cmap(CMAP).with_extremes(bad="white")  # 0 (untouched) and empty buckets
    norm = LogNorm(vmin=HEAT_MIN, vmax=1.0, clip=True)
    im = ax.imshow(np.ma.masked_where(~(M > 0), M), cmap=cmap, norm=norm, aspect="auto")
    im.set_gid(f"bites:{run.label}")
    for (i, j), v in np.ndenumerate(M):
        if not np.isfinite(v):
            text, color = "–", "0.6"
        elif v == 0:
            text, color = "0", "0.75"
        else:
            text = "100" if v >= 0.995 else f"{100 * v:.2g}"
            color = "black" if v > 0.03 else "white"
        ax.text(j, i, text, ha="center", va="center", fontsize=6, color=color)
    last = len(buckets) - 1
    ax.set_xticks(range(len(buckets)))
    ax.set_xticklabels(
        [
            f"{bucket_label(b['lo'], b['hi'], k == last)}\n{b['num_tokens']:,}"
            for k, b in enumerate(buckets)
        ],
        fontsize=6.5,
    )
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r["name"] for r in rows], fontsize=7.5)
    ax.grid(False)
    ax.set_xlabel(
        "bucket of p_train (token count below); cells: % masked or clipped, 0 = untouched, – = no token"
    )
    cb = fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
    cb.ax.yaxis.set_major_formatter(FuncFormatter(_pct_tick))
    cb.set_label("share of the bucket's tokens\nmasked or clipped (log scale)", fontsize=8)


def plot_corrections(
    runs: Sequence[RunData], results: Sequence[dict[str, Any]] | None = None
) -> Figure:
    """Top: one point per method, x = share of tokens (advantage signal, when the run has
    advantages) removed, y = k3 (left) or p99 |delta| (right) left on the tokens that still
    carry gradient; the Pareto front as a staircase, DVP's sweep as a curve through its
    grid thresholds, no correction as a dotted line. Bottom: the share of each probability
    bucket's tokens each method masks or clips (the first run). `results`: one
    `corrections.corrections` result per run (computed if None). Points carry gid
    "left_k3-<method>:<label>" / "left_p99_abs_delta-<method>:<label>"."""
    results = list(results) if results is not None else _results(runs)
    if not any(_points(res, "left_k3") for res in results):
        raise MismatchError("no method leaves a token to measure")
    n_rows = max(sum(r["skipped"] is None for r in res["methods"]) for res in results[:1])
    top_h, heat_h = 4.4, 0.9 + 0.24 * n_rows
    height = top_h + heat_h
    top_in = TITLE_IN + LINE_IN * len(runs) + 0.08
    fig = plt.figure(figsize=(12.0, height + top_in), layout="constrained")
    fig.get_layout_engine().set(rect=(0, 0, 1, height / (height + top_in)))
    axd = fig.subplot_mosaic(
        [["k3", "p99"], ["heat", "heat"]], height_ratios=[top_h, heat_h], empty_sentinel=None
    )
    _scatter_panel(axd["k3"], runs, results, "left_k3", "left_k3")
    _scatter_panel(axd["p99"], runs, results, "left_p99_abs_delta", "left_p99_abs_delta")
    xname = results[0]["pareto_axes"]["x"]
    xlabel = (
        "share of the advantage-weighted signal removed"
        if xname == "removed_advantage_share"
        else "share of finite tokens removed (masked)"
    )
    for key, ylab, title in (
        ("k3", "k3 left  (KL estimate, nats)", "Mismatch left (k3) vs what the method removes"),
        ("p99", f"p99 |δ| left  ({NATS})", "The tail left (p99 |δ|) vs what the method removes"),
    ):
        axd[key].set_xlabel(xlabel)
        axd[key].set_ylabel(ylab)
        axd[key].set_title(title, loc="left")
    _heatmap(axd["heat"], runs[0], results[0], fig)
    who = f" ({runs[0].label})" if len(runs) > 1 else ""
    axd["heat"].set_title(f"Where each method acts{who}", loc="left")
    kinds = [
        Line2D([], [], ls="none", marker=MARKERS[k], color="0.3",
               ms=8 if MARKERS[k] == "*" else 6, label=_kind_label(k))
        for k in KINDS
    ]  # fmt: skip
    extra = [
        Line2D([], [], ls="none", marker="o", color="white", mec="black", mew=0.8, ms=6,
               label="on the Pareto front (black edge)"),
        Line2D([], [], color="0.3", lw=1.2, drawstyle="steps-post", label="Pareto front"),
        Line2D([], [], color="0.3", ls="--", marker=".", ms=3, lw=1.1,
               label="DVP min-p sweep over ρ"),
        Line2D([], [], color="0.3", ls="-.", marker=".", ms=3, lw=1.1,
               label="DVP absolute sweep over ρ"),
        Line2D([], [], color="0.3", ls=":", lw=0.9, label="no correction"),
    ]  # fmt: skip
    axd["k3"].legend(handles=kinds + extra, loc="best", fontsize=6.5)
    if len(runs) > 1:
        axd["p99"].legend(
            handles=[Line2D([], [], color=r.color, lw=2.5, label=r.label) for r in runs],
            loc="best",
            fontsize=7.5,
        )
    return fig
