"""The report page: one self-contained HTML file of one run, several runs, or a diagnose
directory (`mismatch report RUN... --html FILE`; `measure`, `demo`, `import` and
`diagnose` write RUN/report.html).

Built from run directories only (never a model), in the streamed passes the commands use:
one `plots.data.run_data` per run (the report's aggregates and the figures' histograms:
`analysis.report` is built from them, so the page's tables and figures are one pass), one
`sweep.sweep` and one `corrections.corrections` per run. Memory is one batch plus
per-sequence arrays, whatever the run size.

The page is a list of sections (`SECTIONS`): each is a function `(PageData) -> dict`
(the context of its template `templates/page/<id>.html.j2`) that raises `Absent("why")`
when the runs lack what it needs; the page then shows that one line instead. Every number
becomes text here, through `formatting` (templates only place strings). Figures are
inline: SVG data URIs, or PNG where the SVG would be large (the bound figure's 2-D
histogram). No network, no external file: CSS is inline, links are `#section` anchors or
point at docs/theory.md.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MismatchError, first_line
from .formatting import DASH, bucket_label, edge, fmt, params_text, pct, ratio_x, times
from .metrics import METRIC_DEFINITIONS, METRIC_ROWS
from .schema import REPORT_HTML

SVG_LIMIT = 300_000  # bytes of SVG above which a figure is embedded as PNG instead
PNG_DPI = 110
THEORY = "docs/theory.md"
# docs/theory.md's section anchors (GitHub's heading slugs)
ANCHORS = {
    "bound": "3-the-1--p-bound",
    "eps": "4-estimating-ε-from-top-k-log-probs",
    "tail": "5-why-sampled-tail-tokens-are-biased",
    "dvp": "6-dynamic-vocabulary-pruning-dvp",
    "metrics": "7-the-metrics-rl-frameworks-log",
    "conventions": "8-conventions-used-everywhere-in-the-tool",
    "corrections": "9-mismatch-corrections-mismatch-corrections",
    "distribution": "10-distribution-level-mismatch",
}


class Absent(Exception):
    """A section the runs cannot fill: the message is the one line the page shows."""


def theory_href(anchor: str) -> str:
    """A link to a section of docs/theory.md: the checkout's file when the package runs from
    one (an editable install), else the path relative to the project's root."""
    local = Path(__file__).resolve().parent.parent / THEORY
    base = local.as_uri() if local.is_file() else THEORY
    return f"{base}#{ANCHORS[anchor]}"


# ----------------------------------------------------------------------------- the data


@dataclass
class Image:
    """A figure, embedded: `src` is a data URI."""

    name: str
    title: str
    alt: str
    src: str
    mime: str
    nbytes: int


@dataclass
class PageData:
    """Everything the sections read, computed once."""

    title: str
    runs: list[Any]  # plots.data.RunData, in order (the first is the reference)
    reports: list[dict[str, Any]]  # analysis.report of each run
    sweeps: list[dict[str, Any] | str]  # sweep.sweep of each run, or why not
    corrections: list[dict[str, Any] | str]  # corrections.corrections, or why not
    figures: dict[str, Image | str] = field(default_factory=dict)  # name -> image or why not
    diagnose: dict[str, Any] | None = None  # diagnose.json of a diagnose directory
    diagnose_dir: Path | None = None
    notes: list[str] = field(default_factory=list)  # skipped figures, as `measure` prints

    @property
    def multi(self) -> bool:
        return len(self.runs) > 1


def _encode(fig: Any) -> tuple[str, bytes]:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    data = buf.getvalue()
    if len(data) <= SVG_LIMIT:
        return "image/svg+xml", data
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PNG_DPI, metadata={"Software": None})
    return "image/png", buf.getvalue()


def _image(name: str, title: str, fig: Any, runs: Sequence[Any]) -> Image:
    import matplotlib.pyplot as plt

    try:
        mime, data = _encode(fig)
    finally:
        plt.close(fig)
    alt = f"Figure '{name}': {title}. " + "; ".join(f"{r.label}: {r.describe()}" for r in runs)
    src = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return Image(name, title, alt, src, mime, len(src))


def draw(name: str, runs: Sequence[Any], **results: Any) -> Image | str:
    """One figure of the page, embedded, or why it cannot be drawn (as `make_figures` says)."""
    import matplotlib.pyplot as plt

    from . import plots as P

    with plt.rc_context(P.STYLE):
        try:
            fig = P.PLOTTERS[name](runs, **results)
        except (MismatchError, ImportError) as e:
            return f"skipped ({first_line(e)})"
        P.style.draw_title(fig, P.TITLES[name], runs)
    return _image(name, P.TITLES[name], fig, runs)


def _result_or_reason(fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | str:
    try:
        return fn()
    except MismatchError as e:
        return first_line(e)


def gather(
    paths: Sequence[str | Path],
    labels: Sequence[str] | None = None,
    *,
    edges: Sequence[float] | str | None = None,
    eps: float | None = None,
) -> PageData:
    """The page's data of runs (or one diagnose directory): each run streamed through the
    report's and the figures' passes, its sweep and its corrections; the figures drawn.
    `edges`, `eps`: as `report`'s --edges and --eps (None: the defaults)."""
    from . import analysis as A
    from . import corrections as C
    from . import sweep as S
    from .plots import DEFAULT_FIGURES
    from .plots.data import load_runs
    from .runs import diagnose_runs

    if not paths:
        raise MismatchError("no runs given: `mismatch report RUN [RUN ...] --html FILE`")
    diag, diag_dir = None, None
    run_paths = [Path(p) for p in paths]
    if len(run_paths) == 1 and (found := diagnose_runs(run_paths[0])) is not None:
        import json

        diag_dir = run_paths[0]
        diag = json.loads((diag_dir / "diagnose.json").read_text())
        variant_paths, variant_names = found
        if not variant_paths:
            raise MismatchError(f"diagnose directory {diag_dir} holds no variant run")
        all_runs = load_runs(variant_paths, variant_names, edges=edges, eps=eps)
        base = next((i for i, n in enumerate(variant_names) if n == "baseline"), 0)
        runs = [all_runs[base]]
    else:
        all_runs = runs = load_runs(run_paths, labels, edges=edges, eps=eps)
    reports = [A.report(r.agg, A.run_info(r.path, r.meta), r.warnings) for r in runs]
    sweeps = [_result_or_reason(lambda r=r: S.sweep(r.path)) for r in runs]
    corr = [_result_or_reason(lambda r=r: C.corrections(r.path, edges=r.edges)) for r in runs]
    title = (
        f"mismatch diagnose: {diag_dir.name}"
        if diag_dir is not None
        else "mismatch report: " + ", ".join(r.label for r in runs)
    )
    page = PageData(title, runs, reports, sweeps, corr, diagnose=diag, diagnose_dir=diag_dir)
    for name in DEFAULT_FIGURES:
        if name == "sweep":
            ok = [s for s in sweeps if isinstance(s, dict)]
            img = (
                draw(name, runs, sweeps=sweeps)
                if len(ok) == len(runs)
                else f"skipped ({next(s for s in sweeps if isinstance(s, str))})"
            )
        elif name == "corrections":
            bad = [c for c in corr if isinstance(c, str)]
            img = draw(name, runs, results=corr) if not bad else f"skipped ({bad[0]})"
        else:
            img = draw(name, runs)
        page.figures[name] = img
        if isinstance(img, str):
            page.notes.append(f"figure {name}: {img}")
    if diag is not None:
        page.figures["diagnose"] = draw("diagnose", all_runs)
        if isinstance(page.figures["diagnose"], str):
            page.notes.append(f"figure diagnose: {page.figures['diagnose']}")
    return page


# ----------------------------------------------------------------------------- sections


def _side(rep: dict[str, Any]) -> str:
    return "p_train" if rep.get("by", "train") == "train" else "p_infer"


def _fig(page: PageData, name: str) -> dict[str, Any]:
    """A figure's template context: the image, or the one line why it is absent."""
    img = page.figures.get(name)
    if img is None:
        return {"name": name, "image": None, "why": "not drawn for these runs"}
    if isinstance(img, str):
        return {"name": name, "image": None, "why": img}
    return {"name": name, "image": img, "why": None}


def _engine_text(side: dict[str, Any], cfg_engine: Any, cfg_dtype: Any) -> str:
    bits = [str(side.get("engine") or cfg_engine or DASH)]
    dtype = side.get("dtype") or cfg_dtype
    if dtype:
        bits.append(str(dtype))
    if side.get("mode"):
        bits.append(f"{side['mode']} mode")
    if side.get("attn_implementation"):
        bits.append(f"attention {side['attn_implementation']}")
    return ", ".join(bits)


def _provenance(meta: Any) -> str:
    cmd = meta.command
    if cmd == "import":
        src = meta.source
        files = src.get("files") or []
        names = ", ".join(Path(str(f.get("path", "?"))).name for f in files[:5])
        more = f" and {len(files) - 5} more" if len(files) > 5 else ""
        how = (
            "rescored by transformers" if src.get("mode") == "rescored" else "both sides as dumped"
        )
        return (
            f"imported from {src.get('format', '?')} ({how}): {len(files)} file(s): {names}{more}"
        )
    if cmd == "rescore":
        rf = meta.rescored_from
        return f"rescored from {rf.get('run', '?')} (inference side: {rf.get('infer_side', '?')})"
    if cmd == "decode-repeat":
        return "decoded again by vLLM from a baseline run (decode-repeat)"
    if cmd == "synthetic":
        return "synthetic (a generator with a known ground truth)"
    return "measured: generated by the inference engine, rescored by the training side"


def section_header(page: PageData) -> dict[str, Any]:
    """Model, weights, engines, sampling, sizes, provenance, versions, command line."""
    cols = []
    for r, rep in zip(page.runs, page.reports, strict=True):
        meta, cfg = r.meta, r.meta.config
        samp = meta.sampling
        sampling = ", ".join(
            f"{k} {samp[k]:g}" if isinstance(samp.get(k), float) else f"{k} {samp[k]}"
            for k in ("temperature", "top_p", "top_k", "min_p", "max_tokens", "samples_per_prompt")
            if samp.get(k) is not None
        )
        vers = meta.get("versions") or {}
        cols.append(
            {
                "label": r.label,
                "rows": [
                    ("path", str(r.path)),
                    ("model", str(meta.model_name or DASH)),
                    ("weights sha256", str(meta.model.get("weights_sha256") or DASH)),
                    (
                        "inference",
                        _engine_text(meta.infer, cfg.get("infer_engine"), cfg.get("infer_dtype")),
                    ),
                    ("training", _engine_text(meta.train, None, cfg.get("train_dtype"))),
                    ("sampling", sampling or DASH),
                    ("tokens", fmt(rep["num_tokens"])),
                    ("sequences", fmt(rep["num_sequences"])),
                    ("tokens came from", _provenance(meta)),
                    ("created", str(meta.get("created") or DASH)),
                    (
                        "versions",
                        ", ".join(f"{k} {v}" for k, v in vers.items() if v) or DASH,
                    ),
                    ("command line", meta.command_line or f"{meta.command} (not recorded)"),
                ],
            }
        )
    return {"columns": cols}


def section_verdict(page: PageData) -> dict[str, Any]:
    """The report's plain-words paragraph, per run."""
    return {
        "entries": [
            (r.label, rep["verdict"]) for r, rep in zip(page.runs, page.reports, strict=True)
        ]
    }


def section_metrics(page: PageData) -> dict[str, Any]:
    """The metrics RL frameworks log, under their names, one definition each."""
    ms = [rep["metrics"] for rep in page.reports]
    rows = []
    for key, label, note in METRIC_ROWS:
        if not any(key in m for m in ms):
            continue
        rows.append(
            {
                "key": key,
                "label": label,
                "cells": [fmt(m.get(key), 4) for m in ms],
                "note": note,
                "definition": METRIC_DEFINITIONS.get(key, note),
            }
        )
    caps = sorted(
        {k.rsplit("_", 1)[1] for k in ms[0] if k.startswith("frac_token_above_cap_")}, key=float
    )
    for c in caps:
        rows.append(
            {
                "key": f"cap_{c}",
                "label": f"ratio > {c}: tokens / sequences",
                "cells": [
                    f"{pct(m.get(f'frac_token_above_cap_{c}'))} / "
                    f"{pct(m.get(f'frac_seq_above_cap_{c}'))}"
                    for m in ms
                ],
                "note": "token IS caps 2-5" if c == caps[0] else "",
                "definition": f"share of token (sequence) importance ratios above {c}",
            }
        )
    return {
        "labels": [r.label for r in page.runs],
        "rows": rows,
        "href": theory_href("metrics"),
    }


def _bucket_rows(rep: dict[str, Any]) -> list[list[str]]:
    b = rep["buckets"]
    out = []
    for i, r in enumerate(b):
        z = (
            r["mean_delta"] / r["se_delta"]
            if r["mean_delta"] is not None and r["se_delta"]
            else None
        )
        out.append(
            [
                bucket_label(r["lo"], r["hi"], i == len(b) - 1),
                fmt(r["count"]),
                pct(r["share"]),
                DASH if not r["count"] else pct(r["share_abs_delta"]),
                fmt(r["mean_delta"], 2, sign=True),
                fmt(z, 2, sign=True),
                fmt(r["mean_abs_delta"], 2),
                fmt(r["p99_abs_delta"], 2),
                fmt(r["mean_one_minus_p"], 2),
                fmt(r["abs_delta_per_one_minus_p"], 2),
                fmt(r["envelope_exact"], 2),
                pct(r["frac_above_envelope"]),
            ]
        )
    return out


def section_buckets(page: PageData) -> dict[str, Any]:
    """The bucket table with the (1 - p) check, the bound and tail lines, four figures."""
    tables = []
    for r, rep in zip(page.runs, page.reports, strict=True):
        env = rep["envelope"]
        tl = rep["tail"]
        tables.append(
            {
                "label": r.label,
                "side": _side(rep),
                "rows": _bucket_rows(rep),
                "eps": f"eps = {fmt(rep['eps'])} ({rep['eps_estimator']})",
                "bound": [
                    ("above the exact envelope", pct(env["exact"]["frac_above"])),
                    ("above 2 eps (1 - p)", pct(env["first_order"]["frac_above"])),
                    ("eps to cover 99% of tokens", fmt(rep["eps_needed_q99"])),
                    (
                        "fit |δ| = slope (1 - p)",
                        f"{fmt(rep['fit']['slope'])}, R² {fmt(rep['fit']['r2'])}",
                    ),
                    (
                        f"tail ({_side(rep)} < {tl['threshold']:g}): share of tokens / of Σ|δ|",
                        f"{pct(tl['token_share'])} / {pct(tl['abs_delta_share'])}",
                    ),
                    (
                        "tail signed mean δ (z)",
                        f"{fmt(tl['mean_delta'], sign=True)} ({fmt(tl['z'], 2)})",
                    ),
                ],
            }
        )
    return {
        "tables": tables,
        "figures": [_fig(page, n) for n in ("bound", "bias", "sequence", "distribution")],
        "href": theory_href("bound"),
    }


def section_sweep(page: PageData) -> dict[str, Any]:
    """The threshold sweep table, its figure and the recommendation."""
    items = []
    for r, sw in zip(page.runs, page.sweeps, strict=True):
        if isinstance(sw, str):
            items.append({"label": r.label, "why": sw})
            continue
        rec = sw["recommended"]
        rows = []
        for row in [sw["baseline"], *sw["rows"]]:
            hit = rec["rho"] is not None and row["rho"] == rec["rho"]
            rows.append(
                {
                    "hit": hit,
                    "cells": [
                        "none" if row["rho"] is None else edge(row["rho"]),
                        pct(row["pruned_token_frac"]),
                        pct(row["pruned_seq_frac"]),
                        pct(row["pruned_abs_delta_share"]),
                        fmt(row["seq_bias_bound_mean"], 4),
                        fmt(row["kept_mean_abs_delta"], 4),
                        times(row["kept_mean_abs_delta_rel"]),
                        fmt(row["kept_k3"]),
                        times(row["kept_k3_rel"]),
                    ],
                }
            )
        recommendation = (
            f"recommended rho = {edge(rec['rho'])} ({sw['rule']}): {rec['reason']}"
            if rec["rho"] is not None
            else f"no recommendation: {rec['reason']}"
        )
        items.append(
            {"label": r.label, "why": None, "rows": rows, "recommendation": recommendation}
        )
    if all(i["why"] for i in items):
        raise Absent(items[0]["why"])
    return {"entries": items, "figure": _fig(page, "sweep"), "href": theory_href("dvp")}


def section_corrections(page: PageData) -> dict[str, Any]:
    """The corrections table (what each removes, what it leaves), its figure, the decision."""
    items = []
    for r, res in zip(page.runs, page.corrections, strict=True):
        if isinstance(res, str):
            items.append({"label": r.label, "why": res})
            continue
        front = set(res["pareto"])
        k0 = res["all_tokens"]["k3"]
        live = [m for m in res["methods"] if m["skipped"] is None]
        live.sort(key=lambda m: (m["left_k3"] is None, m["left_k3"] or 0.0))
        rows = [
            {
                "hit": m["name"] in front,
                "cells": [
                    m["name"],
                    m["kind"],
                    params_text(m["params"]),
                    pct(m["removed_token_share"]),
                    pct(m["sequences_masked"]),
                    fmt(m["left_mean_abs_delta"], 4),
                    fmt(m["left_k3"]),
                    times(m["left_k3"] / k0 if m["left_k3"] is not None and k0 else None),
                    fmt(m["left_p99_abs_delta"]),
                    fmt(m["ess_token"]),
                ],
            }
            for m in live
        ]
        skipped = [f"{m['name']}: skipped ({m['skipped']})" for m in res["methods"] if m["skipped"]]
        items.append(
            {
                "label": r.label,
                "why": None,
                "rows": rows,
                "skipped": skipped,
                "verdict": res["verdict"],
            }
        )
    if all(i["why"] for i in items):
        raise Absent(items[0]["why"])
    return {
        "entries": items,
        "figure": _fig(page, "corrections"),
        "href": theory_href("corrections"),
    }


def section_steps(page: PageData) -> dict[str, Any]:
    """Per training step (runs with a `step` column): the table and the drift figure."""
    items = []
    for r, rep in zip(page.runs, page.reports, strict=True):
        if r.steps is None:
            continue
        rows = [
            [
                str(g["step"]),
                fmt(g["num_tokens"]),
                fmt(g["num_sequences"]),
                fmt(g["mean_abs_delta"]),
                fmt(g["mean_delta"], sign=True),
                fmt(g["k3"]),
                pct(g["tail_abs_delta_share"]),
                pct(g["frac_ratio_outside_0.5_2"]),
            ]
            for g in r.steps
        ]
        items.append({"label": r.label, "rows": rows, "side": _side(rep)})
    if not items:
        raise Absent(
            "no training steps: the runs have no `step` column (runs imported from an RL "
            "framework carry one)"
        )
    return {"entries": items, "figure": _fig(page, "drift")}


def section_diagnose(page: PageData) -> dict[str, Any]:
    """A diagnose directory: the variant matrix, the ranking, the sources, the figure."""
    d = page.diagnose
    if d is None:
        raise Absent("not a diagnose directory (`mismatch diagnose --out DIR` writes one)")
    rows = {v["name"]: v for v in d["variants"]}
    base_k3 = (rows.get("baseline") or {}).get("k3")
    matrix = [
        [
            v["name"],
            v.get("isolates") or "",
            v.get("inference") or "",
            v.get("training") or "",
            v.get("role") or "",
            "skipped: " + v["skipped"] if v.get("skipped") else "ran",
        ]
        for v in d["variants"]
    ]
    ranking = [
        [
            str(i + 1),
            name,
            fmt(rows[name]["num_tokens"]),
            fmt(rows[name]["k3"], 2),
            ratio_x(rows[name]["k3"] / base_k3)
            if base_k3 and rows[name]["k3"] is not None
            else DASH,
            fmt(rows[name]["mean_abs_delta"], 2),
            fmt(rows[name]["p99_abs_delta"], 2),
            fmt(rows[name]["max_abs_delta"], 2),
        ]
        for i, name in enumerate(d.get("ranking") or [])
    ]
    sources = [
        [s["what"], fmt(s["k3"], 2), pct(s["share_of_baseline_k3"]), fmt(s["mean_abs_delta"], 2)]
        for s in d.get("sources") or []
    ]
    attribution = [
        [a["name"], a.get("reason") or "", *[""] * 7]
        if not a["shared"]
        else [
            a["name"],
            fmt(a["num_tokens"]),
            fmt(a["err_infer_rms"], 2),
            fmt(a["err_train_rms"], 2),
            DASH if a["err_corr"] is None else f"{a['err_corr']:+.2f}",
            fmt(a["gap_rms"], 2),
            fmt(a["gap_predicted_rms"], 2),
            pct(a["share_infer"]),
            a["dominant"] or DASH,
        ]
        for a in d.get("attribution") or []
    ]
    return {
        "matrix": matrix,
        "ranking": ranking,
        "sources": sources,
        "attribution": attribution,
        "reference": (d.get("reference") or {}).get("what") or "",
        "verdict": d.get("verdict") or "",
        "figure": _fig(page, "diagnose"),
    }


def section_warnings(page: PageData) -> dict[str, Any]:
    """What the reader should know: the runs' warnings (staleness, temperature, an import's
    checks), skipped figures and analyses."""
    lines: list[str] = []
    for r, rep in zip(page.runs, page.reports, strict=True):
        who = f"{r.label}: " if page.multi else ""
        lines += [f"{who}{w}" for w in rep.get("warnings") or []]
        lines += [f"{who}import: {w}" for w in r.meta.source.get("warnings") or []]
    for r, sw in zip(page.runs, page.sweeps, strict=True):
        if isinstance(sw, str):
            lines.append(f"{r.label}: threshold sweep skipped ({sw})")
    for r, c in zip(page.runs, page.corrections, strict=True):
        if isinstance(c, str):
            lines.append(f"{r.label}: corrections skipped ({c})")
    lines += page.notes
    if page.diagnose is not None:
        lines += [
            f"variant {v['name']}: skipped ({v['skipped']})"
            for v in page.diagnose["variants"]
            if v.get("skipped")
        ]
    return {"lines": list(dict.fromkeys(lines))}


@dataclass(frozen=True)
class Section:
    """One section of the page: its anchor id, its heading, the function building its
    template context (`templates/page/<id>.html.j2`), raising `Absent` when it does not apply."""

    id: str
    title: str
    build: Callable[[PageData], dict[str, Any]]


SECTIONS: tuple[Section, ...] = (
    Section("header", "Run", section_header),
    Section("verdict", "Verdict", section_verdict),
    Section("metrics", "Headline metrics", section_metrics),
    Section("buckets", "Mismatch by token probability", section_buckets),
    Section("sweep", "Pruning threshold", section_sweep),
    Section("corrections", "Corrections", section_corrections),
    Section("steps", "Per training step", section_steps),
    Section("diagnose", "Where the mismatch comes from", section_diagnose),
    Section("warnings", "Warnings", section_warnings),
)
SECTION_IDS: tuple[str, ...] = tuple(s.id for s in SECTIONS)


def render(page: PageData) -> str:
    """The page as one HTML string (Jinja2, autoescaped)."""
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(
        loader=PackageLoader("mismatch_cli", "templates"),
        autoescape=select_autoescape(["html", "j2"], default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    built = []
    for s in SECTIONS:
        try:
            built.append({"id": s.id, "title": s.title, "ctx": s.build(page), "absent": None})
        except Absent as e:
            built.append({"id": s.id, "title": s.title, "ctx": None, "absent": str(e)})
    return env.get_template("page/report.html.j2").render(
        title=page.title,
        sections=built,
        labels=[r.label for r in page.runs],
        version=_version(),
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mismatch-cli")
    except PackageNotFoundError:
        return "?"


def check_page_path(out: str | Path) -> Path:
    """The page's path checked before any run is read: not a directory, its folder exists
    and is writable; one-line errors."""
    import os

    out = Path(out)
    if out.is_dir():
        raise MismatchError(
            f"--html {out} is a directory: give the file to write, e.g. {out / REPORT_HTML}"
        )
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise MismatchError(f"cannot write {out}: {parent} is a file, not a folder")
    if not parent.is_dir():
        raise MismatchError(f"cannot write {out}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MismatchError(f"cannot write {out}: the folder {parent} is not writable")
    return out


def write_page(
    paths: Sequence[str | Path],
    out: str | Path,
    labels: Sequence[str] | None = None,
    *,
    edges: Sequence[float] | str | None = None,
    eps: float | None = None,
) -> tuple[Path, int]:
    """Build the page of runs (or a diagnose directory) and write it to `out` through a
    temporary file and a rename (never half-written). Returns (path, bytes written)."""
    from .runs import atomic_write_bytes

    out = check_page_path(out)
    data = render(gather(paths, labels, edges=edges, eps=eps)).encode("utf-8")
    try:
        atomic_write_bytes(out, data)
    except OSError as e:
        raise MismatchError(f"cannot write {out}: {e.strerror or e}") from e
    return out, len(data)


__all__ = [
    "ANCHORS",
    "SECTIONS",
    "SECTION_IDS",
    "SVG_LIMIT",
    "Absent",
    "Image",
    "PageData",
    "Section",
    "check_page_path",
    "draw",
    "gather",
    "render",
    "theory_href",
    "write_page",
]
