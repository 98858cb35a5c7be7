"""The import pipeline (`mismatch import`): finding a dump's files, `--steps`, reading them
through a format module (`toolkit.Format`), and streaming the `Chunk`s it yields into the
run directory's parts (memory bounded by one part). `Ingest` turns chunks into
    scored mode    token parts (both sides present: delta = logp_infer - logp_train now)
    rescored mode  rollout parts for `pipeline.rescore_parts` (the training side is recomputed)
plus sequence parts, and `finish` writes the final tables through `runs.py`.

Only loss-masked tokens with a non-null log-prob become token rows; `pos` is their index in
the completion, so masked tokens leave gaps. Masked completion tokens are counted
(`num_dropped_tokens`); model tokens whose log-prob the dump stored as null (or NaN) are
counted separately (`num_null_tokens`).

Values a dump may hold are checked as they stream in (`ValueChecks`), never passed on as a
silent number: a negative token id, one beyond int32, or a log-prob of +inf stop the import
in one line naming the file and record; log-probs above 0 (not a log-probability: tiny ones
are a low-precision log-softmax's rounding) and an inference log-prob of -inf (the sampled
token impossible under the sampler) are counted, named in a warning and recorded in
run.json (`source.value_checks`), and a side whose log-probs are mostly above 0 is refused
(negative log-likelihoods or probabilities, not log-probs).
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import MismatchError, first_line
from ..runs import RunDir, atomic_write_table, token_frame
from .checks import SlopeSums
from .toolkit import Chunk, ReadContext, require_trust

SCORED = "scored"
RESCORED = "rescored"
TOKENS_KIND = "tokens"  # token parts (pipeline.TOKENS)
ROLLOUT_KIND = "rollout"  # rollout parts (pipeline.ROLLOUT)
SEQS_KIND = "seqs"  # per-part static sequence columns
PART_TOKENS = 1_000_000  # completion tokens per part: bounds memory of finalize and rescore


# ----------------------------------------------------------------------------- files


def parse_steps(spec: str | None) -> set[int] | None:
    """`--steps 10,20-30` -> {10, 20, ..., 30}; None -> None (every step)."""
    if spec is None:
        return None
    out: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        m = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part)
        if m is None:
            raise MismatchError(
                f"--steps must look like 10,20-30 (integers and ranges), got {spec!r}"
            )
        lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if hi < lo:
            raise MismatchError(f"--steps range {part} is empty (the end is before the start)")
        out.update(range(lo, hi + 1))
    if not out:
        raise MismatchError(f"--steps names no step: {spec!r}")
    return out


def discover(sources: Sequence[str | Path], patterns: Sequence[str], fmt: str) -> list[Path]:
    """The files of SOURCE arguments: a file is taken as given, a folder is searched
    recursively for `patterns`, anything else is a glob. Sorted, without duplicates."""
    if not sources:
        raise MismatchError("no SOURCE given: pass the dump's files, folders or a glob")
    found: list[Path] = []
    for src in sources:
        p = Path(src).expanduser()
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            hits = sorted({h for pat in patterns for h in p.rglob(pat) if h.is_file()})
            if not hits:
                raise MismatchError(
                    f"no {fmt} files ({', '.join(patterns)}) found under {p}: is this a {fmt} dump?"
                )
            found.extend(hits)
        elif glob.has_magic(str(src)):
            hits = sorted(Path(h) for h in glob.glob(str(p), recursive=True))
            files = [h for h in hits if h.is_file()]
            for d in (h for h in hits if h.is_dir()):
                files.extend(sorted({x for pat in patterns for x in d.rglob(pat) if x.is_file()}))
            if not files:
                raise MismatchError(f"no file matches {src}")
            found.extend(files)
        else:
            raise MismatchError(f"source not found: {src}")
    seen: set[Path] = set()
    out = []
    for f in found:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            out.append(f)
    return sorted(out, key=lambda f: _natural_key(str(f)))


def _natural_key(s: str) -> list[Any]:
    """Sort key with numbers compared as numbers (step_9 before step_10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes (recorded in run.json's source block)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """What run.json's `source.files` records of a dump file: path, size, mtime, sha256
    (how `--append` tells a new file from one read already, or one changed since)."""
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256": sha256_file(path)}  # fmt: skip


# ----------------------------------------------------------------------------- ingest


class _PromptIndex:
    """prompt_id per distinct prompt (first-seen order) and sample_idx per repeat of it."""

    def __init__(self) -> None:
        self.ids: dict[bytes, list[int]] = {}

    def assign(
        self, prompt_lens: np.ndarray, prompt_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        S = prompt_lens.size
        pid = np.empty(S, np.int64)
        sidx = np.empty(S, np.int32)
        off = np.concatenate([[0], np.cumsum(prompt_lens)])
        flat = np.ascontiguousarray(prompt_ids, dtype=np.int64)
        for j in range(S):  # one hash per completion, never per token
            key = hashlib.blake2b(flat[off[j] : off[j + 1]].tobytes(), digest_size=16).digest()
            entry = self.ids.get(key)
            if entry is None:
                entry = self.ids[key] = [len(self.ids), 0]
            pid[j], sidx[j] = entry[0], entry[1]
            entry[1] += 1
        return pid, sidx


def span_turns(lens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per completion token, the index of its run of model tokens in the completion (0 for
    the first run; masked tool / observation tokens separate turns). [sum R] int32"""
    n = mask.size
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)  # [S]
    prev = np.concatenate([[False], mask[:-1]])
    prev[starts[lens > 0]] = False  # a completion's first token starts a run
    run_start = mask & ~prev  # [sum R]
    cs = np.cumsum(run_start)
    before = np.concatenate([[0], cs])[starts]  # runs started before each completion
    seq = np.repeat(np.arange(lens.size), lens)
    return (cs - before[seq] - 1).clip(min=0).astype(np.int32) if n else np.zeros(0, np.int32)


INT32_MAX = int(np.iinfo(np.int32).max)  # token ids are stored as int32


def _locator(path: Any, rows: np.ndarray | None, seq: Any) -> Any:
    """k (an index into per-token values whose completion is seq()[k]) -> "FILE record R",
    R the dump's record (`source_row`) of that completion; `seq` is computed only when a
    record is named."""
    if rows is None:
        return lambda k: f"{path}"
    return lambda k: f"{path} record {int(rows[seq()[k]])}"


class ValueChecks:
    """What the imported values hold that a log-prob or a token id cannot, counted per side
    (`infer`, `train`) over the token rows, with the first place each was seen."""

    def __init__(self) -> None:
        self.positive = {"infer": 0, "train": 0}  # log-probs above 0
        self.max_logp = {"infer": -np.inf, "train": -np.inf}
        self.neginf_infer = 0  # inference log-prob -inf: a sampled token of probability 0
        self.first: dict[str, str] = {}  # what -> "FILE record R"
        self.tokens = 0

    def ids(self, ids: np.ndarray, what: str, where: Any) -> None:
        """Token ids must be vocabulary indices: >= 0 and within int32 (one line if not)."""
        if not ids.size:
            return
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi > INT32_MAX:
            bad = int(np.flatnonzero((ids < 0) | (ids > INT32_MAX))[0])
            v = int(ids[bad])
            why = "negative" if v < 0 else f"beyond int32 ({INT32_MAX:,}), where it would wrap"
            raise MismatchError(
                f"{where(bad)}: {what} holds token id {v}, {why}: token ids index the vocabulary"
            )

    def logp(self, side: str, v: np.ndarray, where: Any) -> None:
        """`v`: the token rows' log-probs of `side` (NaN already dropped)."""
        if not v.size:
            return
        with np.errstate(invalid="ignore"):
            pos = v > 0
        if np.isposinf(v).any():
            bad = int(np.flatnonzero(np.isposinf(v))[0])
            raise MismatchError(
                f"{where(bad)}: logp_{side} is +inf; a log-prob is at most 0 (log 1): the dump "
                "is damaged"
            )
        n = int(pos.sum())
        if n:
            self.positive[side] += n
            self.max_logp[side] = max(self.max_logp[side], float(v[pos].max()))
            if f"positive_{side}" not in self.first:
                self.first[f"positive_{side}"] = where(int(np.flatnonzero(pos)[0]))
        if side == "infer":
            ninf = np.isneginf(v)
            if ninf.any():
                self.neginf_infer += int(ninf.sum())
                if "neginf_infer" not in self.first:
                    self.first["neginf_infer"] = where(int(np.flatnonzero(ninf)[0]))

    def finish(self, warn: Any) -> dict[str, Any]:
        """Refuse a side mostly above 0; warn about the rest; the run.json block."""
        for side, n in self.positive.items():
            if n and n > self.tokens / 2:
                raise MismatchError(
                    f"{n:,} of {self.tokens:,} imported logp_{side} values are above 0 (first: "
                    f"{self.first[f'positive_{side}']}, max {self.max_logp[side]:+.4g}): these "
                    "are not log-probs (negative log-likelihoods? probabilities?); a log-prob is "
                    "at most 0"
                )
            if n:
                warn(
                    f"{n:,} model token(s) have logp_{side} above 0 (max "
                    f"{self.max_logp[side]:+.3g}, first: {self.first[f'positive_{side}']}): not "
                    "a log-probability (a tiny excess is a low-precision log-softmax's "
                    "rounding); kept as they are: their p = exp(logp) > 1 falls outside every "
                    "bucket"
                )
        if self.neginf_infer:
            warn(
                f"{self.neginf_infer:,} model token(s) have logp_infer = -inf (first: "
                f"{self.first['neginf_infer']}): the dump's sampler gave probability 0 to the "
                "token it sampled; their delta is infinite (counted in num_infinite)"
            )
        return {
            "num_positive_logp": dict(self.positive),
            "max_positive_logp": {
                k: (v if self.positive[k] else None) for k, v in self.max_logp.items()
            },
            "num_neginf_logp_infer": self.neginf_infer,
        }


class Ingest:
    """Turns chunks into parts of about PART_TOKENS completion tokens: token parts (scored)
    or rollout parts (rescored), plus sequence parts; counts what it keeps and drops."""

    def __init__(self, run: RunDir, mode: str, part_tokens: int = PART_TOKENS) -> None:
        self.run, self.mode, self.part_tokens = run, mode, part_tokens
        self.prompts = _PromptIndex()
        self.next_seq = 0
        self.n_parts = 0
        self._frames: list[pd.DataFrame] = []
        self._seqs: list[pa.Table] = []
        self._buffered = 0
        self.num_sequences = self.num_tokens = self.num_dropped = self.num_null = 0
        self.steps: set[int] = set()
        self.max_token_id = -1
        self.slope = SlopeSums()  # logp_infer against logp_train (scored mode), checks.py
        self.values = ValueChecks()

    def add(self, chunk: Chunk, file_index: int, path: Any = None) -> None:
        S = chunk.num_sequences
        if S == 0:
            return
        self._check(chunk, path)
        seq_ids = np.arange(self.next_seq, self.next_seq + S, dtype=np.int64)
        self.next_seq += S
        pid, sidx = self.prompts.assign(chunk.prompt_lens, chunk.prompt_ids)
        tok_seq = np.repeat(np.arange(S), chunk.lens)  # [sum R] completion index
        starts = np.concatenate([[0], np.cumsum(chunk.lens)[:-1]])
        pos = (np.arange(tok_seq.size) - starts[tok_seq]).astype(np.int32)
        li = np.asarray(chunk.logp_infer, dtype=np.float64)
        lt = None if chunk.logp_train is None else np.asarray(chunk.logp_train, dtype=np.float64)
        mask = np.asarray(chunk.loss_mask, dtype=bool)
        nonnull = (
            ~np.isnan(li) if lt is None or self.mode == RESCORED else ~np.isnan(li) & ~np.isnan(lt)
        )
        keep = mask & nonnull  # [sum R] the token rows
        self.num_dropped += int(mask.size - mask.sum())
        self.num_null += int((mask & ~nonnull).sum())
        self.num_sequences += S
        ids = np.concatenate([chunk.token_ids, chunk.prompt_ids])
        if ids.size:
            self.max_token_id = max(self.max_token_id, int(ids.max()))
        if "step" in chunk.seq_extra:
            self.steps.update(int(s) for s in np.unique(chunk.seq_extra["step"]))
        turns = chunk.token_extra.get("turn")
        if turns is None:
            turns = span_turns(chunk.lens, mask)
        per_token = {**chunk.token_extra, "turn": turns}
        seq_cols = {k: chunk.seq_extra[k] for k in ("step", "env") if k in chunk.seq_extra}

        if self.mode == SCORED:
            assert lt is not None
            cols: dict[str, Any] = {
                "seq_id": seq_ids[tok_seq][keep],
                "prompt_id": pid[tok_seq][keep],
                "sample_idx": sidx[tok_seq][keep],
                "pos": pos[keep],
                "token_id": chunk.token_ids[keep].astype(np.int32),
                "logp_infer": li[keep],
                "logp_train": lt[keep],
                "eps_hat": np.full(int(keep.sum()), np.nan),  # no inference top-K in a dump
            }
            for k, v in seq_cols.items():
                cols[k] = v[tok_seq][keep]
            for k, v in per_token.items():
                cols[k] = v[keep]
            frame = token_frame(cols)
            self.slope.add(cols["logp_train"], cols["logp_infer"])
        else:
            split = np.cumsum(chunk.lens)[:-1]
            pos_split = np.cumsum(chunk.prompt_lens)[:-1]
            frame = pd.DataFrame(
                {
                    "seq_id": seq_ids,
                    "prompt_id": pid,
                    "sample_idx": sidx,
                    "prompt_token_ids": np.split(chunk.prompt_ids.astype(np.int32), pos_split),
                    "response_token_ids": np.split(chunk.token_ids.astype(np.int32), split),
                    "logp_infer": np.split(li, split),
                    "topk_ids_infer": [None] * S,  # a dump holds no inference top-K
                    "topk_logp_infer": [None] * S,
                    "loss_mask": np.split(keep, split),
                    **{k: v for k, v in seq_cols.items()},
                    **{k: np.split(v, split) for k, v in per_token.items()},
                }
            )
        at = _locator(path, chunk.seq_extra.get("source_row"), lambda: tok_seq[keep])
        self.values.logp("infer", li[keep], at)
        if self.mode == SCORED and lt is not None:
            self.values.logp("train", lt[keep], at)
        self.values.tokens += int(keep.sum())
        self.num_tokens += int(keep.sum())
        self._frames.append(frame)
        self._seqs.append(self._seq_table(chunk, seq_ids, pid, sidx, mask, file_index))
        self._buffered += int(chunk.lens.sum())
        if self._buffered >= self.part_tokens:
            self.flush()

    def _check(self, chunk: Chunk, path: Any) -> None:
        """The chunk's arrays agree in length, and its token ids are vocabulary indices."""
        c = chunk
        R, P = int(np.sum(c.lens)), int(np.sum(c.prompt_lens))
        sizes = {"token_ids": c.token_ids.size, "logp_infer": np.size(c.logp_infer),
                 "loss_mask": np.size(c.loss_mask),
                 **({} if c.logp_train is None else {"logp_train": np.size(c.logp_train)}),
                 **{k: np.size(v) for k, v in c.token_extra.items()}}  # fmt: skip
        bad = {k: n for k, n in sizes.items() if n != R}
        if bad or c.prompt_ids.size != P or (c.lens < 0).any() or (c.prompt_lens < 0).any():
            k, n = next(iter(bad.items())) if bad else ("prompt_ids", c.prompt_ids.size)
            raise MismatchError(
                f"{path}: {k} has {n} values for {R if bad else P} tokens (length mismatch)"
            )
        rows = c.seq_extra.get("source_row")
        for ids, lens, what in ((c.token_ids, c.lens, "the completion"),
                                (c.prompt_ids, c.prompt_lens, "the prompt")):  # fmt: skip
            at = _locator(path, rows, lambda lens=lens: np.repeat(np.arange(lens.size), lens))
            self.values.ids(np.asarray(ids), what, at)

    def _seq_table(self, chunk: Chunk, seq_ids, pid, sidx, mask, file_index: int) -> pa.Table:
        S = chunk.num_sequences
        seq = np.repeat(np.arange(S), chunk.lens)
        dropped = np.bincount(seq[~mask], minlength=S).astype(np.int32)

        def lists(lens: np.ndarray, values: np.ndarray) -> pa.Array:
            off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
            return pa.ListArray.from_arrays(pa.array(off), pa.array(values.astype(np.int32)))

        cols: dict[str, Any] = {
            "seq_id": pa.array(seq_ids),
            "prompt_id": pa.array(pid),
            "sample_idx": pa.array(sidx),
            "prompt_token_ids": lists(chunk.prompt_lens, chunk.prompt_ids),
            "response_token_ids": lists(chunk.lens, chunk.token_ids),
            "num_dropped_tokens": pa.array(dropped),
        }
        for k in ("step", "env", "reward"):
            if k in chunk.seq_extra:
                cols[k] = pa.array(chunk.seq_extra[k])
        cols["source_file"] = pa.array(np.full(S, file_index, np.int32))
        if "source_row" in chunk.seq_extra:
            cols["source_row"] = pa.array(np.asarray(chunk.seq_extra["source_row"], np.int64))
        return pa.table(cols)

    def checkpoint(self) -> dict[str, Any]:
        """The counters after a complete file (`restore` goes back to them)."""
        import copy

        keep = ("next_seq", "num_sequences", "num_tokens", "num_dropped", "num_null", "steps",
                "max_token_id", "slope", "values")  # fmt: skip
        return {k: copy.deepcopy(getattr(self, k)) for k in keep}

    def restore(self, cp: dict[str, Any]) -> None:
        """Back to checkpoint `cp`: the counters, and every completion with seq_id >=
        its next_seq dropped from the buffer and the parts (a file cut off by Ctrl-C)."""
        import pyarrow.parquet as pq

        for k, v in cp.items():
            setattr(self, k, v)
        cut = cp["next_seq"]
        self._frames = [f[f["seq_id"] < cut] for f in self._frames]
        self._seqs = [t.filter(pc.less(t["seq_id"], cut)) for t in self._seqs]
        kind = TOKENS_KIND if self.mode == SCORED else ROLLOUT_KIND
        for i in range(self.n_parts - 1, -1, -1):
            seqs = pq.read_table(self.run.part_path(SEQS_KIND, i))
            if len(seqs) and int(pc.min(seqs["seq_id"]).as_py()) < cut:
                if int(pc.max(seqs["seq_id"]).as_py()) >= cut:
                    df = self.run.read_part(kind, i)
                    self.run.write_part(kind, i, df[df["seq_id"] < cut])
                    keep = seqs.filter(pc.less(seqs["seq_id"], cut))
                    atomic_write_table(self.run.part_path(SEQS_KIND, i), keep)
                break
            self.run.part_path(kind, i).unlink(missing_ok=True)
            self.run.part_path(SEQS_KIND, i).unlink(missing_ok=True)
            self.n_parts = i
        self._buffered = sum(len(f) for f in self._frames)

    def flush(self) -> None:
        """Write the buffered chunks as part n_parts (token or rollout part + sequence part)."""
        if not self._frames:
            return
        kind = TOKENS_KIND if self.mode == SCORED else ROLLOUT_KIND
        frame = pd.concat(self._frames, ignore_index=True)
        self.run.write_part(kind, self.n_parts, frame)
        seqs = pa.concat_tables(self._seqs, promote_options="permissive")
        atomic_write_table(self.run.part_path(SEQS_KIND, self.n_parts), seqs)
        self.n_parts += 1
        self._frames, self._seqs, self._buffered = [], [], 0


# ----------------------------------------------------------------------------- the import


@dataclass
class ImportOptions:
    """Everything `mismatch import` was asked to do."""

    fmt: str
    sources: Sequence[str]
    out: Path
    model: str | None = None
    rescore: bool = False
    steps: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    trust_pickle: bool = False
    overwrite: bool = False
    append: bool = False  # --append: read only the files RUN has not read
    device: str | None = None
    batch_tokens: int = 4096
    rescore_memory: str | None = None  # --rescore-memory, e.g. "2GiB"
    part_tokens: int = PART_TOKENS
    loaded: RescoreModel | None = None  # a model kept loaded across imports (`watch`)
    ray: Any = None  # cluster.RayOptions: the training side spread over Ray actors

    def sampling(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "min_p": self.min_p}  # fmt: skip


def run_import(opts: ImportOptions, progress: Any = None) -> dict[str, Any]:
    """Import a framework's dump into the run directory `opts.out` and return the `--json`
    result (run, format, mode, counts, steps, warnings). The run is written beside `out`
    and renamed into place when complete (`runs.replacing`): nothing is left behind on
    failure, and a run `--overwrite` replaces survives until the new one is complete. An
    `--out` that is the dump's file or folder, holds it or lies inside it is refused."""
    import shutil

    from ..config import MeasureConfig
    from ..pipeline import Progress
    from ..runs import check_out, replacing
    from . import get_format

    mod = get_format(opts.fmt)
    prog = progress or Progress()
    warnings: list[str] = []

    def warn(message: str) -> None:
        if message not in warnings:
            warnings.append(message)

    s = opts.sampling()
    MeasureConfig(**s).validate()  # the same limits as `measure` (one-line errors)
    steps = parse_steps(opts.steps)
    if opts.rescore and not opts.model:
        raise MismatchError(
            "--rescore needs --model MODEL: the model whose training side rescores the dump"
        )
    files = discover(opts.sources, mod.PATTERNS, mod.NAME)
    inputs = [*_source_inputs(opts.sources), *(("the dump's file", f) for f in files)]
    appending = opts.append and RunDir(Path(opts.out)).exists()
    check_out(
        opts.out, overwrite=opts.overwrite or appending, inputs=inputs
    )  # before any model loads
    explicit = {
        Path(p).expanduser().resolve() for p in opts.sources if Path(p).expanduser().is_file()
    }
    if hasattr(mod, "select"):
        files = mod.select(files, warn, explicit)
    if steps is not None:
        file_steps = {f: mod.step_of(f) for f in files}
        kept = [f for f in files if file_steps[f] is None or file_steps[f] in steps]
        if not kept:
            have = sorted({v for v in file_steps.values() if v is not None})
            raise MismatchError(
                f"no {mod.NAME} file has a step in --steps {opts.steps} (steps found: {_ranges(have)})"
            )
        files = kept
    if not files:
        raise MismatchError(f"nothing to import: every {mod.NAME} file found was skipped")
    if mod.PICKLE:
        require_trust(files[0], mod.NAME, ReadContext(trust_pickle=opts.trust_pickle))
    mode = RESCORED if opts.rescore else {"both": SCORED, "infer": RESCORED}.get(mod.SIDES)
    if mode == RESCORED and not opts.model:
        raise MismatchError(
            f"{mod.NAME} dumps hold only the inference side: pass --model MODEL to rescore them "
            "with the training side"
        )
    if opts.ray is not None and mode != RESCORED:
        raise MismatchError(
            f"--ray spreads the rescoring, and this {mod.NAME} dump holds both sides: pass "
            "--rescore --model MODEL to rescore it"
        )
    prior = _Prior.open(Path(opts.out), mod.NAME) if appending else None
    if prior is not None:
        files = prior.new_files(files)
        if not files:
            return {"run": str(opts.out), "format": mod.NAME, "num_new_files": 0,
                    "num_files": len(prior.files), "warnings": list(warnings)}  # fmt: skip
        mode = prior.check_mode(mode, opts)
    model = opts.loaded or RescoreModel(opts.model, rescored=False)
    if mode == RESCORED:
        model.resolve()
        if prior is not None:
            prior.check_model(model)
    overwrite = opts.overwrite or prior is not None
    with replacing(opts.out, overwrite=overwrite, inputs=inputs) as work:
        run = RunDir(work)
        if prior is not None:
            prior.carry_extras(work)
        result = _run(opts, mod, files, steps, mode, model, run, prog, warn, warnings, prior)
        shutil.rmtree(run.parts, ignore_errors=True)
    result["run"] = str(opts.out)
    result["num_new_files"] = result["num_files"] - (len(prior.files) if prior else 0)
    return result


class _Prior:
    """The run an `--append` adds to: its run.json and the files it read."""

    def __init__(self, path: Path, meta: Any) -> None:
        self.path, self.meta = path, meta
        self.files: list[dict[str, Any]] = list(meta.source.get("files") or [])

    @classmethod
    def open(cls, path: Path, fmt: str) -> _Prior:
        """The run at `path`, refused in one line unless it is a complete scored import of
        format `fmt`."""
        from ..runs import open_run

        _, meta = open_run(path, allow_incomplete=False)
        src = meta.source
        if meta.command != "import" or not src.get("files"):
            raise MismatchError(
                f"--append adds to a run `mismatch import` wrote; {path} was written by "
                f"`mismatch {meta.command}`"
            )
        if src.get("format") != fmt:
            raise MismatchError(
                f"--append: {path} is a {src.get('format')} import, not {fmt}: append files "
                "of the same format"
            )
        if src.get("mode") not in (SCORED, RESCORED):
            raise MismatchError(
                f"--append: {path} records no import mode (scored or rescored): import again "
                "with --overwrite"
            )
        return cls(path, meta)

    @property
    def mode(self) -> str:
        return str(self.meta.source["mode"])

    def check_mode(self, mode: str | None, opts: ImportOptions) -> str:
        """The mode of the append: the run's; one line if the new files or flags ask for
        the other one, or (rescored) for other sampling flags than the run replayed."""
        if self.mode == SCORED and mode == RESCORED:
            raise MismatchError(
                f"--append: {self.path} is a scored import (both sides in the dump); these "
                "files would be rescored: import them into another run, or all with --overwrite"
            )
        if self.mode == RESCORED:
            if mode == SCORED:
                raise MismatchError(
                    f"--append: {self.path} was rescored with {self.meta.model.get('name')}: "
                    "pass --rescore --model MODEL to rescore the new files too"
                )
            if not opts.model and opts.loaded is None:
                raise MismatchError(
                    f"--append: {self.path} was rescored: pass --model "
                    f"{self.meta.model.get('path') or self.meta.model.get('name')} to rescore "
                    "the new files with the same model"
                )
            had = self.meta.source.get("sampling") or {}
            if had and had != opts.sampling():
                raise MismatchError(
                    f"--append: {self.path} was rescored with sampling {_flags(had)}, not "
                    f"{_flags(opts.sampling())}: pass the run's sampling flags"
                )
        return self.mode

    def check_model(self, model: RescoreModel) -> None:
        """One line unless `model` is the one the run was rescored with: the same weights
        sha256 where both have one, else the same path."""
        rec = self.meta.model
        was, now = rec.get("weights_sha256"), model.weights
        same = was == now if was and now else rec.get("path") == model.path
        if not same:
            raise MismatchError(
                f"--append: {self.path} was rescored with {rec.get('path') or rec.get('name')}"
                f"{f' (weights sha256 {was[:12]})' if was else ''}, not {model.path}"
                f"{f' ({now[:12]})' if now else ''}: pass the run's model, or import into "
                "another run"
            )

    def new_files(self, files: Sequence[Path]) -> list[Path]:
        """The files not read yet; one line if a file read before has changed since (its
        size, or its sha256 when its mtime moved)."""
        seen = {f["path"]: f for f in self.files}
        out = []
        for f in files:
            rec = seen.get(str(f.resolve()))
            if rec is None:
                out.append(f)
                continue
            st = f.stat()
            same = st.st_size == rec.get("bytes")
            if same and st.st_mtime_ns != rec.get("mtime_ns"):
                same = sha256_file(f) == rec.get("sha256")
            if not same:
                raise MismatchError(
                    f"{f} changed since {self.path} read it (size {rec.get('bytes')} -> "
                    f"{st.st_size} bytes, sha256 recorded in run.json): refusing to mix two "
                    "versions of a file; import into a new run or pass --overwrite"
                )
        return out

    def carry_extras(self, work: Path) -> None:
        """Copy what else lives in the run directory (figures, tables, pages) into the new
        one, so an append replaces only the tables and run.json."""
        import shutil

        from ..schema import PARTS_DIR, RUN_JSON, SEQUENCES_FILE, TOKENS_FILE

        for p in self.path.iterdir():
            if p.name in (RUN_JSON, TOKENS_FILE, SEQUENCES_FILE, PARTS_DIR):
                continue
            if p.is_dir():
                shutil.copytree(p, work / p.name)
            else:
                shutil.copy2(p, work / p.name)

    def seed(self, ingest: Ingest) -> None:
        """Start `ingest` where the run left off: its token and sequence tables copied as
        parts (cut where seq_id changes), the prompt index, seq_id and the counters."""
        import pyarrow.parquet as pq

        from ..schema import SEQUENCES_FILE, TOKENS_FILE

        src = self.meta.source
        seqs = pq.read_table(self.path / SEQUENCES_FILE)
        seq_ids = seqs["seq_id"].to_numpy()
        # the prompt index, as a one-shot import of the same files builds it
        prompts = seqs["prompt_token_ids"].combine_chunks()
        off = prompts.offsets.to_numpy()
        flat = prompts.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        pid = seqs["prompt_id"].to_numpy()
        for j in np.argsort(seq_ids, kind="stable"):
            key = hashlib.blake2b(flat[off[j] : off[j + 1]].tobytes(), digest_size=16).digest()
            entry = ingest.prompts.ids.setdefault(key, [int(pid[j]), 0])
            entry[1] += 1
        ingest.next_seq = int(seq_ids.max()) + 1 if seq_ids.size else 0
        ingest.num_sequences = int(seqs.num_rows)
        ingest.num_dropped = int(src.get("num_dropped_tokens") or 0)
        ingest.num_null = int(src.get("num_null_tokens") or 0)
        ingest.steps.update(int(v) for v in src.get("steps") or [])
        resp = seqs["response_token_ids"].combine_chunks().flatten()
        top = [pc.max(resp).as_py(), pc.max(prompts.flatten()).as_py(), -1]
        ingest.max_token_id = max(int(v) for v in top if v is not None)
        where = lambda k: f"{self.path / TOKENS_FILE}"  # noqa: E731
        pf = pq.ParquetFile(self.path / TOKENS_FILE)
        buf: list[pa.Table] = []
        start = 0  # first sequence row not yet in a part

        def write(tables: list[pa.Table], last: bool) -> None:
            nonlocal start
            t = pa.concat_tables(tables)
            atomic_write_table(ingest.run.part_path(TOKENS_KIND, ingest.n_parts), t)
            top_id = int(pc.max(t["seq_id"]).as_py()) if t.num_rows else -1
            stop = seqs.num_rows if last else int(np.searchsorted(seq_ids, top_id, "right"))
            atomic_write_table(
                ingest.run.part_path(SEQS_KIND, ingest.n_parts), seqs.slice(start, stop - start)
            )
            start = stop
            ingest.n_parts += 1
            x = t["logp_train"].to_numpy(zero_copy_only=False)
            y = t["logp_infer"].to_numpy(zero_copy_only=False)
            ingest.values.logp("infer", y, where)
            if ingest.mode == SCORED:  # a rescored import checks only the dump's side
                ingest.slope.add(x, y)
                ingest.values.logp("train", x, where)
            ingest.values.tokens += t.num_rows
            ingest.num_tokens += t.num_rows

        rows = 0  # in buf: row groups are merged into parts of up to part_tokens rows
        for g in range(pf.num_row_groups):
            t = pf.read_row_group(g)
            if buf and t.num_rows and buf[-1].num_rows and rows + t.num_rows > ingest.part_tokens:
                if buf[-1]["seq_id"][-1].as_py() != t["seq_id"][0].as_py():
                    write(buf, last=False)
                    buf, rows = [], 0
            buf.append(t)
            rows += t.num_rows
        if buf or start < seqs.num_rows:
            write(buf or [pf.schema_arrow.empty_table()], last=True)


def _flags(sampling: dict[str, Any]) -> str:
    """{'temperature': 0.9, ...} -> '--temperature 0.9 --top-p 1 ...' (for messages)."""
    return " ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in sampling.items())


def _source_inputs(sources: Sequence[str | Path]) -> list[tuple[str, Path]]:
    """The SOURCE arguments that are files or folders, as `runs.check_out` inputs."""
    out: list[tuple[str, Path]] = []
    for src in sources:
        p = Path(src).expanduser()
        if p.is_dir():
            out.append(("the dump's folder", p))
        elif p.is_file():
            out.append(("the dump's file", p))
    return out


# what a reader raises on a malformed file (a list where an array is due, a key missing,
# a shape that does not unpack): one line naming the file, never a traceback
_MALFORMED = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError)


_FILE_KEYS = ("path", "bytes", "mtime_ns", "sha256")


def _agreed_facts(file_info: list[dict[str, Any]]) -> dict[str, Any]:
    """The facts readers noted (`ReadContext.note`) for the run: a key's value when every
    file noted the same one, else the sorted distinct values as a list."""
    keys = [k for info in file_info for k in info if k not in _FILE_KEYS]
    out: dict[str, Any] = {}
    for k in dict.fromkeys(keys):
        vals = [json.dumps(info.get(k), sort_keys=True) for info in file_info]
        distinct = sorted(set(vals))
        out[k] = (
            json.loads(distinct[0]) if len(distinct) == 1 else [json.loads(v) for v in distinct]
        )
    return out


def _chunks(mod: Any, path: Path, ctx: ReadContext) -> Any:
    """`mod.read(path, ctx)`, with a reader's crash on a malformed file as one line."""
    it = iter(mod.read(path, ctx))
    while True:
        try:
            chunk = next(it)
        except StopIteration:
            return
        except MismatchError:
            raise
        except _MALFORMED as e:
            raise MismatchError(
                f"{path}: not a readable {mod.NAME} dump ({type(e).__name__}: {first_line(e)})"
            ) from e
        yield chunk


class RescoreModel:
    """The --model of an import: only a name in scored mode; resolved (path, vocabulary,
    weights sha256) when the dump is rescored. `net(device)` loads the float32 eager
    network once and keeps it: `watch` passes one RescoreModel to every step's append."""

    def __init__(self, spec: str | None, rescored: bool = False) -> None:
        self.spec = spec
        self.path: str | None = None
        self.name: str | None = Path(spec).name if spec else None
        self.vocab: int | None = None
        self.weights: str | None = None
        self.loads = 0  # networks loaded (one per device asked for)
        self._net: Any = None
        self._device: str | None = None
        if rescored:
            self.resolve()

    def resolve(self) -> None:
        """Path, display name, vocabulary size and weights sha256 (once)."""
        from ..models import resolve_model, weights_hash
        from .checks import vocab_size

        if self.path is None:
            self.path, self.name = resolve_model(self.spec)
            self.vocab = vocab_size(self.path)
            self.weights = weights_hash(self.path)

    def net(self, device: Any) -> Any:
        """The network on `device` (float32, eager attention, as `measure`), loaded once."""
        from ..models import load_model

        self.resolve()
        assert self.path is not None
        if self._net is None or self._device != str(device):
            self._net = None
            self._net, _ = load_model(self.path, "float32", device, "eager")
            self._device = str(device)
            self.loads += 1
        return self._net


_Model = RescoreModel


def _ranges(values: Sequence[int]) -> str:
    """1,2,3,7 -> '1-3,7' (for messages)."""
    if not values:
        return "none"
    out, start, prev = [], values[0], values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(f"{start}-{prev}" if prev > start else f"{start}")
        if v is not None:
            start = prev = v
    return ",".join(out)


def _run(
    opts, mod, files, steps, mode, model, run, prog, warn, warnings, prior=None
) -> dict[str, Any]:
    from ..runs import new_meta, stream_sequences
    from ..schema import STATUS_COMPLETE
    from . import checks

    file_info: list[dict[str, Any]] = [] if prior is None else list(prior.files)
    reading: list[dict[str, Any]] = [{}]  # the record of the file being read

    def note(key: str, value: Any) -> None:  # a reader's fact about the file it reads
        reading[0][key] = value

    ctx = ReadContext(trust_pickle=opts.trust_pickle, steps=steps, warn=warn, note=note)
    meta = new_meta("import", source={"format": mod.NAME, "files": file_info})
    run.write_meta(meta)
    ingest: Ingest | None = None
    if prior is not None:
        mode = prior.mode
        ingest = Ingest(run, mode, opts.part_tokens)
        prior.seed(ingest)
    seeded = ingest.n_parts if ingest is not None else 0  # parts copied from the run
    first_index = len(file_info)
    seen_steps: set[int] = set()
    cp = ingest.checkpoint() if ingest is not None else None
    done = 0  # files read to their end
    interrupted = False
    try:
        for i, path in enumerate(files):
            info = reading[0] = file_record(path)
            for chunk in _chunks(mod, path, ctx):
                if steps is not None:
                    if "step" not in chunk.seq_extra:
                        raise MismatchError(f"--steps given, but {path} holds no step")
                    st = chunk.seq_extra["step"]
                    seen_steps.update(int(v) for v in np.unique(st))
                    chunk = chunk.select(np.isin(st, list(steps)))
                if chunk.num_sequences == 0:
                    continue
                if mode is None:  # formats with one or both sides: the first data decides
                    if chunk.logp_train is not None:
                        mode = SCORED
                    elif model.spec:
                        mode = RESCORED
                        model.resolve()
                    else:
                        raise MismatchError(
                            f"{path} holds only inference log-probs (no trainer side): pass "
                            "--model MODEL to rescore it with the training side"
                        )
                if mode == SCORED and chunk.logp_train is None:
                    raise MismatchError(
                        f"{path} holds no trainer log-probs, unlike the files before it: import "
                        "it separately or pass --rescore --model MODEL"
                    )
                if mode == RESCORED and model.vocab is not None:
                    top = int(
                        max(chunk.token_ids.max(initial=-1), chunk.prompt_ids.max(initial=-1))
                    )
                    if top >= model.vocab:
                        raise MismatchError(
                            f"{path} holds token id {top}, outside the vocabulary of "
                            f"{model.name} ({model.vocab} ids): is --model the model that "
                            "generated these rollouts?"
                        )
                if ingest is None:
                    ingest = Ingest(run, mode, opts.part_tokens)
                ingest.add(chunk, first_index + i, path)
            file_info.append(info)
            done = i + 1
            if ingest is not None:
                cp = ingest.checkpoint()
            if len(files) > 1:  # from the second file on: a bad single file fails in one line
                if i == 0:
                    prog.start("read", len(files))
                prog.advance("read", 1)
    except KeyboardInterrupt:
        # Ctrl-C while reading: keep the files read to their end (a run of them), or give up.
        # With --overwrite the run being replaced stays as it was: a part of the new import
        # never takes the place of a complete run.
        if cp is None or cp["num_sequences"] == 0 or opts.overwrite:
            raise
        assert ingest is not None
        ingest.restore(cp)
        interrupted = True
        warn(
            f"interrupted while reading {files[done]}: {opts.out} holds the {first_index + done} "
            f"file(s) read to their end; run the same import with --append to read the rest"
        )
    if ingest is not None:
        ingest.flush()
    if ingest is None or ingest.num_sequences == 0:
        if steps is not None:
            raise MismatchError(
                f"no completion has a step in --steps {opts.steps} (steps found: {_ranges(sorted(seen_steps))})"
            )
        which = (
            f"{files[0]} holds" if len(files) == 1 else f"{len(files)} files ({files[0]}, ...) hold"
        )
        raise MismatchError(f"empty dump: {which} no {mod.NAME} completions")
    if ingest.num_tokens == 0:
        raise MismatchError(
            "no model-generated token to import: every completion token is loss-masked or has "
            "a null log-prob"
        )
    if ingest.num_null:
        warn(
            f"{ingest.num_null:,} model token(s) have a null log-prob in the dump (or NaN; a "
            "framework writes null for a non-finite value): left out"
        )
    value_checks = ingest.values.finish(warn)
    for w in getattr(mod, "warnings", lambda s: [])(ingest.steps):
        warn(w)
    check: dict[str, Any] = {}
    per_position = None  # how the training side's per-position pass ran (rescored only)
    if mode == SCORED:
        check["slope"], w = checks.slope_check(ingest.slope.sums)
    else:
        fit = prior.meta.source.get("checks", {}).get("temperature_fit") if prior else None
        check["temperature_fit"], w, per_position, ray_record = _rescore(
            opts, model, run, ingest.n_parts, prog, seeded, fit
        )
        if ray_record is not None:
            meta["ray"] = ray_record
        if prior is not None and per_position is None:
            per_position = (prior.meta.engines.get("train") or {}).get("per_position")
    if w:
        warn(w)
    summary = run.finalize(ingest.n_parts, None, tokens=TOKENS_KIND)
    summary["num_sequences"] = stream_sequences(run, ingest.n_parts, SEQS_KIND)
    summary["num_dropped_tokens"] = ingest.num_dropped
    rescored = mode == RESCORED
    steps_sorted = sorted(ingest.steps)
    samp = opts.sampling()
    meta.update(
        config={
            "model": model.name,
            "infer_engine": f"{mod.NAME} rollouts",
            "infer_dtype": None,
            "train_dtype": "float32" if rescored else None,
            **samp,
        },
        sampling={
            **samp,
            "replay_order": "temperature -> min_p -> top_k -> top_p -> renormalise (vLLM's)",
        },
        model={
            "name": model.name,
            "path": model.path,
            "vocab_size": model.vocab,
            **({"weights_sha256": model.weights} if rescored else {}),
        },
        engines={
            "infer": {"engine": f"{mod.NAME} rollouts", "dtype": None},
            "train": {
                "engine": "transformers",
                "dtype": "float32",
                "attn_implementation": "eager",
                "per_position": per_position,
            }
            if rescored
            else {"engine": f"{mod.NAME} trainer", "dtype": None},
        },
        source={
            "format": mod.NAME,
            "mode": mode,
            **_agreed_facts(file_info),
            "files": file_info,
            "steps": steps_sorted,
            "sign_convention": mod.SIGN,
            "sampling": samp,
            "num_dropped_tokens": ingest.num_dropped,
            "num_null_tokens": ingest.num_null,
            "value_checks": value_checks,
            "checks": check,
            "warnings": list(warnings),
        },
        summary=summary,
        status=STATUS_COMPLETE,
    )
    from ..runs import now

    meta["completed"] = now()
    if prior is not None:
        meta["created"] = prior.meta.get("created", meta["created"])
        meta["source"]["appended"] = int(prior.meta.source.get("appended", 0)) + 1
    if interrupted:
        meta["source"]["interrupted"] = True
    run.write_meta(meta)
    return {
        "run": str(run.path),
        "format": mod.NAME,
        "mode": mode,
        "num_sequences": summary["num_sequences"],
        "num_tokens": summary["num_tokens"],
        "num_dropped_tokens": ingest.num_dropped,
        "num_null_tokens": ingest.num_null,
        "value_checks": value_checks,
        "steps": steps_sorted,
        "num_files": len(file_info),
        "interrupted": interrupted,
        "summary": summary,
        "checks": check,
        "warnings": list(warnings),
    }


def _rescore(
    opts, model, run, n_parts, prog, first: int = 0, fit: dict[str, Any] | None = None
) -> tuple[dict[str, Any] | None, str | None, Any, dict[str, Any] | None]:
    """Rescore the rollout parts `first`.. on the training side (float32, eager attention,
    like `measure`; parts before `first` are an append's, scored already), after fitting
    the temperature that best explains logp_infer (an append keeps the run's `fit`); eps_hat
    is set to null (no dump stores the inference side's top-K). The network is
    `model.net`: loaded once per RescoreModel. With `opts.ray` the parts are scored by Ray
    actors (`cluster.score_on_ray`; the fit still runs here), and the fourth value is
    run.json's `ray` record (None without)."""
    from ..config import parse_size
    from ..models import pick_device
    from ..pipeline import TrainSide, rescore_parts
    from ..sampling import Sampling
    from . import checks

    device = pick_device(opts.device)
    sampling = Sampling(opts.temperature, opts.top_p, opts.top_k, opts.min_p)
    net = model.net(device)
    if first == 0 or fit is None:
        prog.log("fitting the temperature that explains the inference log-probs")
        fit = checks.fit_temperature(net, run.read_part(ROLLOUT_KIND, first), sampling, device)
    train = TrainSide(model.path, "float32", "eager", device, opts.batch_tokens,
                      memory=parse_size(opts.rescore_memory, "--rescore-memory"))  # fmt: skip
    record = None
    if opts.ray is None:
        per_position = rescore_parts(run, n_parts, train, sampling, prog, net=net)
    else:
        from ..cluster import connect, score_on_ray

        with connect(opts.ray) as cluster:
            per_position, record = score_on_ray(
                run, n_parts, train, sampling, cluster, opts.ray, prog
            )
    for i in range(first, n_parts):
        df = run.read_part(TOKENS_KIND, i)
        df["eps_hat"] = np.nan
        run.write_part(TOKENS_KIND, i, df)
    return fit, checks.temperature_warning(fit), per_position, record


__all__ = [
    "PART_TOKENS",
    "RESCORED",
    "SCORED",
    "ImportOptions",
    "Ingest",
    "RescoreModel",
    "discover",
    "parse_steps",
    "run_import",
    "sha256_file",
    "span_turns",
]
