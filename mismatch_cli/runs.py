"""The run directory: written atomically and resumably by `measure`, read by everything else.

Layout (see docs/formats.md):
    run.json            settings, conventions, versions, timings, status
    tokens.parquet      one row per generated token      (written last, atomically)
    sequences.parquet   one row per completion           (written last, atomically)
    parts/              per-chunk files of a run in progress; removed once complete

A run is complete only when run.json says `status: complete`; the final Parquet
files appear via rename, so a crash never leaves a half-written table that looks final.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import IncompleteRunError, MismatchError, RunNotFoundError
from .schema import (
    PARTS_DIR,
    RUN_JSON,
    SEQUENCES_FILE,
    STATUS_COMPLETE,
    STATUS_INCOMPLETE,
    TOKENS_FILE,
)


@contextmanager
def _atomic_path(path: Path) -> Iterator[str]:
    """Yield a temporary path beside `path`; rename it over `path` only if the body succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file and rename (never half-written)."""
    with _atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def atomic_write_table(path: Path, table: pa.Table) -> None:
    """Atomically write a Parquet file (tmp file in the same folder, then rename)."""
    with _atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def check_writable_dir(path: Path) -> None:
    """Create `path` if needed and prove we can write there; raise a one-line error if not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise MismatchError(f"cannot write to output directory {path}: {e.strerror or e}") from e


@dataclass
class RunDir:
    """A run directory on disk (complete or not)."""

    path: Path

    @property
    def meta_path(self) -> Path:
        return self.path / RUN_JSON

    @property
    def parts(self) -> Path:
        return self.path / PARTS_DIR

    def exists(self) -> bool:
        return self.meta_path.is_file()

    def read_meta(self) -> dict[str, Any]:
        try:
            return json.loads(self.meta_path.read_text())
        except FileNotFoundError as e:
            raise RunNotFoundError(
                f"{self.path} is not a mismatch run (no {RUN_JSON}); create one with `mismatch measure`"
            ) from e
        except json.JSONDecodeError as e:
            raise RunNotFoundError(f"{self.meta_path} is not valid JSON: {e}") from e
        except OSError as e:
            raise RunNotFoundError(f"{self.path} is not a run directory: {e.strerror or e}") from e

    def write_meta(self, meta: dict[str, Any]) -> None:
        atomic_write_json(self.meta_path, meta)

    def part_path(self, kind: str, index: int) -> Path:
        return self.parts / f"{kind}-{index:05d}.parquet"

    def has_part(self, kind: str, index: int) -> bool:
        return self.part_path(kind, index).is_file()

    def write_part(self, kind: str, index: int, df: pd.DataFrame) -> None:
        atomic_write_table(
            self.part_path(kind, index), pa.Table.from_pandas(df, preserve_index=False)
        )

    def read_part(self, kind: str, index: int) -> pd.DataFrame:
        return pq.read_table(self.part_path(kind, index)).to_pandas()


def open_run(path: str | Path, *, allow_incomplete: bool = True) -> tuple[RunDir, dict[str, Any]]:
    """Open a run for reading; raise a clear error if it is not one (or not complete)."""
    run = RunDir(Path(path))
    if not run.path.exists():
        raise RunNotFoundError(f"run directory not found: {run.path}")
    if not run.path.is_dir():
        raise RunNotFoundError(f"{run.path} is a file, not a run directory")
    meta = run.read_meta()
    status = meta.get("status")
    if status != STATUS_COMPLETE and not allow_incomplete:
        raise IncompleteRunError(
            f"run {run.path} is {status or STATUS_INCOMPLETE}; finish it with `mismatch measure --resume --out {run.path}`"
        )
    return run, meta


def read_tokens(path: str | Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read tokens.parquet of a run, only the `columns` asked for (all if None)."""
    return _read_table(Path(path), TOKENS_FILE, columns)


def read_sequences(path: str | Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read sequences.parquet of a run, only the `columns` asked for (all if None)."""
    return _read_table(Path(path), SEQUENCES_FILE, columns)


def _read_table(path: Path, name: str, columns: Sequence[str] | None) -> pd.DataFrame:
    file = path / name
    if not file.is_file():
        raise RunNotFoundError(
            f"{path} has no {name}: the run is incomplete or not a run "
            f"(resume it with `mismatch measure --resume --out {path}`)"
        )
    if columns is not None:
        have = set(pq.read_schema(file).names)
        missing = [c for c in columns if c not in have]
        if missing:
            raise MismatchError(
                f"{file} lacks column(s) {', '.join(missing)}: rerun `mismatch measure` "
                "with this version to produce them"
            )
    return pq.read_table(file, columns=list(columns) if columns is not None else None).to_pandas()


__all__ = [
    "STATUS_COMPLETE",
    "STATUS_INCOMPLETE",
    "RunDir",
    "atomic_write_json",
    "atomic_write_table",
    "check_writable_dir",
    "open_run",
    "read_sequences",
    "read_tokens",
]
