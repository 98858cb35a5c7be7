"""The toolkit of an import format's author: what a reader module (`prime_rl`, `slime`,
`skyrl`, `verl`, `tokens`) builds on, and the contract it fulfils (`Format`).

A reader turns one file into `Chunk`s: S completions as flat (ragged) arrays, each completion
being the whole text after its prompt (tool and observation tokens included), with a
`loss_mask` that is true on the model-generated tokens, log-probs already normalised to this
tool's sign (delta = logp_infer - logp_train). The helpers read Arrow / JSON Lines columns
with one-line errors that name the file, record and field. Everything after the reader
(discovery, --steps, parts, rescoring, run.json) is the import pipeline, `ingest.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa

from ..errors import MismatchError

# ----------------------------------------------------------------------------- chunks


@dataclass
class Chunk:
    """S completions of one file (or one block of it), as flat arrays.

    Completion j has prompt tokens prompt_ids[po_j : po_j + prompt_lens[j]] and completion
    tokens token_ids[o_j : o_j + lens[j]] (o, po: running offsets). Per completion token:
    logp_infer, logp_train (None when the dump has no trainer side), loss_mask; NaN is a
    null log-prob. `token_extra` holds per-completion-token columns (advantage, turn),
    `seq_extra` per-completion ones (step, env, reward, source_row).
    """

    prompt_lens: np.ndarray  # [S] int64
    prompt_ids: np.ndarray  # [sum P] int64
    lens: np.ndarray  # [S] int64
    token_ids: np.ndarray  # [sum R] int64
    logp_infer: np.ndarray  # [sum R] float64
    loss_mask: np.ndarray  # [sum R] bool
    logp_train: np.ndarray | None = None  # [sum R] float64
    token_extra: dict[str, np.ndarray] = field(default_factory=dict)  # [sum R] each
    seq_extra: dict[str, np.ndarray] = field(default_factory=dict)  # [S] each

    @property
    def num_sequences(self) -> int:
        return int(self.lens.size)

    def select(self, keep: np.ndarray) -> Chunk:
        """The completions where `keep` [S] is true."""
        tk = np.repeat(keep, self.lens)  # [sum R]
        pk = np.repeat(keep, self.prompt_lens)  # [sum P]
        return Chunk(
            self.prompt_lens[keep],
            self.prompt_ids[pk],
            self.lens[keep],
            self.token_ids[tk],
            self.logp_infer[tk],
            self.loss_mask[tk],
            None if self.logp_train is None else self.logp_train[tk],
            {k: v[tk] for k, v in self.token_extra.items()},
            {k: v[keep] for k, v in self.seq_extra.items()},
        )


def concat_rows(rows: Sequence[np.ndarray], dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """(lengths [S], flat values) of per-completion arrays (a loop over completions only)."""
    lens = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    flat = np.concatenate([np.asarray(r, dtype=dtype) for r in rows]) if rows else np.zeros(0)
    return lens, flat.astype(dtype, copy=False)


def check_lengths(where: str, expect: int, what: str, **arrays: Any) -> None:
    """One-line error when a per-token field's length differs from the token count."""
    for name, a in arrays.items():
        if a is not None and len(a) != expect:
            raise MismatchError(
                f"{where}: {name} has {len(a)} values for {expect} {what} (length mismatch)"
            )


def missing(where: str, names: Sequence[str], hint: str = "") -> MismatchError:
    """The one-line error for fields a record lacks, naming them."""
    s = "s" if len(names) > 1 else ""
    return MismatchError(f"{where}: missing field{s} {', '.join(names)}{hint}")


# ----------------------------------------------------------------------------- arrow helpers


def list_column(
    table: pa.Table, name: str, where: str, dtype: Any
) -> tuple[np.ndarray, np.ndarray]:
    """(lengths [n], flat values) of a list column of an Arrow table; nulls in float values
    become NaN, in bool values False. A record without the field is an error naming it."""
    col = table.column(name).combine_chunks()
    if col.null_count:
        first = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise missing(f"{where} record {first}", [name])
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        raise MismatchError(f"{where}: field {name} is not a list (got {col.type})")
    lens = col.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    values = col.flatten()
    try:
        if np.dtype(dtype) == np.bool_:
            values = values.cast(pa.bool_()).fill_null(False)
        elif np.dtype(dtype).kind == "f":
            values = values.cast(pa.float64())
        elif values.null_count:
            raise MismatchError(f"{where}: field {name} holds null values")
        else:
            values = values.cast(pa.int64())
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        raise MismatchError(
            f"{where}: field {name} holds {values.type} values, not numbers ({e})"
        ) from e
    return lens, values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def per_token_column(
    table: pa.Table, name: str, where: str, dtype: Any, lens: np.ndarray, first: int, of: str
) -> np.ndarray:
    """The flat values of list column `name`, which must hold `lens[r]` values in record r
    (one per token of the list column `of`); else one line naming the first record that
    differs (`first` is the table's first record number in the file)."""
    n, v = list_column(table, name, where, dtype)
    bad = np.flatnonzero(n != lens)
    if bad.size:
        r = int(bad[0])
        raise MismatchError(
            f"{where} record {first + r}: {name} has {n[r]} values for {lens[r]} {of} "
            "(length mismatch)"
        )
    return v


def jsonl_tables(
    path: Path, schema: pa.Schema | None = None, block_bytes: int = 32 << 20
) -> Iterator[tuple[int, pa.Table]]:
    """(first record index, Arrow table) per block of whole lines of a JSON-lines file.

    Lines are grouped into blocks of about `block_bytes` (a block always holds whole lines,
    however long), each parsed by Arrow's JSON reader. `schema`: parse only these fields
    (others ignored); None infers the types per block.
    """
    import pyarrow.json as pj

    popts = (
        pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
        if schema is not None
        else pj.ParseOptions()
    )
    first = 0
    with open(path, "rb") as f:
        while True:
            lines = f.readlines(block_bytes)
            if not lines:
                return
            lines = [ln for ln in lines if ln.strip()]
            if not lines:
                continue
            buf = b"".join(ln if ln.endswith(b"\n") else ln + b"\n" for ln in lines)
            # Arrow parses blocks in parallel; a line must fit in one block
            block = max(1 << 22, max(len(ln) for ln in lines) + 2)
            try:
                table = pj.read_json(
                    pa.BufferReader(buf),
                    read_options=pj.ReadOptions(block_size=block, use_threads=True),
                    parse_options=popts,
                )
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise _bad_line(path, first, lines) or MismatchError(
                    f"{path}: not readable as JSON lines near record {first} "
                    f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                ) from e
            yield first, table
            first += len(lines)


def _bad_line(path: Path, first: int, lines: Sequence[bytes]) -> MismatchError | None:
    """The error naming the first line of a block that is not a JSON object (a line cut
    off where the file ends: a truncated file), or None if every line is one."""
    import json

    for k, ln in enumerate(lines):
        try:
            obj = json.loads(ln)
        except ValueError as e:
            cut = k == len(lines) - 1 and not ln.endswith(b"\n")
            why = "the file ends in the middle of it: truncated?" if cut else str(e)
            return MismatchError(
                f"{path}: not readable as JSON lines: record {first + k} is not valid JSON ({why})"
            )
        if not isinstance(obj, dict):
            return MismatchError(
                f"{path}: not readable as JSON lines: record {first + k} is a JSON "
                f"{type(obj).__name__}, not an object"
            )
    return None


@dataclass
class ReadContext:
    """What a reader may need besides the path: the pickle permission, the step filter,
    a place for warnings, and `note(key, value)`: a fact the reader established about the
    file it reads (e.g. the framework release, the layout), recorded in run.json's
    `source` block (per file, and once for the run when every file agrees)."""

    trust_pickle: bool = False
    steps: set[int] | None = None
    warn: Callable[[str], None] = lambda message: None
    note: Callable[[str, Any], None] = lambda key, value: None


def require_trust(path: Path, fmt: str, ctx: ReadContext) -> None:
    """Pickles are opened only with --trust-pickle (a plain unpickler would run code from
    the file; ours reads an allow-list and runs nothing, but reads only when asked)."""
    if not ctx.trust_pickle:
        raise MismatchError(
            f"{path} is a pickle ({fmt} dumps are): pass --trust-pickle to read it (a "
            "restricted loader reads only the batch's tensors and arrays; nothing from the "
            "file is run)"
        )


# ----------------------------------------------------------------------------- the contract


@runtime_checkable
class Format(Protocol):
    """What a format module defines (a module satisfies this Protocol; `importers.FORMATS`
    maps the FORMAT argument to it). `tests/test_import.py` checks every format module's
    names and signatures against it."""

    NAME: str  # the FORMAT argument of `mismatch import`
    PATTERNS: Sequence[str]  # file-name globs searched for when a SOURCE is a folder
    PICKLE: bool  # its files are pickles: read (restricted) only with --trust-pickle
    SIDES: str  # "both" (inference and trainer log-probs), "infer" (rescore) or "either"
    SIGN: str  # the framework's sign convention, one sentence (recorded in run.json)

    def step_of(self, path: Path) -> int | None:
        """The training step of a file, from its path alone (for --steps)."""
        ...

    def read(self, path: Path, ctx: ReadContext) -> Iterator[Chunk]:
        """The completions of one file, in chunks."""
        ...


@runtime_checkable
class SelectsFiles(Protocol):
    """Optional: drop the discovered files that should not be imported (e.g. prime-rl steps
    without their STABLE marker); `explicit` holds the files named on the command line."""

    def select(
        self, files: Sequence[Path], warn: Callable[[str], None], explicit: set[Path]
    ) -> list[Path]: ...


@runtime_checkable
class WarnsOnSteps(Protocol):
    """Optional: format-specific caveats about the imported steps (e.g. staleness)."""

    def warnings(self, steps: set[int]) -> list[str]: ...


__all__ = [
    "Chunk",
    "Format",
    "ReadContext",
    "SelectsFiles",
    "WarnsOnSteps",
    "check_lengths",
    "concat_rows",
    "jsonl_tables",
    "list_column",
    "missing",
    "per_token_column",
    "require_trust",
]
