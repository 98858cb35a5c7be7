"""The measurement pipeline: prompts -> rollouts (inference engine) -> rescoring
(transformers) -> run directory: the chunk plan, the generate and rescore phases, the part
code paths (`generate_chunks`, `score_part`) one process and every Ray actor run. The
whole measurement, `measurement.run_measure`, calls them; they report to a `Progress`
callback and never print.

Work is done in chunks of prompts. Each chunk's rollouts and token rows are written as
Parquet parts the moment they exist, so an interrupted run loses at most one chunk and
`--resume` continues where it stopped. The final tables appear (atomically) only when every
chunk is done, and only then does run.json say `complete`.
"""

from __future__ import annotations

import datetime as _dt
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import MeasureConfig, parse_size
from .errors import MismatchError
from .runs import RunDir, check_writable_dir, token_frame
from .schema import COARSE_COLUMNS, STATUS_COMPLETE, TOKEN_EXTRA_COLUMNS

ROLLOUT = "rollout"
TOKENS = "tokens"


def default_out(model_name: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{model_name}"


def check_measure_out(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an output directory that --resume / --overwrite do not allow. Reads only (no
    folder is created or removed), so `measure` checks it before anything slow loads: a
    file or a non-empty folder that is not a run is never used (`runs.check_out`), a run is
    resumed only if incomplete and replaced only with --overwrite."""
    from .runs import check_out

    run = RunDir(out)
    if run.exists():
        status = run.read_meta().get("status")
        if resume:
            if status == STATUS_COMPLETE:
                raise MismatchError(f"run {out} is already complete; nothing to resume")
        elif overwrite:
            pass  # prepare_out removes it
        elif status == STATUS_COMPLETE:
            raise MismatchError(f"{out} holds a complete run; pass --overwrite to replace it")
        else:
            raise MismatchError(
                f"{out} holds an incomplete run; pass --resume to continue it or --overwrite"
            )
    elif resume and not (out.exists() and not out.is_dir()):
        raise MismatchError(f"nothing to resume: {out} is not a run directory")
    check_out(out, overwrite=True)  # a file, or a folder that is not a run: never used


def prepare_out(out: Path, *, resume: bool, overwrite: bool) -> RunDir:
    """Check the output directory against --resume / --overwrite (`check_measure_out`)
    before any model loads, then make it ready: the run --overwrite replaces removed, the
    folder created and proved writable."""
    check_measure_out(out, resume=resume, overwrite=overwrite)
    run = RunDir(out)
    if overwrite and not resume and run.exists():
        shutil.rmtree(out)
    check_writable_dir(out)
    return run


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


def _rollout_frame(records: list[dict[str, Any]], first_seq_id: int) -> pd.DataFrame:
    df = pd.DataFrame(records)
    df.insert(0, "seq_id", np.arange(first_seq_id, first_seq_id + len(df), dtype=np.int64))
    df["sample_idx"] = df["sample_idx"].astype(np.int32)
    return df


def _token_frame(rollouts: pd.DataFrame, scored: list[dict[str, np.ndarray]]) -> pd.DataFrame:
    """One row per generated token, joining the rollout (inference) and the rescore (train);
    only rows where the rollout's optional `loss_mask` is true (see `rescore_parts`)."""
    lens = rollouts["response_token_ids"].map(len).to_numpy()  # [S]

    def rep(col: str, dtype: Any = None) -> np.ndarray:  # a per-completion value per token
        out = np.repeat(rollouts[col].to_numpy(), lens)
        return out if dtype is None else out.astype(dtype)

    def flat(col: str) -> np.ndarray:  # a per-token list column, concatenated
        arrays = [np.asarray(v) for v in rollouts[col]]
        return np.concatenate(arrays) if arrays else np.zeros(0)

    def cat(key: str) -> np.ndarray:  # a scored per-position array, concatenated
        return np.concatenate([s[key] for s in scored]) if scored else np.zeros(0)

    def listcol(key: str) -> list[np.ndarray]:
        return [row for s in scored for row in s[key]]

    def topk(col: str) -> list[np.ndarray]:  # one list per token; none stored -> empty lists
        out: list[np.ndarray] = []
        for rows, n in zip(rollouts[col], lens, strict=True):
            out.extend(rows if rows is not None and len(rows) == n else [np.zeros(0)] * n)
        return out

    cols: dict[str, Any] = {"seq_id": rep("seq_id", np.int64)}
    for c, t in (("prompt_id", np.int64), ("sample_idx", np.int32)):
        if c in rollouts.columns:
            cols[c] = rep(c, t)
    cols.update(
        {
            "pos": np.concatenate([np.arange(n, dtype=np.int32) for n in lens])
            if len(lens)
            else np.zeros(0, np.int32),
            "token_id": flat("response_token_ids").astype(np.int32),
            "logp_infer": flat("logp_infer").astype(np.float64),
            "logp_train": cat("logp_train"),
            "p_train": cat("p_train").astype(np.float64),
            "p_max_train": cat("p_max_train").astype(np.float64),
            "logp_max_train": cat("logp_max_train").astype(np.float64),
            "entropy_train": cat("entropy_train").astype(np.float64),
            "eps_hat": cat("eps_hat").astype(np.float64),
            **{k: cat(k).astype(np.float64) for k in COARSE_COLUMNS},
            "topk_ids_infer": topk("topk_ids_infer"),
            "topk_logp_infer": topk("topk_logp_infer"),
            "topk_ids_train": listcol("topk_ids_train"),
            "topk_logp_train": listcol("topk_logp_train"),
            "pruned_mass_minp": listcol("pruned_mass_minp"),
            "pruned_mass_abs": listcol("pruned_mass_abs"),
        }
    )
    for col in TOKEN_EXTRA_COLUMNS:
        if col in rollouts.columns and len(rollouts):
            per_token = isinstance(rollouts[col].iloc[0], (list, np.ndarray))
            cols[col] = flat(col) if per_token else rep(col)
    frame = token_frame(cols)
    if "loss_mask" in rollouts.columns:
        frame = frame[flat("loss_mask").astype(bool)].reset_index(drop=True)
    return frame


SEQUENCE_STATIC = ("seq_id", "prompt_id", "sample_idx", "prompt_token_ids", "response_token_ids",
                    "finish_reason", "text")  # fmt: skip


class Progress:
    """Callbacks the pipeline reports to (`progress.progress` draws bars or log lines from
    them); this base class ignores everything."""

    def start(self, phase: str, total: int, done: int = 0) -> None: ...
    def advance(self, phase: str, n: int) -> None: ...
    def log(self, message: str) -> None: ...
    def detail(self, phase: str, text: str) -> None: ...  # e.g. tokens/s per Ray worker


def _phase_generate(cfg, run, chunks, prompt_ids, model_path, device, timings, prog, save) -> None:
    todo = [i for i in range(len(chunks)) if not run.has_part(ROLLOUT, i)]
    total = len(prompt_ids) * cfg.samples_per_prompt
    done = total - sum(len(chunks[i]) for i in todo) * cfg.samples_per_prompt
    prog.start("generate", total, done)
    if not todo:
        return
    from .rollout import HfEngine, VllmEngine

    with timed(timings, "engine_start"):
        engine = (
            VllmEngine(model_path, cfg)
            if cfg.infer_engine == "vllm"
            else HfEngine(model_path, cfg, device)
        )
    try:
        generate_chunks(
            engine, run, cfg, chunks, todo, prompt_ids, lambda n: prog.advance("generate", n),
            timings, save,
        )  # fmt: skip
    finally:
        engine.close()


def plan_prompt_shards(costs: Sequence[int], n: int) -> list[tuple[int, int]]:
    """Prompts 0..P-1 (their expected tokens `costs`: prompt tokens plus samples x max
    tokens) cut into `n` contiguous ranges [start, end) of nearly equal cost, none empty
    (n <= P): cut k goes where the running cost is nearest k/n of the total. Deterministic,
    so a resumed run plans the same shards; n = 1 is the whole range."""
    P = len(costs)
    n = max(1, min(n, P))
    cum = np.concatenate([[0], np.cumsum(np.asarray(costs, dtype=np.float64))])
    bounds = [0]
    for k in range(1, n):
        lo, hi = bounds[-1] + 1, P - (n - k)  # each range keeps at least one prompt
        target = cum[-1] * k / n
        cut = min(range(lo, hi + 1), key=lambda e: (abs(cum[e] - target), e))
        bounds.append(cut)
    bounds.append(P)
    return [(bounds[k], bounds[k + 1]) for k in range(n)]


def plan_chunks(shards: Sequence[tuple[int, int]], chunk_prompts: int) -> list[list[int]]:
    """The run's chunks (prompt ids per rollout part): each shard's range cut into chunks of
    `chunk_prompts`, shard after shard; one shard gives measure's usual chunks."""
    return [
        list(range(i, min(i + chunk_prompts, end)))
        for start, end in shards
        for i in range(start, end, chunk_prompts)
    ]


def generate_chunks(
    engine: Any,
    run: RunDir,
    cfg: MeasureConfig,
    chunks: Sequence[Sequence[int]],
    todo: Sequence[int],
    prompt_ids: Any,
    advance: Callable[[int], None],
    timings: dict[str, float] | None = None,
    save: Callable[[], None] = lambda: None,
) -> int:
    """Generate chunks `todo` (indices into `chunks`, the prompt ids of each) with `engine`
    and write each one's rollout part (atomically) the moment it exists: the one code path
    of the inference side, what one process and every `--data-parallel` actor run, so a
    part's seq_ids and seeds depend only on its prompt ids. `prompt_ids[pid]` is prompt
    pid's token ids (a list or a dict of the shard's). Returns the response tokens made."""
    timings = {} if timings is None else timings
    made = 0
    for i in todo:
        batch = [(pid, prompt_ids[pid]) for pid in chunks[i]]
        with timed(timings, "generate"):
            records = engine.generate(batch, advance)
        first = chunks[i][0] * cfg.samples_per_prompt
        run.write_part(ROLLOUT, i, _rollout_frame(records, first))
        made += sum(len(r["response_token_ids"]) for r in records)
        save()
    return made


@dataclass(frozen=True)
class TrainSide:
    """How the training side scores: model, dtype, attention, device, batch budget, top-K,
    and the byte budget of the per-position pass (`memory`; None: the default share of free
    memory)."""

    model_path: str
    dtype: str = "float32"
    attn_implementation: str = "eager"
    device: Any = None
    batch_tokens: int = 4096
    top_k: int = 20
    device_map: str | None = None  # accelerate's, to spread the model over devices
    max_memory: str | None = None  # per device, e.g. "0=70GiB,cpu=200GiB"
    memory: int | None = None  # --rescore-memory in bytes
    numerics: Any = None  # rescore.TrainNumerics: head dtype, log-softmax dtype, layout, modes

    @classmethod
    def of(cls, cfg: MeasureConfig, model_path: str, device: Any) -> TrainSide:
        return cls(
            model_path,
            cfg.train_dtype,
            cfg.attn_implementation,
            device,
            cfg.rescore_batch_tokens,
            cfg.top_logprobs,
            cfg.device_map,
            cfg.max_memory,
            parse_size(cfg.rescore_memory, "--rescore-memory"),
        )


def _phase_rescore(cfg, run, chunks, model_path, device, timings, prog, save) -> Any:
    from .sampling import Sampling

    sampling = Sampling(cfg.temperature, cfg.top_p, cfg.top_k, cfg.min_p)
    return rescore_parts(
        run, len(chunks), TrainSide.of(cfg, model_path, device), sampling, prog, timings, save
    )


def load_train_model(train: TrainSide) -> Any:
    """The training side's model as `train` describes it (dtype, attention, device or device
    map), its LM head cast to float32 when its numerics ask (`lm-head-fp32`): what one process
    and every Ray worker load."""
    from .config import parse_max_memory
    from .models import cast_head_fp32, load_model

    model, _ = load_model(
        train.model_path, train.dtype, train.device, train.attn_implementation,
        train.device_map, parse_max_memory(train.max_memory),
    )  # fmt: skip
    if train.numerics is not None and train.numerics.head_fp32:
        cast_head_fp32(model)
    return model


def rescore_parts(
    run: RunDir,
    n_parts: int,
    train: TrainSide,
    sampling: Any,
    progress: Progress | None = None,
    timings: dict[str, float] | None = None,
    save: Callable[[], None] = lambda: None,
    net: Any = None,
) -> dict[str, Any] | None:
    """Score the rollout parts 0..n_parts-1 of `run` on the training side and write a token
    part for each one that lacks it (resumable: done parts are skipped); `net`, if given,
    is `train`'s network loaded already (not loaded again). Returns how the
    per-position pass ran (`rescore.PositionPass.record`, for run.json), None if nothing was
    left to score.

    A rollout part has one row per completion: seq_id, prompt_token_ids, response_token_ids,
    logp_infer (per response token), topk_ids_infer / topk_logp_infer (lists per token;
    may be empty), and optionally
      - loss_mask (list per response token): token rows only where it is true, `pos` still
        the index in the completion (masked tokens are scored as context only);
      - per-token list columns named in schema.TOKEN_EXTRA_COLUMNS (e.g. advantage) and
        per-completion scalars named there (step, env, ...), copied onto the token rows.
    """
    from .rescore import plan_pass

    prog = progress or Progress()
    timings = {} if timings is None else timings
    todo = [i for i in range(n_parts) if not run.has_part(TOKENS, i)]
    if not todo:
        prog.start("rescore", 1, 1)
        return None
    total = sum(_response_tokens(run.part_path(ROLLOUT, i)) for i in todo)
    prog.start("rescore", total)
    with timed(timings, "train_load"):
        model = net if net is not None else load_train_model(train)
    plan = plan_pass(model, sampling, train.memory, total, lambda m: prog.log(f"warning: {m}"))
    for i in todo:  # one part in memory at a time
        score_part(
            run, i, model, train, sampling, plan, lambda n: prog.advance("rescore", n), timings
        )
        save()
    return plan.record()


def score_part(
    run: RunDir,
    index: int,
    model: Any,
    train: TrainSide,
    sampling: Any,
    plan: Any,
    on_batch: Callable[[int], None] | None = None,
    timings: dict[str, float] | None = None,
) -> int:
    """Score rollout part `index` of `run` with the loaded `model` and write its token part
    (atomically: a part on disk is a finished one). The one code path of the training side:
    `rescore_parts` calls it part after part, each Ray actor of `cluster` on its shard's
    parts, so the tokens are the same either way. Returns the part's response tokens."""
    from .rescore import SeqInput, score_sequences

    timings = {} if timings is None else timings
    df = run.read_part(ROLLOUT, index)
    seqs = [
        SeqInput(
            r.prompt_token_ids,
            r.response_token_ids,
            _stack(r.topk_ids_infer, np.int32, len(r.response_token_ids)),
            _stack(r.topk_logp_infer, np.float32, len(r.response_token_ids)),
            np.asarray(r.logp_infer, dtype=np.float64),
        )
        for r in df.itertuples(index=False)
    ]
    with timed(timings, "rescore"):
        scored = score_sequences(
            model,
            seqs,
            sampling,
            train.top_k,
            train.device,
            train.batch_tokens,
            on_batch=on_batch,
            plan=plan,
            numerics=train.numerics,
        )
        tokens = _token_frame(df, scored)
    run.write_part(TOKENS, index, tokens)
    return sum(len(s.response_token_ids) for s in seqs)


def _response_tokens(part: Path) -> int:
    """Response tokens in a rollout part, from its list lengths (no ids materialised)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    col = pq.read_table(part, columns=["response_token_ids"]).column(0)
    return int(pc.sum(pc.list_value_length(col)).as_py() or 0)


def _stack(rows: Any, dtype: Any, n: int) -> np.ndarray:
    """A list column read back from Parquet (array of arrays) as a 2-D array [n, K]
    (K = 0 when the source stored no top-K)."""
    if n == 0 or rows is None or len(rows) != n:
        return np.zeros((n, 0), dtype=dtype)
    return np.stack([np.asarray(r, dtype=dtype) for r in rows])
