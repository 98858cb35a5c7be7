"""Re-scoring a stored run: `rescore_run` (what `mismatch rescore` and diagnose's variants
call: one side of RUN's stored rollouts scored again with one or two settings changed) and
`decode_repeat` (vLLM decoding RUN's prompts again with the same seeds). Built on the
measurement pipeline's parts (`pipeline.rescore_parts`, `TrainSide`, `Progress`); writes a
new run directory through `runs.check_out` staging, never touching RUN.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .config import MeasureConfig, parse_size
from .errors import MismatchError
from .pipeline import ROLLOUT, SEQUENCE_STATIC, TOKENS, Progress, TrainSide, rescore_parts, timed
from .runs import RunDir, RunMeta, new_meta, now, token_frame
from .schema import STATUS_COMPLETE, TOKEN_EXTRA_COLUMNS

if TYPE_CHECKING:
    from .cluster import RayOptions

INFER_SIDES = ("decode", "vllm-prefill", "hf-prefill", "vllm-decode")
VLLM_DECODE = "vllm-decode"
PREFILL = "prefill"
# Sequences per part when a run records no chunking of its own (imported runs).
_PART_SEQUENCES = 256


@dataclass(frozen=True)
class RescoreOptions:
    """What `mismatch rescore` changes; None keeps RUN's setting.

    Training side: dtype, attention, batch budget (1 = one sequence per pass), device.
    Inference side: `decode` keeps RUN's stored log-probs; `vllm-prefill` / `hf-prefill`
    re-score the stored tokens in one prefill pass (vLLM or transformers) in `infer_dtype`.
    The training side alone may also run in float64 (`TRAIN_DTYPES`: a precise reference);
    `sequences` keeps only RUN's first N sequences (a reference on a subset).
    """

    train_dtype: str | None = None
    attn_implementation: str | None = None
    rescore_batch_tokens: int | None = None
    device: str | None = None
    infer_side: str = "decode"
    infer_dtype: str | None = None
    rescore_memory: str | None = None  # the per-position pass's byte budget, e.g. "2GiB"
    model: str | None = None  # load this model instead of RUN's (its folder moved)
    sequences: int | None = None  # score only RUN's first N sequences (seq_id order)
    # the training side's numerics (`rescore.TrainNumerics`; None: RUN's, the defaults)
    lm_head_fp32: bool | None = None
    logsoftmax_dtype: str | None = None
    layout: str | None = None
    tf32: bool | None = None
    batch_invariant: bool | None = None
    # the vLLM prefill engine's settings changed from RUN's (`EngineChange`)
    engine: EngineChange | None = None

    def numerics(self) -> Any:
        """The training side's `rescore.TrainNumerics` these options ask for."""
        from .rescore import TrainNumerics

        d = TrainNumerics()
        return TrainNumerics(
            head_fp32=bool(self.lm_head_fp32),
            logsoftmax_dtype=self.logsoftmax_dtype or d.logsoftmax_dtype,
            layout=self.layout or d.layout,
            tf32=bool(self.tf32),
            batch_invariant=bool(self.batch_invariant),
        )


@dataclass(frozen=True)
class EngineChange:
    """What an inference-side variant changes in vLLM, relative to RUN's engine: `config`
    (MeasureConfig fields: infer_dtype, enforce_eager, kv_cache_dtype,
    tensor_parallel_size), extra `engine_args` (vLLM `EngineArgs` fields: max_num_seqs,
    enable_chunked_prefill, max_num_batched_tokens, enable_prefix_caching,
    attention_backend, quantization) and `env` (environment variables of the engine
    processes, e.g. VLLM_BATCH_INVARIANT=1)."""

    config: Mapping[str, Any] = field(default_factory=dict)
    engine_args: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)

    def apply(self, cfg: MeasureConfig) -> MeasureConfig:
        """RUN's MeasureConfig with this change: fields replaced, engine arguments merged."""
        return replace(cfg, **dict(self.config), engine_args={**cfg.engine_args,
                                                               **self.engine_args})  # fmt: skip

    def record(self) -> dict[str, Any]:
        """What run.json keeps of it (`rescored_from.engine`, `decode_variant.engine`)."""
        return {"config": dict(self.config), "engine_args": dict(self.engine_args),
                "env": dict(self.env)}  # fmt: skip


@contextmanager
def engine_env(env: Mapping[str, str]) -> Iterator[None]:
    """Set `env` while a vLLM engine starts (its processes inherit it), then restore the
    previous values; vLLM's cache of environment variables is cleared before and after."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _clear_vllm_env_cache(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _clear_vllm_env_cache(env)


def _clear_vllm_env_cache(env: Mapping[str, str]) -> None:
    """vLLM caches its environment variables once an engine ran in the process
    (`vllm.envs.enable_envs_cache`): clear it so a changed variable is read again."""
    if not env:
        return
    import vllm.envs as venvs

    if getattr(venvs, "_is_envs_cache_enabled", lambda: False)():
        venvs.disable_envs_cache()


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

    out = seqs[[c for c in SEQUENCE_STATIC if c in seqs.columns]].copy()
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
    ray: RayOptions | None = None,
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
    records `rescored_from` (the source run and what changed).

    `ray` spreads the training side over a Ray cluster (`cluster.score_on_ray`: the same
    parts scored by the same code, so the same tokens); the run is then written in
    `runs.staging_path(out)`, kept when the job fails, and `ray.resume` continues it there
    (finished token parts are never scored again). run.json's `ray` key records the
    workers, their devices and the shard plan."""
    from contextlib import ExitStack

    from .models import hardware, pick_device
    from .runs import check_out, open_run, replacing, staging_path

    opts = opts or RescoreOptions()
    prog = progress or Progress()
    _, meta = open_run(src, allow_incomplete=False)
    was = _settings(meta, src)
    _check_options(opts)
    if ray is not None:
        ray.check()
        if opts.device is not None:
            raise MismatchError(
                "--device is not used with --ray: each worker takes its GPUs from Ray "
                "(--gpus-per-worker; 0 for CPU workers)"
            )
        if opts.infer_side != "decode":
            raise MismatchError("--ray spreads the training side only: use --infer-side decode")
    s = dict(meta.sampling)  # RUN's sampling settings
    sampling = run_sampling(meta, src)
    if opts.infer_side == "vllm-prefill" and (why := vllm_prefill_refusal(s)):
        raise MismatchError(why)
    if opts.infer_side == VLLM_DECODE:
        _check_decode_change(meta, src, opts)
    model_path = run_model_path(meta, src, opts.model)
    target = {"overwrite": overwrite, "inputs": [("the input run", Path(src))]}
    check_out(out, **target)
    keep = staging_path(out) if ray is not None else None
    if keep is not None:
        _check_staging(keep, src, out, resume=ray.resume, overwrite=overwrite)
    weights = _weights_check(model_path, meta, moved=opts.model is not None)
    parts = rollout_parts_of(Path(src), meta)
    stack = ExitStack()  # the Ray connection, if any: closed when the job ends
    cluster = None
    if ray is not None:
        from .cluster import connect, worker_shape

        cluster = stack.enter_context(connect(ray))
    with stack:
        if cluster is not None:
            _, gpus = worker_shape(ray, cluster.resources)
            opts = RescoreOptions(**{**opts.__dict__, "device": "cuda" if gpus > 0 else "cpu"})
        now_ = {
            k: getattr(opts, k) if getattr(opts, k) is not None else was[k]
            for k in ("train_dtype", "attn_implementation", "rescore_batch_tokens", "device")
        }
        # an engine change may set the engine's dtype (decode-fp16, decode-fp32): record it
        engine_dtype = opts.engine.config.get("infer_dtype") if opts.engine is not None else None
        infer_dtype = opts.infer_dtype or engine_dtype or was["infer_dtype"]
        changed = {k: [was[k], v] for k, v in now_.items() if v != was[k]}
        if model_path != meta.model_path:
            changed["model_path"] = [meta.model_path, model_path]
        if opts.infer_side != "decode":
            changed["infer_side"] = ["decode", opts.infer_side]
            changed["infer_dtype"] = [was["infer_dtype"], infer_dtype]
        numerics = opts.numerics()
        for k, v in numerics.record().items():
            changed[f"train_{k}"] = [getattr(type(numerics)(), k), v]
        if opts.engine is not None:
            changed["engine"] = [None, opts.engine.record()]
        if opts.sequences is not None:
            parts = first_sequences(parts, opts.sequences)
            changed["sequences"] = [None, opts.sequences]
        if keep is not None and ray.resume:
            _check_resumed(keep, out, changed)
        device = pick_device(now_["device"]) if ray is None else now_["device"]
        if on_ready:
            on_ready(out)
        # written beside `out` (in `keep` with --ray), renamed when complete
        with replacing(out, keep=keep, **target) as work:
            run = RunDir(work)
            cfg = dict(meta.config)
            cfg.update(now_)
            cfg["rescore_memory"] = opts.rescore_memory
            engines = dict(meta.engines)
            infer = dict(meta.infer)
            if opts.infer_side == VLLM_DECODE:
                infer = {**infer, "engine": "vllm", "dtype": infer_dtype}
                cfg["infer_dtype"] = infer_dtype
            elif opts.infer_side != "decode":
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
            if numerics.record():
                engines["train"]["numerics"] = numerics.record()
            if opts.engine is not None:
                engines["infer"] = {**engines["infer"], **opts.engine.record()}
            new = new_meta(
                "rescore",
                config=cfg,
                sampling=meta.get("sampling"),
                model={
                    **meta.model,
                    "path": model_path,
                    "weights_sha256": weights["weights_sha256"],
                },
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

            if opts.infer_side == VLLM_DECODE:
                parts, kept = _decode_infer_side(
                    parts, model_path, cfg, infer_dtype, opts.engine, timings, prog
                )
                new["rescored_from"]["decoded_again"] = kept
                new["num_chunks"] = len(parts)
            elif opts.infer_side != "decode":
                parts = _prefill_infer_side(
                    parts, opts.infer_side, model_path, cfg, was, infer_dtype, device, sampling,
                    timings, prog, opts.engine,
                )  # fmt: skip
            for i, df in enumerate(parts):
                if not run.has_part(ROLLOUT, i):  # a resumed --ray run has them already
                    run.write_part(ROLLOUT, i, df)
            train = TrainSide(
                model_path,
                now_["train_dtype"],
                now_["attn_implementation"],
                device,
                int(now_["rescore_batch_tokens"]),
                int(was["top_logprobs"]),
                memory=parse_size(opts.rescore_memory, "--rescore-memory"),
                numerics=numerics,
            )
            if cluster is None:
                per_position = rescore_parts(run, len(parts), train, sampling, prog, timings, save)
            else:
                from .cluster import score_on_ray

                per_position, _ = score_on_ray(
                    run, len(parts), train, sampling, cluster, ray, prog, timings, save
                )
            new["engines"]["train"]["per_position"] = per_position
            with timed(timings, "finalize"):
                static = (
                    [c for c in SEQUENCE_STATIC if c in parts[0].columns] if parts else ["seq_id"]
                )
                seqs = pd.concat([df[static] for df in parts], ignore_index=True) if parts else None
                new["summary"] = run.finalize(len(parts), seqs, tokens=TOKENS)
            save(status=STATUS_COMPLETE, completed=now())
            shutil.rmtree(run.parts, ignore_errors=True)
        return out


def _check_staging(keep: Path, src: Path, out: Path, *, resume: bool, overwrite: bool) -> None:
    """What a `--ray` rescore finds in its staging directory `keep` (`runs.staging_path`):
    nothing (a new job; `--resume` has nothing to continue), or an unfinished job of the same
    RUN, continued with `--resume`, discarded with `--overwrite`, else refused in one line."""
    from .runs import RunDir

    if not keep.exists():
        if resume:
            raise MismatchError(
                f"nothing to resume: no unfinished `rescore --ray` of {out} ({keep} does not exist)"
            )
        return
    if resume:
        try:
            was = RunDir(keep).read_meta().get("rescored_from") or {}
        except MismatchError:
            was = {}
        if was.get("run") != str(src):
            raise MismatchError(
                f"cannot resume {out}: {keep} is not an unfinished rescore of {src}; remove it "
                "or pass --overwrite"
            )
        return
    if overwrite:
        shutil.rmtree(keep)
        return
    raise MismatchError(
        f"an unfinished `rescore --ray` of {out} is in {keep}: pass --resume to continue it, "
        "or --overwrite to start again"
    )


def _check_resumed(keep: Path, out: Path, changed: dict[str, Any]) -> None:
    """A resumed `--ray` job must continue the same work: the same settings changed."""
    from .runs import RunDir

    was = (RunDir(keep).read_meta().get("rescored_from") or {}).get("changed")
    if was != changed:
        raise MismatchError(
            f"cannot resume {out}: it was started with other settings ({was} changed, now "
            f"{changed}); pass --overwrite to start again"
        )


def first_sequences(parts: list[pd.DataFrame], n: int) -> list[pd.DataFrame]:
    """The rollout parts cut to their first `n` sequences (parts in seq_id order)."""
    out, left = [], n
    for df in parts:
        if left <= 0:
            break
        out.append(df.iloc[:left].reset_index(drop=True))
        left -= len(out[-1])
    return out


def _check_options(opts: RescoreOptions) -> None:
    """One-line errors for impossible `RescoreOptions`, before anything loads."""
    from .config import DTYPES, TRAIN_DTYPES

    for name, allowed in (("train_dtype", TRAIN_DTYPES), ("infer_dtype", DTYPES)):
        v = getattr(opts, name)
        if v is not None and v not in allowed:
            raise MismatchError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}")
    if opts.sequences is not None and opts.sequences < 1:
        raise MismatchError(f"--sequences must be >= 1, got {opts.sequences}")
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
    from .rescore import LAYOUTS

    if opts.layout is not None and opts.layout not in LAYOUTS:
        raise MismatchError(f"layout must be one of {', '.join(LAYOUTS)}, got {opts.layout!r}")
    if opts.logsoftmax_dtype is not None and opts.logsoftmax_dtype not in DTYPES:
        raise MismatchError(f"logsoftmax_dtype must be one of {', '.join(DTYPES)}")
    if opts.engine is not None and opts.infer_side not in ("vllm-prefill", VLLM_DECODE):
        raise MismatchError("an engine change needs a vLLM inference side (prefill or decode)")
    if opts.attn_implementation is not None:
        from .models import check_attn_implementation

        check_attn_implementation(opts.attn_implementation)


def _check_decode_change(meta: RunMeta, src: Path, opts: RescoreOptions) -> None:
    """`vllm-decode` decodes RUN's prompts again: RUN must have been decoded by vLLM, and
    the change must change something (else the row would be decode-repeat's)."""
    cfg = MeasureConfig.from_dict(meta.config)
    if cfg.infer_engine != "vllm" or meta.infer.get("mode"):
        raise MismatchError(f"{src} was not decoded by vLLM: nothing to decode again")
    change = opts.engine or EngineChange()
    now_ = change.apply(replace(cfg, infer_dtype=opts.infer_dtype or cfg.infer_dtype))
    same = [
        f"{k} {getattr(cfg, k)!r}" for k in change.config if getattr(now_, k) == getattr(cfg, k)
    ] + [f"{k} {v!r}" for k, v in change.engine_args.items() if cfg.engine_args.get(k) == v]
    same += [f"{k}={v}" for k, v in change.env.items() if os.environ.get(k) == v]
    if same:
        raise MismatchError(
            f"the baseline already runs with {', '.join(same)}: decoding again with it would "
            "change nothing (decode-repeat measures that)"
        )


def _decode_infer_side(
    parts: list[pd.DataFrame],
    model_path: str,
    cfg: dict[str, Any],
    infer_dtype: str,
    change: EngineChange | None,
    timings: dict[str, float],
    prog: Progress,
) -> tuple[list[pd.DataFrame], dict[str, int]]:
    """Decode every part's prompts again with vLLM, RUN's sampling and seeds, the engine
    changed by `change`, part by part as `measure` submitted them; keep the completions
    whose tokens came out identical (a token sampled differently makes the rest of a
    sequence incomparable), their inference side replaced by the new decode's log-probs
    and top-K. Returns the kept parts (empty ones dropped) and {num_sequences,
    num_identical}. Raises MismatchError when no completion came out identical."""
    from .rollout import VllmEngine

    change = change or EngineChange()
    mc = change.apply(MeasureConfig.from_dict({**cfg, "infer_dtype": infer_dtype}))
    total = sum(len(df) for df in parts)
    prog.start("generate", total)
    with timed(timings, "engine_start"), engine_env(change.env):
        engine = VllmEngine(model_path, mc)
    kept: list[pd.DataFrame] = []
    try:
        with timed(timings, "generate"):
            for df in parts:
                first = df.drop_duplicates("prompt_id")
                prompts = [(int(p), np.asarray(ids).tolist())
                           for p, ids in zip(first["prompt_id"], first["prompt_token_ids"],
                                             strict=True)]  # fmt: skip
                recs = engine.generate(prompts, lambda n: prog.advance("generate", n))
                again = pd.DataFrame(recs)[
                    ["prompt_id", "sample_idx", "response_token_ids", "logp_infer",
                     "topk_ids_infer", "topk_logp_infer"]
                ].rename(columns=lambda c: c if c in ("prompt_id", "sample_idx") else f"{c}_2")  # fmt: skip
                j = df.merge(again, on=["prompt_id", "sample_idx"], how="left")
                same = np.array([
                    isinstance(b, (list, np.ndarray)) and len(a) > 0 and np.array_equal(a, b)
                    for a, b in zip(j["response_token_ids"], j["response_token_ids_2"],
                                    strict=True)
                ], dtype=bool)  # fmt: skip
                j = j[same].reset_index(drop=True)
                for c in ("logp_infer", "topk_ids_infer", "topk_logp_infer"):
                    j[c] = j.pop(f"{c}_2")
                j = j.drop(columns=["response_token_ids_2"])
                if len(j):
                    kept.append(j[list(df.columns)])
    finally:
        engine.close()
    n = sum(len(df) for df in kept)
    if not n:
        raise MismatchError(
            f"no completion of {total:,} came out identical when decoded again with "
            f"{_change_text(change)}: nothing to compare on the same tokens"
        )
    return kept, {"num_sequences": total, "num_identical": n}


def _change_text(change: EngineChange) -> str:
    """An engine change in words: `k=v` for each setting, comma separated."""
    items = {**change.config, **change.engine_args, **change.env}
    return ", ".join(f"{k}={v}" for k, v in items.items()) or "no change"


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
    change: EngineChange | None = None,
) -> list[pd.DataFrame]:
    """Replace the inference side of every part by a prefill pass over its stored tokens:
    vLLM (`prompt_logprobs`, its engine changed by `change`) or transformers
    (`score_sequences`, whose training-side output becomes the inference side), in
    `infer_dtype`. The engine is closed before returning."""
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
        change = change or EngineChange()
        mc = change.apply(mc)
        with timed(timings, "engine_start"), engine_env(change.env):
            engine = VllmEngine(model_path, mc)
        try:
            with timed(timings, PREFILL):
                rows = engine.prefill_logprobs(seqs, lambda n: prog.advance(PREFILL, n))
        finally:
            engine.close()
    else:
        import gc

        from .models import load_model
        from .rescore import SeqInput, score_sequences

        with timed(timings, "engine_start"):
            model, _ = load_model(model_path, infer_dtype, device, was["attn_implementation"])
        rows = []
        with timed(timings, PREFILL):
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
    from .runs import open_run, read_sequences, read_tokens, write_run

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
    with timed(timings, "engine_start"):
        engine = VllmEngine(model_path, cfg)
    try:
        records: list[dict[str, Any]] = []
        with timed(timings, "generate"):
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
    static = [c for c in SEQUENCE_STATIC if c in seqs.columns]
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
