"""What the figures need of a run, loaded once: the analysis arrays and tables (`RunData`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import analysis as A
from ..errors import MismatchError
from .style import PALETTE

PLOT_COLUMNS: tuple[str, ...] = (*A.REQUIRED_COLUMNS, "pos")
OPTIONAL_PLOT_COLUMNS: tuple[str, ...] = ("step",)  # read when present (imported runs)


@dataclass
class RunData:
    """What the figures need of one run, computed once: the analysis arrays and tables."""

    label: str
    tokens: pd.DataFrame  # PLOT_COLUMNS
    arrays: A.TokenArrays
    buckets: pd.DataFrame  # analysis.bucket_stats
    seqs: pd.DataFrame  # analysis.sequence_stats
    eps: float
    eps_estimator: str
    edges: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    color: str = PALETTE[0]

    @property
    def num_tokens(self) -> int:
        return self.arrays.num_tokens

    def describe(self) -> str:
        """Model, engines and dtypes, sampling settings, token count: one line."""
        cfg = self.meta.get("config", {}) or {}
        model = (self.meta.get("model") or {}).get("name") or cfg.get("model") or "model ?"
        bits = [str(model)]
        engines = self.meta.get("engines") or {}
        if any("mode" in (engines.get(s) or {}) for s in ("infer", "train")):
            from ..compare import describe_sides  # a rescored or repeated side: say how

            infer, train = describe_sides(self.meta)
            bits.append(f"{infer} vs {train}")
        elif cfg.get("infer_engine"):
            train = (engines.get("train") or {}).get("engine")
            infer = " ".join(filter(None, (cfg["infer_engine"], cfg.get("infer_dtype"))))
            train = " ".join(filter(None, (train or "transformers", cfg.get("train_dtype"))))
            bits.append(f"{infer} vs {train}")
        if cfg.get("temperature") is not None:
            samp = f"T={cfg['temperature']:g}"
            for k in ("top_p", "top_k", "min_p"):
                if cfg.get(k) is not None:
                    samp += f" {k}={cfg[k]:g}"
            bits.append(samp)
        bits.append(f"{self.num_tokens:,} tokens")
        return ", ".join(bits)


def run_data(
    source: pd.DataFrame | str | Path,
    label: str | None = None,
    *,
    edges: Sequence[float] | str | None = A.DEFAULT_EDGES,
    eps: float | None = None,
    meta: dict[str, Any] | None = None,
) -> RunData:
    """Load a run (path) or take a token DataFrame, and compute what the figures draw."""
    path = None
    if isinstance(source, (str, Path)):
        path = Path(source)
        df, meta, _ = A.load_tokens(path, columns=(*PLOT_COLUMNS, *_optional(path)))
        label = label or path.name
    else:
        df = source
        if len(df) == 0:
            raise MismatchError("the token table is empty: nothing to plot")
        label = label or "run"
    e = A.parse_edges(edges)
    t = A.token_arrays(df, "train")
    eps_used, estimator = A.choose_eps(t, eps)
    return RunData(
        label=label,
        tokens=df,
        arrays=t,
        buckets=A.bucket_stats(t, e, eps=eps_used),
        seqs=A.sequence_stats(t),
        eps=eps_used,
        eps_estimator=estimator,
        edges=e,
        meta=meta or {},
        path=path,
    )


def _optional(path: Path) -> tuple[str, ...]:
    """The OPTIONAL_PLOT_COLUMNS a run's token table has (older runs lack them)."""
    import pyarrow.parquet as pq

    from ..schema import TOKENS_FILE

    file = path / TOKENS_FILE
    have = set(pq.read_schema(file).names) if file.is_file() else set()
    return tuple(c for c in OPTIONAL_PLOT_COLUMNS if c in have)


def load_runs(
    run_paths: Sequence[str | Path],
    labels: Sequence[str] | None = None,
    *,
    edges: Sequence[float] | str | None = A.DEFAULT_EDGES,
    eps: float | None = None,
) -> list[RunData]:
    """RunData of each run, coloured in order; labels default to the directory names."""
    from ..runs import run_labels

    if not run_paths:
        raise MismatchError("no runs given: pass one or more run directories")
    names = run_labels(run_paths, labels)
    runs = []
    for i, (p, name) in enumerate(zip(run_paths, names, strict=True)):
        r = run_data(p, name, edges=edges, eps=eps)
        r.color = PALETTE[i % len(PALETTE)]
        runs.append(r)
    return runs
