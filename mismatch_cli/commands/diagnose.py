"""`mismatch diagnose`: one generation, a matrix of variants on the same tokens, the ranked
comparison, the figure."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..options import (
    PANEL_ENGINE,
    PANEL_INPUT,
    PANEL_OUTPUT,
    PANEL_SAMPLING,
    ChatTemplateOpt,
    DataParallelAddressOpt,
    DataParallelOpt,
    HtmlPageOpt,
    JsonOpt,
    MaxModelLenOpt,
    MaxTokensOpt,
    SamplesPerPromptOpt,
    TopKOpt,
    TopPOpt,
    TrainDeviceOpt,
)

PANEL_VARIANTS = "Variants"


def diagnose(
    model: Annotated[
        str | None,
        typer.Argument(
            help="Local Hugging Face model folder or hub id; `default` = SmolLM2-135M-Instruct "
            "(the default). With --run: where RUN's model is now, if its folder moved (its "
            "weights must hash to RUN's).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="The diagnose directory: variants/<name>/ runs, diagnose.json, figures/ "
            "(an existing one is refused unless --overwrite; never --run's folder).",
            rich_help_panel=PANEL_OUTPUT,
            show_default=False,
        ),
    ] = None,
    variants: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated variants to run (the baseline always runs); `all` = --all. "
            "Default: the default set (baseline, train-bf16, prefill-bf16, prefill-fp32, "
            "fp16-both, hf-bf16-vs-fp32, batch-shape, attention, decode-repeat, null). "
            "`--list` shows the whole matrix; naming one that cannot run here is an error.",
            rich_help_panel=PANEL_VARIANTS,
            show_default=False,
        ),
    ] = None,
    all_variants: Annotated[
        bool,
        typer.Option(
            "--all",
            help="Run every variant of the matrix that can run here (the others are listed "
            "as skipped with their reason). Slower than the default set: each vLLM decode "
            "variant decodes the prompts again.",
            rich_help_panel=PANEL_VARIANTS,
        ),
    ] = False,
    list_variants: Annotated[
        bool,
        typer.Option(
            "--list",
            help="Print the whole matrix (name, side, what it isolates, where it runs, "
            "whether it can run here and why not) and exit; nothing runs. With --json: a "
            "list of objects.",
            rich_help_panel=PANEL_VARIANTS,
        ),
    ] = False,
    run: Annotated[
        Path | None,
        typer.Option(
            help="Use this complete `measure` run (vLLM bf16 vs transformers fp32, eager) as "
            "the baseline instead of generating; its settings replace the input and sampling "
            "options.",
            rich_help_panel=PANEL_VARIANTS,
            show_default=False,
        ),
    ] = None,
    prompts: Annotated[
        str,
        typer.Option(
            help="`builtin` or a JSONL / JSON / CSV / Parquet / text file (as in `measure`).",
            rich_help_panel=PANEL_INPUT,
        ),
    ] = "builtin",
    prompt_column: Annotated[
        str, typer.Option(help="Column holding the prompt text.", rich_help_panel=PANEL_INPUT)
    ] = "prompt",
    num_prompts: Annotated[
        int, typer.Option(help="Use only the first N prompts.", rich_help_panel=PANEL_INPUT)
    ] = 32,
    chat_template: ChatTemplateOpt = True,
    samples_per_prompt: SamplesPerPromptOpt = 2,
    max_tokens: MaxTokensOpt = 128,
    temperature: Annotated[
        float,
        typer.Option(
            help="Sampling temperature; the vLLM prefill variants need 1.",
            rich_help_panel=PANEL_SAMPLING,
        ),
    ] = 1.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = -1,
    min_p: Annotated[
        float, typer.Option(help="Min-p sampling in [0, 1).", rich_help_panel=PANEL_SAMPLING)
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.", rich_help_panel=PANEL_SAMPLING)] = 0,
    top_logprobs: Annotated[
        int,
        typer.Option(help="Top-K log-probs stored per position.", rich_help_panel=PANEL_ENGINE),
    ] = 20,
    enforce_eager: Annotated[
        bool,
        typer.Option(
            "--enforce-eager",
            help="vLLM: skip torch.compile (faster start, slower decode); every vLLM variant "
            "uses the same setting.",
            rich_help_panel=PANEL_ENGINE,
        ),
    ] = False,
    max_model_len: MaxModelLenOpt = None,
    device: TrainDeviceOpt = None,
    reference: Annotated[
        bool,
        typer.Option(
            help="Measure each variant's two sides against a precise reference on the same "
            "tokens (transformers float32, eager, one sequence per pass, in OUT/reference): "
            "which side to fix, whether the errors are independent, what fixing one leaves.",
            rich_help_panel=PANEL_VARIANTS,
        ),
    ] = True,
    reference_fp64: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="Also score the first N sequences in float64 (OUT/reference-fp64) to show "
            "the float32 reference's own error (float64 is slow on a CPU: ~3x a float32 "
            "pass); 0: skip.",
            rich_help_panel=PANEL_VARIANTS,
        ),
    ] = 4,
    plots: Annotated[
        bool,
        typer.Option(
            help="Draw the diagnose figure into OUT/figures.", rich_help_panel=PANEL_OUTPUT
        ),
    ] = True,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace a diagnose directory in --out; the old one is kept until the new "
            "one is complete.",
            rich_help_panel=PANEL_OUTPUT,
        ),
    ] = False,
    json_out: JsonOpt = False,
    html: HtmlPageOpt = True,
    data_parallel: DataParallelOpt = 1,
    ray_address: DataParallelAddressOpt = None,
) -> None:
    """Find which knob causes the mismatch: generate once (demo-sized: 32 prompts x 2 samples
    x 128 tokens), then run a matrix of variants on the SAME tokens, each a run directory in
    OUT/variants/, each changing one thing: the training dtype (train-bf16), the decode path
    (prefill-bf16), the engine at equal dtype (prefill-fp32), the FP16 recipe (fp16-both), the
    dtype without any engine (hf-bf16-vs-fp32), the trainer's batch shape (batch-shape), the
    attention kernel (attention), vLLM's run-to-run noise (decode-repeat), and a null check
    that must be exactly 0. `--all` adds the rest of the matrix (an fp32 LM head, a bf16
    log-softmax, packed rows, left padding, vLLM engine arguments and modes: eager,
    max_num_seqs=1, chunked prefill, prefix caching off, an fp8 KV cache, batch-invariant
    mode, attention backends, fp16 / fp32 engines, tensor parallel 2, FP8 weights), each
    run where it can run; `--list` prints the matrix. `--data-parallel N` generates the
    baseline on N vLLM engines (Ray actors); the variants that decode again run on one.

    Each variant's two sides are also measured against a precise reference on the same
    tokens (transformers float32, eager, one sequence per pass): err_infer = logp_infer -
    ref, err_train = logp_train - ref, so delta = err_infer - err_train; the headline table
    gives each side's rms error, their correlation, the gap measured and predicted from
    independent errors (sqrt(err_infer^2 + err_train^2)) and each side's share.

    Prints the attribution, the variants ranked by k3, the sources of mismatch and a verdict; writes
    OUT/diagnose.json (what --json prints) and the `diagnose` figure. A variant that cannot
    run here is skipped with one line saying why. `mismatch compare` and `mismatch plot OUT`
    read the result again.
    """
    from rich.console import Console

    from ..config import MeasureConfig
    from ..diagnose import draw_diagnose, parse_variants, run_diagnose
    from ..errors import MismatchError
    from ..progress import progress

    if list_variants:
        from ..diagnose import variant_matrix

        matrix = variant_matrix()
        if json_out:
            sys.stdout.write(json.dumps(matrix, indent=2) + "\n")
        else:
            from ..render import print_variant_matrix

            print_variant_matrix(matrix)
        return
    if all_variants and variants is not None:
        raise MismatchError("--all and --variants exclude each other: --all runs every variant")
    names = parse_variants("all" if all_variants else variants)  # bad flags fail first
    if out is None:
        raise MismatchError("--out DIR is required: the diagnose directory to create")
    cfg = MeasureConfig(
        model=model or "default",
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
        top_logprobs=top_logprobs,
        enforce_eager=enforce_eager,
        max_model_len=max_model_len,
        device=device,
        data_parallel=data_parallel,
    )
    cfg.validate()
    if run is not None and data_parallel > 1:
        raise MismatchError("--data-parallel generates the baseline: it has no use with --run")
    err = Console(stderr=True)
    with progress(err) as prog:
        result = run_diagnose(
            cfg,
            out,
            names,
            run=run,
            model=model,
            overwrite=overwrite,
            progress=prog,
            reference=reference,
            reference_fp64=reference_fp64 if reference else 0,
            ray_address=ray_address,
        )
    if plots:
        notes: list[str] = []
        files = draw_diagnose(out, result, notes=notes)
        for n in notes:
            err.print(f"[bold yellow]note:[/] figure {n}", highlight=False, soft_wrap=True)
        if files:
            err.print(f"figure: {files[0]}", highlight=False)
    if html:
        from .common import write_report_page

        write_report_page(out, err)
    if json_out:
        sys.stdout.write(json.dumps(result, indent=2, allow_nan=False) + "\n")
    else:
        from ..render import print_diagnose

        print_diagnose(result)
    err.print(f"[bold green]diagnose complete:[/] {out}", highlight=False)
