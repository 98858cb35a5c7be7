"""Results as data: every analysis returns a plain dict that `json.dumps(allow_nan=False)`
accepts, so `--json` output, CSV files and figures all read the same numbers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def json_ready(obj: Any) -> Any:
    """A strict-JSON copy of `obj`: NaN / inf -> None, numpy scalars and arrays -> Python
    numbers and lists, DataFrames -> lists of records, tuples -> lists, Paths -> str."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, pd.DataFrame):
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


__all__ = ["json_ready", "write_csv"]
