"""Every number that becomes text, in one place: the terminal tables (`render`), the verdicts
(`verdict`, `corrections`, `diagnose`), the figures' labels and the error messages all call
these, so one quantity reads the same everywhere.

A leaf module: it imports nothing of the package and no third-party library.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

DASH = "–"  # an empty bucket or an undefined statistic: never printed as 0


def fmt(x: float | None, digits: int = 3, sign: bool = False) -> str:
    """A number in `digits` significant figures; compact scientific when tiny or huge
    (2.6e-6); integers with thousands separators; '–' if None or NaN."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return DASH
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    s = "+" if sign else ""
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        mant, exp = f"{x:{s}.{digits - 1}e}".split("e")
        return f"{mant}e{int(exp)}"
    return f"{x:{s}.{digits}g}"


def pct(x: float | None) -> str:
    """A share as a percentage in 3 significant figures ('–' if None); never rounds a
    shortfall up to 100% (0.99984 -> '99.984%') nor a small share down to 0%."""
    if x is None or not math.isfinite(x):
        return DASH
    if x == 0 or x == 1:
        return f"{100 * x:.0f}%"
    if 0.999 < x < 1:
        return f"{100 * x:.{max(1, int(-math.log10(1 - x)))}f}%"
    if abs(x) < 1e-4:
        return f"{fmt(100 * x, 2)}%"
    return f"{100 * x:.3g}%"


def times(x: float | None) -> str:
    """A ratio to a reference, 2 decimals: '0.43x' ('–' if None)."""
    if x is None or not math.isfinite(x):
        return DASH
    return f"{x:.2f}x"


def ratio_x(x: float | None) -> str:
    """A ratio to a reference that may be tiny: '0.43x' (`times`), '2.3e-8x' below 0.01,
    '0' if zero."""
    if x == 0:
        return "0"
    if x is not None and math.isfinite(x) and 0 < abs(x) < 0.01:
        return f"{fmt(x, 2)}x"
    return times(x)


def edge(v: float) -> str:
    """A bucket edge, short: 0, 1e-5, 5e-3, 0.01, 0.5, 0.999, 1."""
    if 0 < v < 0.01:
        short = f"{v:.6g}"
        mant, exp = (short if "e" in short else f"{v:.6e}").split("e")
        mant = mant.rstrip("0").rstrip(".")
        return f"{mant}e{int(exp)}"
    return f"{v:g}"


def bucket_label(lo: float, hi: float, last: bool) -> str:
    """A probability bucket: '[0.01, 0.1)', the last one closed: '[0.999, 1]'."""
    return f"[{edge(lo)}, {edge(hi)}{']' if last else ')'}"


def number_list(values: Iterable[Any], sep: str = ", ") -> str:
    """Numbers in their shortest form ('%g'), joined: '1e-06, 0.001, 0.01'."""
    return sep.join(f"{float(v):g}" for v in values)


def duration(seconds: float) -> str:
    """A wall time for progress lines and summaries: '4m05s', '1h02m'."""
    s = max(0, round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def params_text(params: dict[str, Any] | None) -> str:
    """A correction's bounds, short: 'C=2', '[0.5, 5]', 'tau=0.01', 'rho=1e-06 (recommended)'."""
    p = {k: v for k, v in (params or {}).items() if v is not None}
    if "lo" in p and "hi" in p:
        return f"[{p['lo']:g}, {p['hi']:g}]"
    bits = [f"{k}={v:g}" for k, v in p.items() if isinstance(v, (int, float))]
    if p.get("rho_from"):
        bits.append(f"({p['rho_from']})")
    return " ".join(bits)


__all__ = [
    "DASH",
    "bucket_label",
    "duration",
    "edge",
    "fmt",
    "number_list",
    "params_text",
    "pct",
    "ratio_x",
    "times",
]
