"""The mismatch by position in the completion: `report`'s `by_position` table.

Errors that accumulate along a sequence (KV-cache rounding, long-context attention kernels)
show as a mismatch that grows with the position of a token in its completion. The tokens are
grouped into fixed position buckets (0-63, 64-255, 256-1023, 1024-4095, >= 4096 tokens into
the completion, from the token table's `pos` column) and each bucket gets the headline
numbers of `report --group-by` (tokens, mean |delta|, k3, tail share of |delta|, ...), in the
same streamed pass as the rest of `report`: `analysis.PositionAccumulator` is a
`GroupAccumulator` whose key is the bucket index (`position_bucket`), so the two tables
share one definition of every number. This module holds the buckets only, so that figures
and tables can name them without the analysis.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

# Lower edges of the position buckets (0-based token index in the completion); the last one
# is open-ended.
POSITION_EDGES: tuple[int, ...] = (0, 64, 256, 1024, 4096)


def position_labels(edges: Sequence[int] = POSITION_EDGES) -> list[str]:
    """'0-63', '64-255', ..., '>=4096': the buckets' names in tables and figures."""
    his = [f"{lo}-{hi - 1}" for lo, hi in itertools.pairwise(edges)]
    return [*his, f">={edges[-1]}"]


def position_bucket(pos: np.ndarray, edges: Sequence[int] = POSITION_EDGES) -> np.ndarray:
    """Bucket index [n] of 0-based positions [n] (0 for position 0-63, ...)."""
    pos = np.asarray(pos)
    out = np.zeros(pos.shape, dtype=np.intp)
    for e in edges[1:]:  # a comparison per edge (a handful), never a loop over tokens
        out += pos >= e
    return out


__all__ = ["POSITION_EDGES", "position_bucket", "position_labels"]
