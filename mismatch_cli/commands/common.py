"""What several commands do around their own work: measure with progress (measure, demo,
sweep-threshold --validate), and finish a run (measure, demo, rescore): print its report,
draw its figures, say where it is. Command-layer code: it prints, so the library never
imports it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer


def measure_with_progress(
    cfg: Any,
    out: Path | None,
    *,
    resume: bool,
    overwrite: bool,
    console: Any,
    ray_address: str | None = None,
) -> Path:
    """Run the pipeline with progress (bars on a terminal, lines in a log); Ctrl-C leaves a
    resumable incomplete run and exits 130 with one line saying how to resume it.
    `ray_address`: the Ray cluster of `--data-parallel`."""
    from ..measurement import run_measure
    from ..progress import progress

    where: dict[str, Path] = {}
    try:
        with progress(console) as prog:
            return run_measure(
                cfg,
                out,
                resume=resume,
                overwrite=overwrite,
                progress=prog,
                on_ready=lambda p: where.setdefault("out", p),
                ray_address=ray_address,
            )
    except KeyboardInterrupt:
        p = where.get("out")
        msg = "interrupted"
        if p is not None:
            msg += f"; what was computed is kept in {p} (incomplete): resume with `mismatch measure --resume --out {p}`"
        console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None


def finish_run(
    run_path: Path, *, json_out: bool, plots: bool, console: Any, html: bool = False
) -> dict[str, Any]:
    """After a run: print the report (tables or JSON), draw figures (saying which were
    skipped and why), write the report page (`html`), say where things are. Returns the
    report."""
    from ..analysis import analyze
    from ..runs import open_run

    _, meta = open_run(run_path)
    result = analyze(run_path)
    if json_out:
        payload = {"run": str(run_path), "summary": meta.summary, "report": result}
        sys.stdout.write(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    else:
        from rich.console import Console

        from ..render import print_report, print_run_summary

        out = Console()
        print_run_summary(out, run_path, meta, result)
        print_report(result, out)
    if plots:
        draw_figures(run_path, console)
    if html:
        write_report_page(run_path, console)
    console.print(f"[bold green]run complete:[/] {run_path}", highlight=False)
    return result


def write_report_page(path: Path, console: Any) -> Path:
    """Write PATH/report.html (a run or a diagnose directory) and say where it is."""
    from ..html_report import write_page
    from ..schema import REPORT_HTML

    page, size = write_page([path], path / REPORT_HTML)
    console.print(f"page: {page} ({size / 1e6:.2f} MB)", highlight=False)
    return page


def draw_figures(run_path: Path, console: Any) -> list[Path]:
    """Draw every figure of a run into RUN/figures; one `note:` line per skipped figure."""
    from ..plots import make_figures

    notes: list[str] = []
    files = make_figures([run_path], run_path / "figures", formats=["png"], notes=notes)
    for n in notes:
        console.print(f"[bold yellow]note:[/] figure {n}", highlight=False, soft_wrap=True)
    console.print(f"figures: {run_path / 'figures'} ({len(files)} files)", highlight=False)
    return files
