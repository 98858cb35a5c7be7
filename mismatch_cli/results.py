"""Results as data: every analysis returns a plain dict that `json.dumps(allow_nan=False)`
accepts, so `--json` output, CSV files and figures all read the same numbers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .frames import is_frame

if TYPE_CHECKING:
    import pandas as pd


def json_ready(obj: Any) -> Any:
    """A strict-JSON copy of `obj`: NaN / inf -> None, numpy scalars and arrays -> Python
    numbers and lists, DataFrames -> lists of records, tuples -> lists, Paths -> str."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if is_frame(obj):
        return json_ready(obj.to_dict(orient="records"))
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_csv(df: pd.DataFrame, path: str | Path) -> None:
    """`df` as CSV at `path` (a `--csv` file); an unwritable path is one MismatchError line."""
    from .errors import MismatchError

    try:
        df.to_csv(path, index=False)
    except OSError as e:
        raise MismatchError(f"cannot write {path}: {e.strerror or e}") from e


def _kv_frame(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            rows += _kv_frame(v, f"{prefix}{k}.")
        elif not isinstance(v, list):
            rows.append((f"{prefix}{k}", v))
    return rows


def write_report_csv(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write each table of a report (`analysis.analyze`) as CSV into out_dir: buckets,
    bound, tail, accumulation, length_bins, metrics (`report --csv DIR`)."""
    import pandas as pd

    from .runs import check_writable_dir

    out = Path(out_dir)
    check_writable_dir(out)
    bound = {
        "eps": result["eps"],
        "eps_hat": result["eps_hat"],
        "eps_estimator": result["eps_estimator"],
        "eps_needed_q99": result["eps_needed_q99"],
        "eps_hat_quantiles": result.get("eps_hat_quantiles") or {},
        "envelope": result["envelope"],
        "fit": result["fit"],
        "num_tokens": result["num_tokens"],
        "num_infinite": result["num_infinite"],
    }
    acc = {k: v for k, v in result["accumulation"].items() if k != "length_bins"}
    frames = {
        "buckets": pd.DataFrame(result["buckets"]),
        "bound": pd.DataFrame(_kv_frame(bound), columns=["name", "value"]),
        "tail": pd.DataFrame(_kv_frame(result["tail"]), columns=["name", "value"]),
        "accumulation": pd.DataFrame(_kv_frame(acc), columns=["name", "value"]),
        "length_bins": pd.DataFrame(result["accumulation"]["length_bins"]),
        "metrics": pd.DataFrame(list(result["metrics"].items()), columns=["name", "value"]),
    }
    paths = []
    for name, df in frames.items():
        p = out / f"{name}.csv"
        write_csv(df, p)
        paths.append(p)
    return paths


__all__ = ["json_ready", "write_csv", "write_report_csv"]
