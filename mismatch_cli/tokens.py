"""Reading a run's token table: the columns `report` needs, the sides, and streaming helpers
(`iter_token_batches`, `prefetch`: the next batch decoded in a thread while this one is
worked on). `analysis.Batch` splits each batch once into finite and infinite deltas.

A token has an "infinite delta" when one side's truncation prunes the token the other side
sampled (kept_train False, logp_train = -inf) or when delta is otherwise not finite: such
tokens are counted (`num_infinite`) and excluded from every mean.
Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .errors import MismatchError
from .schema import TOKENS_FILE

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
T = TypeVar("T")


def check_by(by: str) -> str:
    """`by` if it names a side (train, infer); else a one-line MismatchError."""
    if by not in SIDES:
        raise MismatchError(f"--by must be one of {', '.join(SIDES)}, got {by!r}")
    return by


__all__ = [
    "BATCH_ROWS",
    "REQUIRED_COLUMNS",
    "SIDES",
    "check_by",
    "iter_token_batches",
    "num_token_rows",
    "open_run_tokens",
    "prefetch",
    "require_columns",
]


# Rows per batch when a token table is streamed: ~4M rows x a few float64 columns stays
# well under 1 GB however large the run.
BATCH_ROWS = 1 << 22


def iter_token_batches(
    path: str | Path, columns: Sequence[str], batch_rows: int = BATCH_ROWS
) -> Any:
    """Stream columns of a run's tokens.parquet as dicts of numpy arrays, `batch_rows` rows
    at a time, in file order (a sequence's rows are contiguous but may span two batches).
    Memory holds one batch: no pre-buffering of row groups (Arrow would otherwise keep
    every row group's pages of a 10^8-row file). Null floats come back as NaN."""
    import pyarrow.parquet as pq

    file = Path(path) / TOKENS_FILE
    pf = pq.ParquetFile(file, pre_buffer=False, buffer_size=1 << 22)
    for batch in pf.iter_batches(columns=list(columns), batch_size=batch_rows):
        yield {
            name: col.to_numpy(zero_copy_only=False)
            for name, col in zip(batch.schema.names, batch.columns, strict=True)
        }


def num_token_rows(path: str | Path) -> int:
    """Rows of a run's tokens.parquet, from the file footer (nothing else is read)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(Path(path) / TOKENS_FILE).metadata.num_rows


def require_columns(have: Iterable[str], needed: Iterable[str], file: str | Path) -> None:
    """One line naming the columns of `needed` that a token table `file` lacks."""
    have = set(have)
    missing = [c for c in needed if c not in have]
    if missing:
        raise MismatchError(
            f"{file} lacks column(s) {', '.join(missing)}: rerun `mismatch measure` "
            "with this version to produce them"
        )


def open_run_tokens(
    path: str | Path, batch_rows: int, verb: str, needed: Sequence[str] = REQUIRED_COLUMNS
) -> tuple[Any, dict[str, Any], list[str], Path]:
    """A run's tokens.parquet as `grouped.TokenBatches` (nothing read yet), its run.json,
    warnings and the run's path, for a command that will `verb` it ("report", "correct").
    One-line errors for a path that is not a run, a run without tokens.parquet, a table
    lacking one of `needed`, or no rows; an incomplete run gives a warning, not an error."""
    from .grouped import TokenBatches
    from .runs import finish_hint, open_run
    from .schema import STATUS_COMPLETE

    run, meta = open_run(path)
    status = meta.get("status", "incomplete")
    file = run.path / TOKENS_FILE
    if not file.is_file():
        raise MismatchError(
            f"run {run.path} has no {TOKENS_FILE} (status: {status}): nothing to {verb} yet; "
            f"{finish_hint(run.path, meta)}"
        )
    warnings = []
    if status != STATUS_COMPLETE:
        ing = verb[:-1] + "ing" if verb.endswith("e") else verb + "ing"
        warnings.append(
            f"run {run.path} is {status}, not complete: {ing} the {TOKENS_FILE} it has, "
            "which may not hold every prompt"
        )
    src = TokenBatches(file, batch_rows)
    require_columns(src.columns, needed, file)
    if src.num_rows == 0:
        raise MismatchError(f"run {run.path} has no tokens: nothing to {verb}")
    return src, meta, warnings, run.path


def prefetch(batches: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Iterate `batches` with up to `depth` items read ahead in a background thread, so the
    Parquet decoding of the next batch (Arrow releases the GIL) overlaps the numpy work on
    this one: on two cores a streamed pass costs about max(read, compute), not their sum.
    Memory holds `depth` + 1 batches. An exception in the reader is raised here; leaving
    the loop early stops the reader."""
    import queue
    import threading

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
