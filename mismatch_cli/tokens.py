"""Reading a run's token table: the one reader every command uses (`open_run_tokens` for a
run, `frame_tokens` for a DataFrame, both giving `TokenBatches`), the columns `report`
needs, the sides, and `prefetch` (the next batch decoded in a thread while this one is
worked on). `aggregates.Batch` splits each batch once into finite and infinite deltas.

A token has an "infinite delta" when one side's truncation prunes the token the other side
sampled (kept_train False, logp_train = -inf) or when delta is otherwise not finite: such
tokens are counted (`num_infinite`) and excluded from every mean.
Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from .errors import MismatchError, first_line
from .frames import import_beside, is_frame
from .runs import RunMeta, finish_hint, open_run
from .schema import TOKENS_FILE

if TYPE_CHECKING:
    import pandas as pd

# The columns `report` reads from tokens.parquet (and nothing else).
REQUIRED_COLUMNS: tuple[str, ...] = (
    "seq_id",
    "delta",
    "p_train",
    "p_infer",
    "eps_hat",
    "kept_train",
)
SIDES = ("train", "infer")
# Token rows per batch when a table is streamed: with both 24-value pruned-mass grids
# ~200 MB, however large the run.
BATCH_ROWS = 1 << 20
T = TypeVar("T")


def check_by(by: str) -> str:
    """`by` if it names a side (train, infer); else a one-line MismatchError."""
    if by not in SIDES:
        raise MismatchError(f"--by must be one of {', '.join(SIDES)}, got {by!r}")
    return by


def _parquet(file: Path, **kw: Any) -> Any:
    import pyarrow.parquet as pq

    return pq.ParquetFile(file, **kw)


@contextmanager
def _decoding(file: Path) -> Iterator[None]:
    """Arrow's decoding errors (a truncated or damaged file) as one MismatchError line."""
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, MismatchError):
            raise
        raise MismatchError(
            f"{file} cannot be read (truncated or damaged Parquet file): {first_line(e)}"
        ) from e


class TokenBatches:
    """A token table read `batch_rows` rows at a time, in table order: a run's
    tokens.parquet (one batch in memory, no row-group pre-buffering: Arrow would otherwise
    keep every row group's pages of a 10^8-row file) or a DataFrame (sliced). A sequence's
    rows may span batches. Opened by `open_run_tokens` (a run) or `frame_tokens` (a
    DataFrame); `run`, `meta` and `warnings` say where it came from.

    `read(columns, lists)` yields dicts of numpy arrays: scalar columns [n] (null floats as
    NaN), list columns (`lists`, the pruned-mass grids) [n, G] with one width G on every row.
    A file that cannot be decoded (truncated, damaged) is a one-line MismatchError, whether
    its footer or a later page is bad."""

    def __init__(self, source: pd.DataFrame | str | Path, batch_rows: int = BATCH_ROWS) -> None:
        self.batch_rows = max(1, int(batch_rows))
        self.run: Path | None = None
        self.meta: RunMeta | None = None
        self.warnings: list[str] = []
        if is_frame(source):
            self.frame: pd.DataFrame | None = source
            self.file: Path | None = None
            self.columns: list[str] = [str(c) for c in source.columns]
            self.num_rows = len(source)
        else:
            self.frame, self.file = None, Path(source)
            with _decoding(self.file):
                meta = _parquet(self.file)
                self.columns = list(meta.schema_arrow.names)
                self.num_rows = meta.metadata.num_rows

    def read(
        self, columns: Sequence[str], lists: Sequence[str] = (), batch_rows: int | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Batches of `columns` (scalars) and `lists` ([n, G] arrays), in table order
        (batch_rows: this read's batch size, default the table's)."""
        rows = self.batch_rows if batch_rows is None else max(1, int(batch_rows))
        if self.frame is not None:
            yield from self._frame_batches(list(columns), list(lists), rows)
            return
        assert self.file is not None
        names = list(dict.fromkeys([*columns, *lists]))
        with _decoding(self.file):
            pf = _parquet(self.file, pre_buffer=False, buffer_size=1 << 22)
            for batch in pf.iter_batches(columns=names, batch_size=rows):
                if batch.num_rows == 0:
                    continue
                out = {c: batch.column(c).to_numpy(zero_copy_only=False) for c in columns}
                for c in lists:
                    out[c] = _list_values(batch.column(c), c)
                yield out

    def _frame_batches(
        self, columns: list[str], lists: list[str], rows: int
    ) -> Iterator[dict[str, np.ndarray]]:
        assert self.frame is not None
        scal = {c: self.frame[c].to_numpy() for c in columns}
        obj = {c: self.frame[c].to_numpy() for c in lists}
        for i in range(0, self.num_rows, rows):
            out = {c: a[i : i + rows] for c, a in scal.items()}
            for c, a in obj.items():
                try:
                    v = np.stack(a[i : i + rows])  # [n, G]
                except (ValueError, TypeError) as e:
                    raise _list_error(c) from e
                if v.ndim != 2:
                    raise _list_error(c)
                out[c] = v
            yield out


def _list_error(column: str) -> MismatchError:
    return MismatchError(f"column {column} does not hold a list of the same length on every row")


def _list_values(col: Any, name: str) -> np.ndarray:
    """A list<float> Arrow column of one width G as a [n, G] numpy array (no Python lists)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(col)
    if not pa.types.is_list(col.type) and not pa.types.is_large_list(col.type):
        raise _list_error(name)
    mm = pc.min_max(pc.list_value_length(col))
    lo, hi = mm["min"].as_py(), mm["max"].as_py()
    if col.null_count or lo != hi:
        raise _list_error(name)
    return col.flatten().to_numpy(zero_copy_only=False).reshape(n, lo)  # [n, G]


def require_columns(have: Iterable[str], needed: Iterable[str], file: str | Path) -> None:
    """One line naming the columns of `needed` that a token table `file` lacks."""
    have = set(have)
    missing = [c for c in needed if c not in have]
    if missing:
        raise MismatchError(
            f"{file} lacks column(s) {', '.join(missing)}: rerun `mismatch measure` "
            "with this version to produce them"
        )


def _ing(verb: str) -> str:
    return verb[:-1] + "ing" if verb.endswith("e") else verb + "ing"


def open_run_tokens(
    path: str | Path,
    *,
    verb: str,
    needed: Sequence[str] = REQUIRED_COLUMNS,
    batch_rows: int = BATCH_ROWS,
    complete: bool = True,
    allow_empty: bool = False,
) -> TokenBatches:
    """A run's tokens.parquet as `TokenBatches` (nothing read yet, `run`, `meta` and
    `warnings` set), for a command that will `verb` it ("report", "correct", "sweep").

    One-line errors for a path that is not a run, a damaged run.json, a run without
    tokens.parquet, a table that cannot be decoded, one lacking a column of `needed`, or no
    rows (unless `allow_empty`). An incomplete run is refused (every command refuses one:
    nothing half-written passes for complete); `complete=False` reads it as it is, with a
    warning (a library caller's choice)."""
    run, meta = open_run(path, allow_incomplete=not complete)
    file = run.path / TOKENS_FILE
    if not file.is_file():
        if meta.complete:
            raise MismatchError(
                f"run {run.path} has no {TOKENS_FILE}, though {run.meta_path.name} says it is "
                f"complete: the run is damaged (nothing to {verb}); make it again"
            )
        raise MismatchError(
            f"run {run.path} has no {TOKENS_FILE} (status: {meta.status}): nothing to {verb} "
            f"yet; {finish_hint(run.path, meta)}"
        )
    src = TokenBatches(file, batch_rows)
    src.run, src.meta = run.path, meta
    if not meta.complete:
        src.warnings.append(
            f"run {run.path} is {meta.status}, not complete: {_ing(verb)} the {TOKENS_FILE} it "
            "has, which may not hold every prompt"
        )
    require_columns(src.columns, needed, file)
    if src.num_rows == 0 and not allow_empty:
        raise MismatchError(f"run {run.path} has no tokens: nothing to {verb}")
    return src


def frame_tokens(
    df: pd.DataFrame,
    *,
    verb: str,
    needed: Sequence[str] = REQUIRED_COLUMNS,
    batch_rows: int = BATCH_ROWS,
) -> TokenBatches:
    """A token DataFrame as `TokenBatches` (sliced `batch_rows` rows at a time), checked
    as `open_run_tokens` checks a run: the columns of `needed`, at least one row."""
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise MismatchError(f"the token table lacks column(s) {', '.join(missing)}")
    if len(df) == 0:
        raise MismatchError(f"the token table is empty: nothing to {verb}")
    return TokenBatches(df, batch_rows)


def prefetch(batches: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Iterate `batches` with up to `depth` items read ahead in a background thread, so the
    Parquet decoding of the next batch (Arrow releases the GIL) overlaps the numpy work on
    this one: on two cores a streamed pass costs about max(read, compute), not their sum.
    Memory holds `depth` + 1 batches. An exception in the reader is raised here; leaving
    the loop early stops the reader."""
    import queue
    import threading

    import_beside()  # the tables at the pass's end need pandas: imported meanwhile
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            for item in batches:
                if not put((None, item)):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            put((e, None))
            return
        put((None, done))

    thread = threading.Thread(target=reader, name="mismatch-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            err, item = q.get()
            if err is not None:
                raise err
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join()


__all__ = [
    "BATCH_ROWS",
    "REQUIRED_COLUMNS",
    "SIDES",
    "TokenBatches",
    "check_by",
    "frame_tokens",
    "open_run_tokens",
    "prefetch",
    "require_columns",
]
