"""`mismatch demo`: the README's main job on the default model, then every analysis command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def demo(
    out: Annotated[Path, typer.Option(help="Run directory of the demo.")] = Path("runs/demo"),
    num_prompts: Annotated[int, typer.Option(help="Prompts of the built-in set to use.")] = 32,
    samples_per_prompt: Annotated[int, typer.Option(help="Completions per prompt.")] = 2,
    max_tokens: Annotated[int, typer.Option(help="Maximum completion length.")] = 128,
) -> None:
    """Measure the default model (SmolLM2-135M-Instruct, vLLM bfloat16 vs transformers float32,
    temperature 1) on the built-in prompts, then report, plot, sweep the threshold and
    compare the mismatch corrections.

    Reuses a complete run in --out (delete it, or use `measure --overwrite`, to redo it) and
    resumes an interrupted one.
    """
    from rich.console import Console

    from ..config import MeasureConfig
    from ..runs import RunDir
    from ..schema import STATUS_COMPLETE
    from .common import finish_run, measure_with_progress

    err = Console(stderr=True)
    run = RunDir(out)
    if run.exists() and run.read_meta().get("status") == STATUS_COMPLETE:
        err.print(f"reusing the complete demo run in {out}")
    else:
        cfg = MeasureConfig(
            num_prompts=num_prompts,
            samples_per_prompt=samples_per_prompt,
            max_tokens=max_tokens,
            temperature=1.0,
            enforce_eager=True,  # ~25 s start instead of ~80 s on a CPU; decode speed similar
        )
        cfg.validate()
        resume = run.exists()
        measure_with_progress(cfg, out, resume=resume, overwrite=False, console=err)
    finish_run(out, json_out=False, plots=True, console=err)
    from .corrections import corrections
    from .sweep import sweep_threshold

    sweep_threshold(out)
    corrections(out)
