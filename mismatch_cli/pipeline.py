"""The measurement pipeline: prompts -> rollouts (inference engine) -> rescoring
(transformers) -> run directory. `run_measure` is what `mismatch measure`, `demo` and
`sweep-threshold --validate` call; it reports to a `Progress` callback and never prints.

Work is done in chunks of prompts. Each chunk's rollouts and token rows are written as
Parquet parts the moment they exist, so an interrupted run loses at most one chunk and
`--resume` continues where it stopped. The final tables appear (atomically) only when every
chunk is done, and only then does run.json say `complete`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import MeasureConfig, parse_size
from .errors import MismatchError
from .prompts import encode_prompts, load_prompts
from .runs import RunDir, RunMeta, check_writable_dir, new_meta, now, token_frame
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
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
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


_SEQUENCE_STATIC = ("seq_id", "prompt_id", "sample_idx", "prompt_token_ids", "response_token_ids",
                    "finish_reason", "text")  # fmt: skip


class Progress:
    """Callbacks the pipeline reports to (`progress.progress` draws bars or log lines from
    them); this base class ignores everything."""

    def start(self, phase: str, total: int, done: int = 0) -> None: ...
    def advance(self, phase: str, n: int) -> None: ...
    def log(self, message: str) -> None: ...


def run_measure(
    cfg: MeasureConfig,
    out: Path | None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    on_ready: Callable[[Path], None] | None = None,
) -> Path:
    """Run (or resume) a measurement and return the complete run directory."""
    from .models import hardware, load_tokenizer, pick_device, resolve_model, weights_hash

    prog = progress or Progress()
    if resume:
        if out is None:
            raise MismatchError("--resume needs --out pointing at the incomplete run")
        # A resumed run keeps its saved settings (prepare_out checks that it is resumable).
        cfg = MeasureConfig.from_dict(RunDir(out).read_meta()["config"])
    cfg.validate()
    if out is not None:  # what --out holds (read only), before anything slow loads
        check_measure_out(out, resume=resume, overwrite=overwrite)
    model_path, model_name = resolve_model(cfg.model, cfg.model_file)
    # Everything a user can get wrong is checked before the output directory is touched;
    # the prompt file before the tokenizer, whose import (transformers) takes seconds.
    prompts = load_prompts(cfg.prompts, cfg.prompt_column)
    tokenizer = load_tokenizer(model_path)
    if cfg.num_prompts is not None:
        prompts = prompts[: cfg.num_prompts]
    prompt_ids = encode_prompts(prompts, tokenizer, cfg.chat_template)
    vocab = len(tokenizer)
    if cfg.top_logprobs > vocab:
        raise MismatchError(f"--top-logprobs {cfg.top_logprobs} exceeds the vocabulary ({vocab})")
    device = pick_device(cfg.device)
    if out is None:
        out = default_out(model_name)
    run = prepare_out(out, resume=resume, overwrite=overwrite)
    if on_ready:
        on_ready(out)

    chunks = [
        list(range(i, min(i + cfg.chunk_prompts, len(prompts))))
        for i in range(0, len(prompts), cfg.chunk_prompts)
    ]

    prompts_sha = hashlib.sha256(json.dumps(prompt_ids).encode()).hexdigest()
    if resume:
        meta = run.read_meta()
        # a resumed run must continue the same work: same prompt tokens, same weights
        if meta.get("prompt_ids_sha256") not in (None, prompts_sha):
            raise MismatchError(
                f"cannot resume {out}: its prompts ({cfg.prompts}) changed since the run started"
            )
        if meta.model.get("weights_sha256") != weights_hash(model_path):
            raise MismatchError(
                f"cannot resume {out}: the model weights changed since the run started"
            )
    else:
        meta = new_meta(
            "measure",
            config=cfg.to_dict(),
            sampling=cfg.sampling(),
            model={
                "name": model_name,
                "path": model_path,
                "weights_sha256": weights_hash(model_path),
                "vocab_size": vocab,
            },
            engines={
                "infer": {"engine": cfg.infer_engine, "dtype": cfg.infer_dtype},
                "train": {
                    "engine": "transformers",
                    "dtype": cfg.train_dtype,
                    "attn_implementation": cfg.attn_implementation,
                },
            },
            num_prompts=len(prompts),
            prompt_ids_sha256=prompts_sha,
            num_chunks=len(chunks),
            hardware=hardware(device),
            timings_s={},
        )
        run.write_meta(meta)
    timings: dict[str, float] = dict(meta.get("timings_s") or {})

    def save_progress(**extra: Any) -> None:
        meta.update(extra)
        meta["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        meta["chunks_done"] = {
            ROLLOUT: sum(run.has_part(ROLLOUT, i) for i in range(len(chunks))),
            TOKENS: sum(run.has_part(TOKENS, i) for i in range(len(chunks))),
        }
        run.write_meta(meta)

    try:
        _phase_generate(
            cfg, run, chunks, prompt_ids, model_path, device, timings, prog, save_progress
        )
        per_position = _phase_rescore(
            cfg, run, chunks, model_path, device, timings, prog, save_progress
        )
        if per_position is not None:
            meta["engines"]["train"]["per_position"] = per_position
        with _timed(timings, "finalize"):
            rollouts = pd.concat(
                [run.read_part(ROLLOUT, i)[list(_SEQUENCE_STATIC)] for i in range(len(chunks))],
                ignore_index=True,
            )
            rollouts["finish_reason"] = rollouts["finish_reason"].astype(str)
            rollouts["text"] = rollouts["text"].astype(str)
            meta["summary"] = run.finalize(len(chunks), rollouts, tokens=TOKENS)
    except BaseException:
        save_progress()  # keep what was computed; the run stays `incomplete`
        raise
    # Only now, with both final tables in place, does the run become complete.
    save_progress(status=STATUS_COMPLETE, completed=now())
    shutil.rmtree(run.parts, ignore_errors=True)
    return out


def _phase_generate(cfg, run, chunks, prompt_ids, model_path, device, timings, prog, save) -> None:
    todo = [i for i in range(len(chunks)) if not run.has_part(ROLLOUT, i)]
    total = len(prompt_ids) * cfg.samples_per_prompt
    done = total - sum(len(chunks[i]) for i in todo) * cfg.samples_per_prompt
    prog.start("generate", total, done)
    if not todo:
        return
    from .rollout import HfEngine, VllmEngine

    with _timed(timings, "engine_start"):
        engine = (
            VllmEngine(model_path, cfg)
            if cfg.infer_engine == "vllm"
            else HfEngine(model_path, cfg, device)
        )
    try:
        for i in todo:
            batch = [(pid, prompt_ids[pid]) for pid in chunks[i]]
            with _timed(timings, "generate"):
                records = engine.generate(batch, lambda n: prog.advance("generate", n))
            first = chunks[i][0] * cfg.samples_per_prompt
            run.write_part(ROLLOUT, i, _rollout_frame(records, first))
            save()
    finally:
        engine.close()


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


def rescore_parts(
    run: RunDir,
    n_parts: int,
    train: TrainSide,
    sampling: Any,
    progress: Progress | None = None,
    timings: dict[str, float] | None = None,
    save: Callable[[], None] = lambda: None,
) -> dict[str, Any] | None:
    """Score the rollout parts 0..n_parts-1 of `run` on the training side and write a token
    part for each one that lacks it (resumable: done parts are skipped). Returns how the
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
    from .config import parse_max_memory
    from .models import load_model
    from .rescore import SeqInput, plan_pass, score_sequences

    prog = progress or Progress()
    timings = {} if timings is None else timings
    todo = [i for i in range(n_parts) if not run.has_part(TOKENS, i)]
    if not todo:
        prog.start("rescore", 1, 1)
        return None
    total = sum(_response_tokens(run.part_path(ROLLOUT, i)) for i in todo)
    prog.start("rescore", total)
    with _timed(timings, "train_load"):
        model, _ = load_model(
            train.model_path, train.dtype, train.device, train.attn_implementation,
            train.device_map, parse_max_memory(train.max_memory),
        )  # fmt: skip
    plan = plan_pass(model, sampling, train.memory, total, lambda m: prog.log(f"warning: {m}"))
    for i in todo:  # one part in memory at a time
        df = run.read_part(ROLLOUT, i)
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
        with _timed(timings, "rescore"):
            scored = score_sequences(
                model,
                seqs,
                sampling,
                train.top_k,
                train.device,
                train.batch_tokens,
                on_batch=lambda n: prog.advance("rescore", n),
                plan=plan,
            )
            tokens = _token_frame(df, scored)
        run.write_part(TOKENS, i, tokens)
        save()
    return plan.record()


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


# ----------------------------------------------------------------------------- rescore a run

INFER_SIDES = ("decode", "vllm-prefill", "hf-prefill")
PREFILL = "prefill"
# Sequences per part when a run records no chunking of its own (imported runs).
_PART_SEQUENCES = 256


@dataclass(frozen=True)
class RescoreOptions:
    """What `mismatch rescore` changes; None keeps RUN's setting.

    Training side: dtype, attention, batch budget (1 = one sequence per pass), device.
    Inference side: `decode` keeps RUN's stored log-probs; `vllm-prefill` / `hf-prefill`
    re-score the stored tokens in one prefill pass (vLLM or transformers) in `infer_dtype`.
    """

    train_dtype: str | None = None
    attn_implementation: str | None = None
    rescore_batch_tokens: int | None = None
    device: str | None = None
    infer_side: str = "decode"
    infer_dtype: str | None = None
    rescore_memory: str | None = None  # the per-position pass's byte budget, e.g. "2GiB"
    model: str | None = None  # load this model instead of RUN's (its folder moved)


def vllm_prefill_refusal(sampling: dict[str, Any]) -> str | None:
    """Why `--infer-side vllm-prefill` cannot reproduce a run's sampling distribution (None
    if it can): vLLM's prompt_logprobs are a raw log-softmax (no temperature, no truncation),
    so they are the run's log-probs only at temperature 1 without top-k / top-p / min-p."""
    t = float(sampling.get("temperature", 1.0))
    top_p = float(sampling.get("top_p", 1.0))
    top_k = int(sampling.get("top_k", -1))
    min_p = float(sampling.get("min_p", 0.0))
    bad = [
        f"{k} {v:g}"
        for k, v, ok in (
            ("temperature", t, t == 1.0),
            ("top_p", top_p, top_p >= 1.0),
            ("top_k", top_k, top_k <= 0),
            ("min_p", min_p, min_p <= 0.0),
        )
        if not ok
    ]
    if not bad:
        return None
    return (
        "--infer-side vllm-prefill needs a run sampled at temperature 1 without truncation: "
        "vLLM's prompt_logprobs are a raw log-softmax of the logits (no temperature, top-k, "
        f"top-p or min-p), not the log-probs of this run's sampling distribution ({', '.join(bad)})"
    )


def _settings(meta: RunMeta, src: Path | None = None) -> dict[str, Any]:
    """RUN's training-side and engine settings (run.json `config`, else `engines`), with
    measure's defaults for what an imported run does not record; a value of the wrong type
    is a one-line error naming run.json (a damaged file)."""
    cfg, train = meta.config, meta.train
    d = MeasureConfig()
    out = {
        "train_dtype": cfg.get("train_dtype") or train.get("dtype") or d.train_dtype,
        "attn_implementation": cfg.get("attn_implementation")
        or train.get("attn_implementation")
        or d.attn_implementation,
        "rescore_batch_tokens": cfg.get("rescore_batch_tokens") or d.rescore_batch_tokens,
        "device": cfg.get("device"),
        "top_logprobs": cfg.get("top_logprobs") or d.top_logprobs,
        "infer_dtype": cfg.get("infer_dtype") or d.infer_dtype,
    }
    for k, v in out.items():
        want = int if k in ("rescore_batch_tokens", "top_logprobs") else str
        if v is not None and (not isinstance(v, want) or isinstance(v, bool)):
            raise MismatchError(
                f"{_meta_file(src)}: {k} holds {v!r:.40}, not a{'n integer' if want is int else ' string'}: "
                "the file is damaged"
            )
    return out


def _meta_file(src: Path | None) -> str:
    from .schema import RUN_JSON

    return str(Path(src) / RUN_JSON) if src is not None else RUN_JSON


def run_sampling(meta: RunMeta, src: Path) -> Any:
    """RUN's sampling settings as a `sampling.Sampling` (replayed when re-scoring); a
    one-line error naming run.json when one is not a number or out of its range."""
    from .sampling import Sampling

    s = meta.sampling
    vals: dict[str, Any] = {}
    for k, default, kind in (("temperature", 1.0, float), ("top_p", 1.0, float),
                             ("top_k", -1, int), ("min_p", 0.0, float)):  # fmt: skip
        v = s.get(k, default)
        if v is None:
            v = default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)):
            raise MismatchError(
                f"{_meta_file(src)}: sampling {k} holds {v!r:.40}, not a number: the file is damaged"
            )
        vals[k] = kind(v)
    try:
        MeasureConfig(**vals).validate()
    except MismatchError as e:
        raise MismatchError(
            f"{_meta_file(src)}: its sampling settings are out of range ({e})"
        ) from None
    return Sampling(vals["temperature"], vals["top_p"], vals["top_k"], vals["min_p"])


def run_model_path(
    meta: RunMeta, src: Path, model: str | None = None, how: str = "pass --model PATH"
) -> str:
    """The model to load to re-score or decode RUN again: `model` (the user's choice, when
    RUN's model folder moved) or the path run.json records; a one-line error naming the
    path and `how` to give another when that folder is gone (never a crash deep inside
    transformers)."""
    from .models import resolve_model

    if model is not None:
        return resolve_model(model)[0]
    path = meta.model_path
    if not path:
        raise MismatchError(
            f"{src} records no model path ({_meta_file(src)}: model.path): {how} of the "
            "model that made it"
        )
    p = Path(path).expanduser()
    if not p.exists() and (p.is_absolute() or path.startswith((".", "~")) or "/" not in path):
        raise MismatchError(
            f"the model folder of {src} is gone: {path} (recorded in {_meta_file(src)}); if it "
            f"moved, {how} (the same weights: they are checked against the run's hash)"
        )
    if p.exists() and not p.is_dir():
        raise MismatchError(f"the model path of {src} is not a folder: {path}; {how}")
    return path


def _weights_check(model_path: str, meta: RunMeta, moved: bool = False) -> dict[str, Any]:
    """RUN's recorded weights_sha256, reused without hashing when no file in the model folder
    was modified after RUN was created; otherwise (or when the folder is not the one RUN
    recorded: `moved`, or RUN has no readable `created`) the folder is hashed again, and a
    changed hash is refused (the rescored numbers would not belong to RUN's model)."""
    from .models import weights_hash

    recorded = meta.model.get("weights_sha256")
    p = Path(model_path)
    if recorded is None or not p.is_dir():
        return {"weights_sha256": recorded, "weights_check": "nothing recorded to check"}
    try:  # run.json's `created` is rounded down to the second: "newer" from the next one
        created = _dt.datetime.fromisoformat(str(meta.get("created"))).timestamp() + 1.0
    except ValueError:
        created = None
    newest = max((f.stat().st_mtime for f in p.iterdir() if f.is_file()), default=0.0)
    if not moved and created is not None and newest < created:
        return {
            "weights_sha256": recorded,
            "weights_check": "not re-hashed: no file in the model folder is newer than RUN",
        }
    if weights_hash(model_path) != recorded:
        where = "are not RUN's" if moved else "changed since the run was measured"
        raise MismatchError(
            f"the weights in {model_path} {where} (sha256 differs); measure again instead of "
            "re-scoring"
        )
    why = "the model moved" if moved else "a file was newer" if created else "no created time"
    return {"weights_sha256": recorded, "weights_check": f"re-hashed ({why}): unchanged"}


def rollout_parts_of(path: Path, meta: RunMeta) -> list[pd.DataFrame]:
    """Rebuild the rollout parts of a complete run from its tables (one row per completion,
    the columns `rescore_parts` reads), split as `measure` split them (chunks of
    `chunk_prompts` prompts, seq_id order) so batches, and so `logp_train`, come out the same.

    Token rows missing from a completion (an imported run's loss mask) become a `loss_mask`;
    their positions are scored as context only, as the first time."""
    from .runs import read_sequences, read_tokens, token_columns

    seqs = read_sequences(path)
    lacks = [c for c in ("seq_id", "prompt_token_ids", "response_token_ids") if c not in seqs]
    if lacks:
        raise MismatchError(
            f"{Path(path) / 'sequences.parquet'} lacks column(s) {', '.join(lacks)}: cannot "
            "rebuild the run's rollouts"
        )
    seqs = seqs.sort_values("seq_id", kind="stable").reset_index(drop=True)
    have = set(token_columns(path))
    extras = [c for c in TOKEN_EXTRA_COLUMNS if c in have]
    topk = [c for c in ("topk_ids_infer", "topk_logp_infer") if c in have]
    tok = read_tokens(path, ["seq_id", "pos", "logp_infer", *topk, *extras])
    lens = seqs["response_token_ids"].map(len).to_numpy()  # [S]
    offsets = np.concatenate([[0], np.cumsum(lens)])  # [S + 1]
    row = np.searchsorted(seqs["seq_id"].to_numpy(), tok["seq_id"].to_numpy())  # [N]
    flat = offsets[row] + tok["pos"].to_numpy()  # [N] index into the concatenated responses
    total = int(offsets[-1])

    def scatter(values: np.ndarray, fill: Any) -> list[np.ndarray]:
        """Token values [N, ...] -> one array per completion [T_i, ...], `fill` where a
        position has no token row."""
        full = np.full((total, *values.shape[1:]), fill, dtype=values.dtype)
        full[flat] = values
        return np.split(full, offsets[1:-1])

    out = seqs[[c for c in _SEQUENCE_STATIC if c in seqs.columns]].copy()
    out["logp_infer"] = scatter(tok["logp_infer"].to_numpy(np.float64), np.nan)
    widths = {len(v) if v is not None else -1 for c in topk for v in tok[c]}
    for c, pad, dtype in (
        ("topk_ids_infer", -1, np.int32),
        ("topk_logp_infer", -np.inf, np.float32),
    ):
        if len(topk) == 2 and len(widths) == 1 and widths != {-1} and len(tok):
            per_seq = scatter(np.stack(tok[c].to_list()).astype(dtype), pad)  # [T_i, K] each
            out[c] = [list(a) for a in per_seq]
        else:  # no (or ragged) inference top-K stored: none, as an import without it
            out[c] = None
    if len(tok) < total:
        out["loss_mask"] = scatter(np.ones(len(tok), dtype=bool), False)
    for c in extras:  # the fill only lands on masked positions, which are dropped again
        v = tok[c].to_numpy()
        fill = {"f": np.nan, "b": False, "O": None}.get(v.dtype.kind, 0)
        out[c] = scatter(v, fill)
    cfg = meta.config
    if cfg.get("chunk_prompts") and "prompt_id" in out.columns:
        part = out["prompt_id"].to_numpy() // int(cfg["chunk_prompts"])
    else:
        part = np.arange(len(out)) // _PART_SEQUENCES
    _, part = np.unique(part, return_inverse=True)  # parts numbered 0..n-1, none empty
    return [out[part == i].reset_index(drop=True) for i in range(int(part.max(initial=-1)) + 1)]


def rescore_run(
    src: Path,
    out: Path,
    opts: RescoreOptions | None = None,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    on_ready: Callable[[Path], None] | None = None,
) -> Path:
    """Re-score the stored rollouts of the complete run `src` into the new run `out`, with
    one or both sides changed (`RescoreOptions`), without generating again. `out` must not
    be `src` (nor hold it, nor lie inside it); an existing run there is replaced only with
    `overwrite`, and only once the new run is complete (`runs.replacing`: it is written
    beside `out`, so a failure or Ctrl-C leaves `out` as it was).

    The training side goes through `rescore_parts`, as in `measure`: with no option it
    reproduces `src`'s logp_train (same model, dtype, attention, batch budget, same parts).
    The inference side keeps `src`'s decode log-probs, or is re-scored by a prefill pass of
    vLLM or transformers; that engine is shut down before the training side loads. run.json
    records `rescored_from` (the source run and what changed)."""
    from .models import hardware, pick_device
    from .runs import check_out, open_run, replacing

    opts = opts or RescoreOptions()
    prog = progress or Progress()
    _, meta = open_run(src, allow_incomplete=False)
    was = _settings(meta, src)
    _check_options(opts)
    s = dict(meta.sampling)  # RUN's sampling settings
    sampling = run_sampling(meta, src)
    if opts.infer_side == "vllm-prefill" and (why := vllm_prefill_refusal(s)):
        raise MismatchError(why)
    model_path = run_model_path(meta, src, opts.model)
    target = {"overwrite": overwrite, "inputs": [("the input run", Path(src))]}
    check_out(out, **target)
    weights = _weights_check(model_path, meta, moved=opts.model is not None)

    now_ = {
        k: getattr(opts, k) if getattr(opts, k) is not None else was[k]
        for k in ("train_dtype", "attn_implementation", "rescore_batch_tokens", "device")
    }
    infer_dtype = opts.infer_dtype or was["infer_dtype"]
    changed = {k: [was[k], v] for k, v in now_.items() if v != was[k]}
    if model_path != meta.model_path:
        changed["model_path"] = [meta.model_path, model_path]
    if opts.infer_side != "decode":
        changed["infer_side"] = ["decode", opts.infer_side]
        changed["infer_dtype"] = [was["infer_dtype"], infer_dtype]
    device = pick_device(now_["device"])
    parts = rollout_parts_of(Path(src), meta)
    if on_ready:
        on_ready(out)
    with replacing(out, **target) as work:  # written beside `out`, renamed when complete
        run = RunDir(work)
        cfg = dict(meta.config)
        cfg.update(now_)
        cfg["rescore_memory"] = opts.rescore_memory
        engines = dict(meta.engines)
        infer = dict(meta.infer)
        if opts.infer_side != "decode":
            engine = "vllm" if opts.infer_side == "vllm-prefill" else "hf"
            infer = {"engine": engine, "mode": PREFILL, "dtype": infer_dtype}
            if engine == "hf":
                infer["attn_implementation"] = was["attn_implementation"]
                cfg["infer_engine"] = "hf"
            cfg["infer_dtype"] = infer_dtype
        engines["infer"] = infer
        engines["train"] = {
            "engine": "transformers",
            "dtype": now_["train_dtype"],
            "attn_implementation": now_["attn_implementation"],
        }
        new = new_meta(
            "rescore",
            config=cfg,
            sampling=meta.get("sampling"),
            model={**meta.model, "path": model_path, "weights_sha256": weights["weights_sha256"]},
            engines=engines,
            num_prompts=meta.get("num_prompts"),
            num_chunks=len(parts),
            hardware=hardware(device),
            rescored_from={
                "run": str(src),
                "created": meta.get("created"),
                "infer_side": opts.infer_side,
                "changed": changed,
                "weights_check": weights["weights_check"],
            },
            timings_s={},
        )
        run.write_meta(new)
        timings: dict[str, float] = {}

        def save(**extra: Any) -> None:
            new.update(extra)
            new["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
            run.write_meta(new)

        if opts.infer_side != "decode":
            parts = _prefill_infer_side(
                parts, opts.infer_side, model_path, cfg, was, infer_dtype, device, sampling,
                timings, prog,
            )  # fmt: skip
        for i, df in enumerate(parts):
            run.write_part(ROLLOUT, i, df)
        train = TrainSide(
            model_path,
            now_["train_dtype"],
            now_["attn_implementation"],
            device,
            int(now_["rescore_batch_tokens"]),
            int(was["top_logprobs"]),
            memory=parse_size(opts.rescore_memory, "--rescore-memory"),
        )
        new["engines"]["train"]["per_position"] = rescore_parts(
            run, len(parts), train, sampling, prog, timings, save
        )
        with _timed(timings, "finalize"):
            static = [c for c in _SEQUENCE_STATIC if c in parts[0].columns] if parts else ["seq_id"]
            seqs = pd.concat([df[static] for df in parts], ignore_index=True) if parts else None
            new["summary"] = run.finalize(len(parts), seqs, tokens=TOKENS)
        save(status=STATUS_COMPLETE, completed=now())
        shutil.rmtree(run.parts, ignore_errors=True)
    return out


def _check_options(opts: RescoreOptions) -> None:
    """One-line errors for impossible `RescoreOptions`, before anything loads."""
    from .config import DTYPES

    for name in ("train_dtype", "infer_dtype"):
        v = getattr(opts, name)
        if v is not None and v not in DTYPES:
            raise MismatchError(f"--{name.replace('_', '-')} must be one of {', '.join(DTYPES)}")
    if opts.infer_side not in INFER_SIDES:
        raise MismatchError(f"--infer-side must be one of {', '.join(INFER_SIDES)}")
    if opts.infer_dtype is not None and opts.infer_side == "decode":
        raise MismatchError(
            "--infer-dtype needs --infer-side vllm-prefill or hf-prefill (decode keeps the "
            "run's stored inference log-probs)"
        )
    if opts.rescore_batch_tokens is not None and opts.rescore_batch_tokens < 1:
        raise MismatchError(f"--rescore-batch-tokens must be >= 1, got {opts.rescore_batch_tokens}")
    parse_size(opts.rescore_memory, "--rescore-memory")
    if opts.attn_implementation is not None:
        from .models import check_attn_implementation

        check_attn_implementation(opts.attn_implementation)


def _prefill_infer_side(
    parts: list[pd.DataFrame],
    side: str,
    model_path: str,
    cfg: dict[str, Any],
    was: dict[str, Any],
    infer_dtype: str,
    device: Any,
    sampling: Any,
    timings: dict[str, float],
    prog: Progress,
) -> list[pd.DataFrame]:
    """Replace the inference side of every part by a prefill pass over its stored tokens:
    vLLM (`prompt_logprobs`) or transformers (`score_sequences`, whose training-side output
    becomes the inference side), in `infer_dtype`. The engine is closed before returning."""
    K = int(was["top_logprobs"])
    seqs = [
        (list(r.prompt_token_ids), list(r.response_token_ids))
        for df in parts
        for r in df.itertuples(index=False)
    ]
    prog.start(PREFILL, len(seqs))
    if side == "vllm-prefill":
        from .rollout import VllmEngine

        mc = MeasureConfig.from_dict({**cfg, "infer_dtype": infer_dtype, "top_logprobs": K})
        with _timed(timings, "engine_start"):
            engine = VllmEngine(model_path, mc)
        try:
            with _timed(timings, PREFILL):
                rows = engine.prefill_logprobs(seqs, lambda n: prog.advance(PREFILL, n))
        finally:
            engine.close()
    else:
        import gc

        from .models import load_model
        from .rescore import SeqInput, score_sequences

        with _timed(timings, "engine_start"):
            model, _ = load_model(model_path, infer_dtype, device, was["attn_implementation"])
        rows = []
        with _timed(timings, PREFILL):
            # part by part, so batches are those of the training side (batch shape changes
            # the numerics); the run's sampling settings replayed as on the training side
            # (transformers can, unlike vLLM's prefill); RUN's attention and batch budget
            for df in parts:
                inputs = [
                    SeqInput(r.prompt_token_ids, r.response_token_ids,
                             np.zeros((len(r.response_token_ids), 0), np.int32),
                             np.zeros((len(r.response_token_ids), 0), np.float32),
                             np.zeros(len(r.response_token_ids)))
                    for r in df.itertuples(index=False)
                ]  # fmt: skip
                scored = score_sequences(
                    model, inputs, sampling, K, device, int(was["rescore_batch_tokens"])
                )
                rows += [
                    (s["logp_train"].astype(np.float64), s["topk_ids_train"], s["topk_logp_train"])
                    for s in scored
                ]
                prog.advance(PREFILL, len(df))
        del model
        gc.collect()
    out, k = [], 0
    for df in parts:
        df = df.copy()
        n = len(df)
        mine = rows[k : k + n]
        k += n
        df["logp_infer"] = [r[0] for r in mine]
        df["topk_ids_infer"] = [list(np.asarray(r[1], np.int32)) for r in mine]
        df["topk_logp_infer"] = [list(np.asarray(r[2], np.float32)) for r in mine]
        out.append(df)
    return out


# ----------------------------------------------------------------------------- decode again

DECODE_REPEAT = "decode-repeat"


def decode_repeat(src: Path, out: Path, *, progress: Progress | None = None) -> Path:
    """Decode RUN's prompts again with vLLM, same settings and seeds, chunk by chunk as
    `measure` submitted them, and write a run over the completions whose tokens came out
    identical: `logp_infer` from the second decode, `logp_train` from the first (RUN's
    `logp_infer`). Its delta is the engine's run-to-run noise (vLLM forms batches by timing,
    and batch shape changes the numerics). eps_hat and the distribution-level columns use
    the ids in both decodes' top-K (`rescore.topk_pair_stats`).

    Raises MismatchError if RUN was not decoded by vLLM or no completion came out identical."""
    import torch

    from .models import hardware, pick_device
    from .rescore import topk_pair_stats
    from .rollout import VllmEngine
    from .runs import open_run, read_sequences, read_tokens, token_frame, write_run

    prog = progress or Progress()
    _, meta = open_run(src, allow_incomplete=False)
    cfg = MeasureConfig.from_dict(meta.config)
    if cfg.infer_engine != "vllm" or meta.infer.get("mode"):
        raise MismatchError(f"{src} was not decoded by vLLM: nothing to decode again")
    model_path = run_model_path(meta, src)
    from .runs import check_out

    check_out(out)  # a new directory: nothing there is replaced
    seqs = read_sequences(src).sort_values("seq_id", kind="stable").reset_index(drop=True)
    first = seqs.drop_duplicates("prompt_id")
    prompts = list(zip(first["prompt_id"].astype(int), first["prompt_token_ids"], strict=True))
    prompts = [(pid, np.asarray(ids).tolist()) for pid, ids in prompts]
    cp = cfg.chunk_prompts
    chunks: dict[int, list[tuple[int, list[int]]]] = {}
    for pid, ids in prompts:  # the chunks `measure` submitted (prompt_id // chunk_prompts)
        chunks.setdefault(pid // cp, []).append((pid, ids))
    timings: dict[str, float] = {}
    prog.start("generate", len(seqs))
    with _timed(timings, "engine_start"):
        engine = VllmEngine(model_path, cfg)
    try:
        records: list[dict[str, Any]] = []
        with _timed(timings, "generate"):
            for c in sorted(chunks):
                records += engine.generate(chunks[c], lambda n: prog.advance("generate", n))
    finally:
        engine.close()
    again = pd.DataFrame(records)[
        ["prompt_id", "sample_idx", "response_token_ids", "logp_infer", "topk_ids_infer",
         "topk_logp_infer"]
    ]  # fmt: skip
    again = again.rename(columns=lambda c: c if c in ("prompt_id", "sample_idx") else f"{c}_2")
    j = seqs.merge(again, on=["prompt_id", "sample_idx"])
    same = np.array(
        [
            np.array_equal(a, b)
            for a, b in zip(j["response_token_ids"], j["response_token_ids_2"], strict=True)
        ]
    )  # [S] one comparison per completion
    j = j[same & (j["response_token_ids"].map(len) > 0)].reset_index(drop=True)
    if not len(j):
        raise MismatchError(
            f"no completion of {len(seqs):,} came out identical when decoded again "
            "(the noise changed every sampled sequence): nothing to compare token by token"
        )
    tok = read_tokens(src)
    tok = tok[tok["seq_id"].isin(j["seq_id"])].sort_values(["seq_id", "pos"], kind="stable")
    tok = tok.reset_index(drop=True)
    lens = j["response_token_ids"].map(len).to_numpy()
    if len(tok) != int(lens.sum()):
        raise MismatchError(f"{src} lacks token rows of some completions: cannot decode it again")
    lq2 = np.concatenate(j["logp_infer_2"].to_list())  # [N] second decode, seq_id order
    ids2 = np.concatenate([np.stack(v) for v in j["topk_ids_infer_2"]]).astype(np.int64)
    top2 = np.concatenate([np.stack(v) for v in j["topk_logp_infer_2"]]).astype(np.float32)
    ids1 = np.stack(tok["topk_ids_infer"].to_list()).astype(np.int64)  # [N, K]
    top1 = np.stack(tok["topk_logp_infer"].to_list()).astype(np.float32)
    lq1 = tok["logp_infer"].to_numpy(np.float64)
    t = torch.tensor  # copies: arrays read from Parquet are not writable
    st = topk_pair_stats(
        t(tok["token_id"].to_numpy(np.int64)), t(ids2), t(top2), t(lq2), t(ids1), t(top1), t(lq1)
    )
    cols = {
        c: tok[c].to_numpy()
        for c in ("seq_id", "prompt_id", "sample_idx", "pos", "token_id")
        if c in tok.columns
    }
    tokens = token_frame(
        {
            **cols,
            "logp_infer": lq2,
            "logp_train": lq1,
            **{k: v.numpy() for k, v in st.items()},
            "topk_ids_infer": list(ids2.astype(np.int32)),
            "topk_logp_infer": list(top2),
            "topk_ids_train": list(ids1.astype(np.int32)),
            "topk_logp_train": list(top1),
        }
    )
    static = [c for c in _SEQUENCE_STATIC if c in seqs.columns]
    new = new_meta(
        DECODE_REPEAT,
        config=cfg.to_dict(),
        sampling=meta.get("sampling"),
        model=meta.get("model"),
        engines={
            "infer": {"engine": "vllm", "mode": "decode, second run", "dtype": cfg.infer_dtype},
            "train": {"engine": "vllm", "mode": "decode, first run", "dtype": cfg.infer_dtype},
        },
        num_prompts=meta.get("num_prompts"),
        hardware=hardware(pick_device(cfg.device)),
        decode_repeat={
            "run": str(src),
            "num_sequences": len(seqs),
            "num_identical": len(j),
            "note": "logp_train is the first decode's logp_infer; only completions whose "
            "tokens came out identical are kept",
        },
        timings_s={k: round(v, 3) for k, v in timings.items()},
    )
    return write_run(out, tokens, j[static], new)
