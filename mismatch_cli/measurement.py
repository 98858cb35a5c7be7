"""`run_measure`: a whole measurement, prompts to a complete run directory (what `mismatch
measure`, `demo`, `diagnose`'s baseline and `sweep-threshold --validate` call). It plans the
chunks (`pipeline.plan_prompt_shards`, `plan_chunks`), runs the generate phase in this
process (`pipeline._phase_generate`) or, with `--data-parallel N`, on N vLLM engines as Ray
actors (`cluster.generate_on_ray`), then the rescore phase, and finalizes. It sits above
both `pipeline` and `cluster` (which imports `pipeline`), so neither imports the other back.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from .config import MeasureConfig
from .errors import MismatchError
from .pipeline import (
    ROLLOUT,
    SEQUENCE_STATIC,
    TOKENS,
    Progress,
    _phase_generate,
    _phase_rescore,
    check_measure_out,
    default_out,
    plan_chunks,
    plan_prompt_shards,
    prepare_out,
    timed,
)
from .prompts import encode_prompts, load_prompts
from .runs import RunDir, new_meta, now
from .schema import STATUS_COMPLETE


def run_measure(
    cfg: MeasureConfig,
    out: Path | None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    on_ready: Callable[[Path], None] | None = None,
    ray_address: str | None = None,
) -> Path:
    """Run (or resume) a measurement and return the complete run directory. With
    `cfg.data_parallel` N > 1 the generation runs on N vLLM engines, Ray actors over
    contiguous shards of the prompts (`cluster.generate_on_ray`), on the Ray cluster at
    `ray_address` (None: a local Ray on every core); the chunks, parts and seeds are those
    of one process, so the rollouts do not depend on N beyond each chunk's prompts."""
    from .models import hardware, load_tokenizer, pick_device, resolve_model, weights_hash

    prog = progress or Progress()
    if resume:
        if out is None:
            raise MismatchError("--resume needs --out pointing at the incomplete run")
        # A resumed run keeps its saved settings (prepare_out checks that it is resumable).
        cfg = MeasureConfig.from_dict(RunDir(out).read_meta()["config"])
    cfg.validate()
    if ray_address is not None and cfg.data_parallel == 1:
        raise MismatchError("--ray-address needs --data-parallel N with N > 1")
    if cfg.data_parallel > 1:  # Ray missing is one line before anything slow loads
        from .cluster import import_ray

        import_ray("--data-parallel")
    if out is not None:  # what --out holds (read only), before anything slow loads
        check_measure_out(out, resume=resume, overwrite=overwrite)
    model_path, model_name = resolve_model(cfg.model, cfg.model_file)
    # Everything a user can get wrong is checked before the output directory is touched;
    # the prompt file before the tokenizer, whose import (transformers) takes seconds.
    prompts = load_prompts(cfg.prompts, cfg.prompt_column)
    tokenizer = load_tokenizer(model_path)
    if cfg.num_prompts is not None:
        prompts = prompts[: cfg.num_prompts]
    if cfg.data_parallel > len(prompts):
        raise MismatchError(
            f"--data-parallel {cfg.data_parallel} exceeds the number of prompts ({len(prompts)}): "
            "each engine needs at least one"
        )
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

    costs = [len(ids) + cfg.samples_per_prompt * cfg.max_tokens for ids in prompt_ids]
    shards = plan_prompt_shards(costs, cfg.data_parallel)
    chunks = plan_chunks(shards, cfg.chunk_prompts)

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
        if cfg.data_parallel > 1:
            from .cluster import generate_on_ray

            generate_on_ray(
                run, cfg, model_path, prompt_ids, shards, chunks, ray_address, prog, timings,
                save_progress,
            )  # fmt: skip
        else:
            _phase_generate(
                cfg, run, chunks, prompt_ids, model_path, device, timings, prog, save_progress
            )
        per_position = _phase_rescore(
            cfg, run, chunks, model_path, device, timings, prog, save_progress
        )
        if per_position is not None:
            meta["engines"]["train"]["per_position"] = per_position
        with timed(timings, "finalize"):
            rollouts = pd.concat(
                [run.read_part(ROLLOUT, i)[list(SEQUENCE_STATIC)] for i in range(len(chunks))],
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


__all__ = ["run_measure"]
