"""Side-by-side comparison of runs: the headline metrics, the bucket means and the
distribution-level measures, one column per run, with each run's ratio to the first; and,
for runs that share rollouts (same seq_ids, positions and tokens), how much each side's
log-probs moved between them, token by token. The numbers behind `mismatch compare` and
`mismatch diagnose`. Reads run directories only; importing it does not import torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import metrics as M
from .analysis import DEFAULT_EDGES, analyze, bucket_index, parse_edges
from .errors import MismatchError
from .results import json_ready
from .runs import open_run, read_tokens, run_labels

# The headline metrics, in display order: (key, label). The ratio to the first run is
# given for each.
HEADLINE: tuple[tuple[str, str], ...] = (
    ("mean_abs_delta", "mean |delta|"),
    ("k3", "k3"),
    ("p99_abs_delta", "p99 |delta|"),
    ("max_abs_delta", "max |delta|"),
    ("tail_abs_delta_share", "tail share of |delta|"),
    ("eps_hat", "eps estimate"),
    ("tv_coarse_mean", "TV lower bound, mean"),
    ("kl_qp_coarse_mean", "KL(q||p) lower bound, mean"),
    ("kl_pq_coarse_mean", "KL(p||q) lower bound, mean"),
)
SIDES = ("train", "infer")


def describe_sides(meta: dict[str, Any]) -> tuple[str, str]:
    """Short descriptions of a run's inference and training sides, e.g. ("vllm decode
    bfloat16", "transformers float32 eager, batch 4096 tokens"), from run.json's `engines`
    (and `config` for runs that predate a key)."""
    cfg = meta.get("config") or {}
    eng = meta.get("engines") or {}
    inf, tr = eng.get("infer") or {}, eng.get("train") or {}

    def words(*xs: Any) -> str:
        return " ".join(str(x) for x in xs if x)

    infer = words(
        inf.get("engine") or cfg.get("infer_engine"),
        inf.get("mode") or "decode",
        inf.get("dtype") or cfg.get("infer_dtype"),
        inf.get("attn_implementation"),
    )
    engine = tr.get("engine", "transformers")
    train = words(
        engine,
        tr.get("mode"),
        tr.get("dtype") or cfg.get("train_dtype"),
        tr.get("attn_implementation")
        or (cfg.get("attn_implementation") if engine == "transformers" else None),
    )
    if engine == "transformers" and cfg.get("rescore_batch_tokens"):
        train += f", batch {cfg['rescore_batch_tokens']} tokens"
    return infer, train


def run_summary(
    path: str | Path, label: str | None = None, edges: Sequence[float] | str | None = DEFAULT_EDGES
) -> dict[str, Any]:
    """One run's headline numbers (HEADLINE keys), its bucket means and its verdict, from
    `analysis.analyze` plus the p99 of |delta| over finite tokens."""
    path = Path(path)
    _, meta = open_run(path, allow_incomplete=False)
    rep = analyze(path, edges=edges)
    d = read_tokens(path, ["delta", "kept_train"])
    fin = np.isfinite(d["delta"].to_numpy()) & d["kept_train"].to_numpy(dtype=bool)
    ad = np.abs(d["delta"].to_numpy()[fin])  # [n] finite |delta|
    m = rep["metrics"]
    dist = rep.get("distribution_level") or {}
    infer, train = describe_sides(meta)
    out: dict[str, Any] = {
        "label": label or path.name,
        "path": str(path),
        "inference": infer,
        "training": train,
        "rescored_from": (meta.get("rescored_from") or {}).get("run"),
        "num_tokens": rep["num_tokens"],
        "num_infinite": rep["num_infinite"],
        "mean_abs_delta": m["mean_abs_delta"],
        "k3": m["k3"],
        "p99_abs_delta": float(np.quantile(ad, 0.99)) if ad.size else math.nan,
        "max_abs_delta": m["max_abs_delta"],
        "tail_abs_delta_share": rep["tail"]["abs_delta_share"],
        "tail_threshold": rep["tail"]["threshold"],
        "eps_hat": rep["eps_hat"],
        "verdict": rep["verdict"],
        "buckets": [
            {k: b[k] for k in ("lo", "hi", "count", "mean_abs_delta", "mean_delta")}
            for b in rep["buckets"]
        ],
        "distribution_level": dist or None,
    }
    for c, s in (dist.get("overall") or {}).items():
        out[f"{c}_mean"] = s["mean"]
        out[f"{c}_p99"] = s["p99"]
    return json_ready(out)


def _ratio(a: Any, b: Any) -> float:
    if a is None or b is None or not b:
        return math.nan
    return a / b


_MOVE_COLUMNS = ["seq_id", "pos", "token_id", "logp_infer", "logp_train", "p_train"]


def moved(
    a: str | Path, b: str | Path, edges: Sequence[float] | str | None = DEFAULT_EDGES
) -> dict[str, Any]:
    """How the log-probs moved from run `a` to run `b` over the tokens they share.

    Rows are matched on (seq_id, pos). The runs share rollouts when at least one row matches
    and every matched row has the same token_id; otherwise `shared` is False with the reason.
    For each side s in (train, infer): m = logp_s(b) - logp_s(a) over matched rows finite in
    both: mean_abs, max_abs, frac_identical (m == 0 exactly), k3 = mean(e^-m - 1 + m) (b's
    log-probs in the role of logp_infer, a's in that of logp_train: `metrics.k3` of m), and
    by bucket of a's p_train: count, mean_abs, max_abs. `num_common` / `num_only_a` / `num_only_b` count rows.
    """
    ta = read_tokens(a, _MOVE_COLUMNS)
    tb = read_tokens(b, _MOVE_COLUMNS)
    j = ta.merge(tb, on=["seq_id", "pos"], suffixes=("_a", "_b"))
    base: dict[str, Any] = {
        "a": str(a),
        "b": str(b),
        "num_common": len(j),
        "num_only_a": len(ta) - len(j),
        "num_only_b": len(tb) - len(j),
    }
    if not len(j):
        return {**base, "shared": False, "reason": "no (seq_id, pos) in common"}
    diff = int((j["token_id_a"] != j["token_id_b"]).sum())
    if diff:
        return {
            **base,
            "shared": False,
            "reason": f"{diff:,} of {len(j):,} common positions hold different tokens",
        }
    e = parse_edges(edges)
    nb = len(e) - 1
    idx = bucket_index(j["p_train_a"].to_numpy(dtype=np.float64), e)  # [n]
    out: dict[str, Any] = {**base, "shared": True, "reason": None, "edges": e}
    for side in SIDES:
        la = j[f"logp_{side}_a"].to_numpy(dtype=np.float64)
        lb = j[f"logp_{side}_b"].to_numpy(dtype=np.float64)
        ok = np.isfinite(la) & np.isfinite(lb)
        m = lb[ok] - la[ok]  # [n'] how far b moved from a
        am = np.abs(m)
        b_ok = idx[ok]
        inb = b_ok >= 0
        cnt = np.bincount(b_ok[inb], minlength=nb)
        mx = np.full(nb, np.nan)
        np.fmax.at(mx, b_ok[inb], am[inb])
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_b = np.bincount(b_ok[inb], weights=am[inb], minlength=nb) / cnt
        out[side] = {
            "num_tokens": int(ok.sum()),
            "num_not_finite": int((~ok).sum()),
            "mean_abs": float(am.mean()) if am.size else math.nan,
            "max_abs": float(am.max()) if am.size else math.nan,
            "frac_identical": float((m == 0).mean()) if m.size else math.nan,
            "k3": M.k3(m),
            "buckets": pd.DataFrame(
                {"lo": e[:-1], "hi": e[1:], "count": cnt, "mean_abs": mean_b, "max_abs": mx}
            ),
        }
    return json_ready(out)


def compare(
    paths: Sequence[str | Path],
    labels: Sequence[str] | None = None,
    edges: Sequence[float] | str | None = DEFAULT_EDGES,
) -> dict[str, Any]:
    """Compare complete runs side by side (a strict-JSON dict).

    Keys: runs (each `run_summary`), reference (the first run's label), edges, ratios (for
    each later run, HEADLINE value / the first run's, by key), bucket_means (one row per
    bucket: lo, hi, and each run's mean |delta| under its label), moved (for each later run
    sharing rollouts with the first: `moved(first, run)` with `label`; runs that do not are
    listed with shared False and the reason).
    """
    if len(paths) < 1:
        raise MismatchError("no runs given: `mismatch compare RUN [RUN ...]`")
    e = parse_edges(edges)
    names = run_labels(paths, labels)
    runs = [run_summary(p, n, e) for p, n in zip(paths, names, strict=True)]
    ref = runs[0]
    ratios = [
        {"label": r["label"], **{k: _ratio(r.get(k), ref.get(k)) for k, _ in HEADLINE}}
        for r in runs[1:]
    ]
    bucket_means = [
        {"lo": float(e[i]), "hi": float(e[i + 1]),
         **{r["label"]: r["buckets"][i]["mean_abs_delta"] for r in runs}}
        for i in range(len(e) - 1)
    ]  # fmt: skip
    moves = [
        {"label": r["label"], **moved(paths[0], p, e)}
        for r, p in zip(runs[1:], paths[1:], strict=True)
    ]
    return json_ready(
        {
            "runs": runs,
            "reference": ref["label"],
            "edges": e,
            "ratios": ratios,
            "bucket_means": bucket_means,
            "moved": moves,
        }
    )


__all__ = ["HEADLINE", "compare", "describe_sides", "moved", "run_summary"]
