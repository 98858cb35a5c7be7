"""`mismatch rescore`: re-score a run's stored rollouts with other settings on one side."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from ..options import (
    PANEL_ENGINE,
    PANEL_OUTPUT,
    PANEL_TRAINING,
    GpusPerWorkerOpt,
    JsonOpt,
    RayAddressOpt,
    RayOpt,
    RayResumeOpt,
    RescoreMemoryOpt,
    RunArg,
    WorkersOpt,
    ray_options,
)


class InferSide(str, enum.Enum):
    """Where the inference-side log-probs of the new run come from."""

    decode = "decode"
    vllm_prefill = "vllm-prefill"
    hf_prefill = "hf-prefill"


def rescore(
    run: RunArg,
    out: Annotated[
        Path,
        typer.Option(
            help="The new run directory: not RUN, not inside it; an existing run there is "
            "refused unless --overwrite.",
            rich_help_panel=PANEL_OUTPUT,
            show_default=False,
        ),
    ],
    train_dtype: Annotated[
        str | None,
        typer.Option(
            help="Training-side dtype: float32, bfloat16, float16, or float64 (a precise "
            "reference: the forward pass in float64, the log-softmax in float32) "
            "(default: RUN's).",
            rich_help_panel=PANEL_TRAINING,
            show_default=False,
        ),
    ] = None,
    attn_implementation: Annotated[
        str | None,
        typer.Option(
            help="Training-side transformers attention: eager, sdpa, ... (default: RUN's).",
            rich_help_panel=PANEL_TRAINING,
            show_default=False,
        ),
    ] = None,
    rescore_batch_tokens: Annotated[
        int | None,
        typer.Option(
            help="Padded tokens per training-side forward pass (default: RUN's); 1 scores one "
            "sequence per pass (the batch-shape experiment).",
            rich_help_panel=PANEL_TRAINING,
            show_default=False,
        ),
    ] = None,
    rescore_memory: RescoreMemoryOpt = None,
    sequences: Annotated[
        int | None,
        typer.Option(
            help="Score only RUN's first N sequences (seq_id order): NEW holds those, e.g. "
            "a float64 reference on a subset.",
            rich_help_panel=PANEL_TRAINING,
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Load the model from here instead of the folder RUN's run.json records (when "
            "that folder moved or is gone); its weights must hash to RUN's.",
            rich_help_panel=PANEL_TRAINING,
            show_default=False,
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            help="Training-side device (default: RUN's, else cuda if available, else cpu).",
            rich_help_panel=PANEL_TRAINING,
            show_default=False,
        ),
    ] = None,
    infer_side: Annotated[
        InferSide,
        typer.Option(
            help="`decode`: keep RUN's stored inference log-probs. `vllm-prefill`: vLLM scores "
            "the stored tokens in one prefill pass (prompt_logprobs; runs sampled at "
            "temperature 1 without truncation only). `hf-prefill`: transformers scores them "
            "(RUN's attention and batch budget), isolating the dtype from the engine.",
            rich_help_panel=PANEL_ENGINE,
        ),
    ] = InferSide.decode,
    infer_dtype: Annotated[
        str | None,
        typer.Option(
            help="Dtype of the prefill inference side: float32, bfloat16, float16 (default: "
            "RUN's inference dtype).",
            rich_help_panel=PANEL_ENGINE,
            show_default=False,
        ),
    ] = None,
    plots: Annotated[
        bool,
        typer.Option(
            help="Draw the figures into OUT/figures at the end.", rich_help_panel=PANEL_OUTPUT
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace a run in --out; the old one is kept until the new one is complete "
            "(the new run is written beside it and renamed into place).",
            rich_help_panel=PANEL_OUTPUT,
        ),
    ] = False,
    json_out: JsonOpt = False,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    workers: WorkersOpt = None,
    gpus_per_worker: GpusPerWorkerOpt = None,
    resume: RayResumeOpt = False,
) -> None:
    """Re-score the stored rollouts of RUN with other settings on one side, without
    generating again: NEW (`--out`) is a complete run over the same tokens, its run.json
    recording `rescored_from` and what changed.

    With no option the training side is re-scored with RUN's settings and reproduces RUN's
    logp_train. Re-scoring the training side never imports vLLM, and RUN's weights hash is
    reused when no file of the model folder is newer than RUN. delta = logp_infer - logp_train
    (nats), as everywhere.

    With --ray the training side is spread over Ray actors (docs/gpu.md, "Ray"): a dead
    actor's shard is retried on another, and --resume continues a job that stopped.
    """
    from rich.console import Console

    from ..progress import progress
    from ..rescore_run import RescoreOptions, rescore_run
    from .common import finish_run

    opts = RescoreOptions(
        train_dtype=train_dtype,
        attn_implementation=attn_implementation,
        rescore_batch_tokens=rescore_batch_tokens,
        rescore_memory=rescore_memory,
        device=device,
        infer_side=infer_side.value,
        infer_dtype=infer_dtype,
        model=model,
        sequences=sequences,
    )
    cluster = ray_options(ray, ray_address, workers, gpus_per_worker, resume)
    err = Console(stderr=True)
    with progress(err) as prog:
        path = rescore_run(run, out, opts, overwrite=overwrite, progress=prog, ray=cluster)
    finish_run(path, json_out=json_out, plots=plots, console=err)
