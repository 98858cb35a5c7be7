"""`mismatch demo`: the README's main job on the default model, then every analysis command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..options import HtmlPageOpt


def demo(
    out: Annotated[Path, typer.Option(help="Run directory of the demo.")] = Path("runs/demo"),
    num_prompts: Annotated[int, typer.Option(help="Prompts of the built-in set to use.")] = 32,
    samples_per_prompt: Annotated[int, typer.Option(help="Completions per prompt.")] = 2,
    max_tokens: Annotated[int, typer.Option(help="Maximum completion length.")] = 128,
    html: HtmlPageOpt = True,
) -> None:
    """Measure the default model (SmolLM2-135M-Instruct, vLLM bfloat16 vs transformers float32,
    temperature 1) on the built-in prompts, then report, plot, sweep the threshold and
    compare the mismatch corrections; end with a short summary (the (1 - p) shape, the
    tail's share and sign, the recommended rho and its cost, the correction to use) and
    where the run, its figures and its tables (RUN/tables/*.csv) are.

    Reuses a complete run in --out (delete it, or use `measure --overwrite`, to redo it) and
    resumes an interrupted one.
    """
    from rich.console import Console

    from .. import corrections as C
    from .. import sweep as sw
    from ..config import MeasureConfig
    from ..render import print_corrections, print_summary, print_sweep
    from ..results import write_csv, write_report_csv
    from ..runs import RunDir
    from ..verdict import findings
    from .common import finish_run, measure_with_progress

    err = Console(stderr=True)
    run = RunDir(out)
    if run.exists() and run.read_meta().complete:
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
    report = finish_run(out, json_out=False, plots=True, console=err)
    sweep = sw.sweep(out)
    print_sweep(sweep)
    corr = C.corrections(out)
    print_corrections(corr)
    tables = out / "tables"
    write_report_csv(report, tables)
    for name, frame in (("sweep", sw.sweep_frame(sweep)), ("corrections", C.methods_frame(corr))):
        write_csv(frame, tables / f"{name}.csv")
    where = {"run": out, "figures": out / "figures", "tables": tables}
    if html:
        from .common import write_report_page

        where["page"] = write_report_page(out, err)
    print_summary(findings(report, sweep, corr), where)
