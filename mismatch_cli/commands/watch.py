"""`mismatch watch`: follow a dump folder while training runs, appending each complete step."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..importers import FORMATS
from ..options import (
    PANEL_INPUT,
    PANEL_OUTPUT,
    PANEL_TRAINING,
    LogToOpt,
    ReplayMinPOpt,
    ReplayTemperatureOpt,
    ReplayTopKOpt,
    ReplayTopPOpt,
)


def watch(
    folder: Annotated[
        Path,
        typer.Argument(
            metavar="DIR",
            help="The dump folder the trainer writes (searched recursively, as `import` does).",
            show_default=False,
        ),
    ],
    format: Annotated[
        str | None,
        typer.Option(
            "--format",
            help=f"The dump format: {', '.join(FORMATS)} (docs/import.md).",
            rich_help_panel=PANEL_INPUT,
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="The run directory each complete step is appended to (created, or resumed).",
            rich_help_panel=PANEL_OUTPUT,
            show_default=False,
        ),
    ] = None,
    settle: Annotated[
        float,
        typer.Option(
            help="Seconds a file's size and mtime must stay unchanged before it is read "
            "(every format but prime-rl, whose steps carry a STABLE marker).",
            rich_help_panel=PANEL_INPUT,
            min=0,
        ),
    ] = 10.0,
    interval: Annotated[
        float,
        typer.Option(help="Seconds between polls of DIR.", rich_help_panel=PANEL_INPUT, min=0.01),
    ] = 5.0,
    until_idle: Annotated[
        float | None,
        typer.Option(
            metavar="S",
            help="Exit after S seconds without a new step (default: watch until Ctrl-C).",
            rich_help_panel=PANEL_INPUT,
            min=0,
            show_default=False,
        ),
    ] = None,
    once: Annotated[
        bool,
        typer.Option(
            "--once",
            help="Import what is complete, then exit (non-zero if DIR holds no complete step).",
            rich_help_panel=PANEL_INPUT,
        ),
    ] = False,
    trust_pickle: Annotated[
        bool,
        typer.Option(
            "--trust-pickle",
            help="Allow reading pickles (skyrl, verl), as `import --trust-pickle`.",
            rich_help_panel=PANEL_INPUT,
        ),
    ] = False,
    model: Annotated[
        str | None,
        typer.Option(
            help="Model that rescores the steps, as `import --model`: dumps with only the "
            "inference side (verl) are rescored with it, each step as it completes; the "
            "model loads once for the whole watch. Resuming a rescored RUN needs its model.",
            rich_help_panel=PANEL_TRAINING,
            show_default=False,
        ),
    ] = None,
    rescore: Annotated[
        bool,
        typer.Option(
            "--rescore",
            help="Recompute the training side with transformers even if the dump has trainer "
            "log-probs, as `import --rescore`.",
            rich_help_panel=PANEL_TRAINING,
        ),
    ] = False,
    device: Annotated[
        str | None,
        typer.Option(
            help="Training-side device when rescoring (default: cuda if available, else cpu).",
            rich_help_panel=PANEL_TRAINING,
            show_default=False,
        ),
    ] = None,
    temperature: ReplayTemperatureOpt = 1.0,
    top_p: ReplayTopPOpt = 1.0,
    top_k: ReplayTopKOpt = -1,
    min_p: ReplayMinPOpt = 0.0,
    log_to: LogToOpt = None,
    figure: Annotated[
        bool,
        typer.Option(
            "--figure/--no-figure",
            help="Redraw RUN/figures/drift.png after each step.",
            rich_help_panel=PANEL_OUTPUT,
        ),
    ] = True,
) -> None:
    """Follow a dump folder while training runs: each step is appended to RUN once complete
    (prime-rl: its STABLE marker; other formats: files unchanged for --settle seconds),
    never re-imported. After each step: one line (step, tokens, k3, mean |delta|, tail
    share, alert), RUN/tables/steps.csv (the table of `report --group-by step`) and
    RUN/figures/drift.png. Inference-only dumps (verl), or any with --rescore, are rescored
    with --model step by step, the model loaded once. The alert is the monitor's drift detector (docs/integrations.md);
    a step that raises it prints which metric rose, from what to what. The run on disk is
    always complete: `report`, `plot` and the rest can read it while watch runs.
    """
    from rich.console import Console

    from ..errors import MismatchError
    from ..importers.watch import Watcher, WatchOptions

    if format is None:
        raise MismatchError(f"--format is required: one of {', '.join(FORMATS)}")
    if out is None:
        raise MismatchError("--out RUN is required: the run directory to append to")
    if once and until_idle is not None:
        raise MismatchError("--once exits after one pass; --until-idle waits: pick one")
    console, err = Console(), Console(stderr=True)

    def say(line: str) -> None:
        console.print(line, highlight=False, soft_wrap=True)

    def warn(line: str) -> None:
        err.print(f"[bold yellow]warning:[/] {line}", highlight=False, soft_wrap=True)

    opts = WatchOptions(
        fmt=format,
        folder=folder,
        out=out,
        settle=settle,
        interval=interval,
        until_idle=until_idle,
        once=once,
        trust_pickle=trust_pickle,
        figure=figure,
        model=model,
        rescore=rescore,
        device=device,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
    )
    from ..trackers import log_all, open_trackers

    with open_trackers(log_to, run_name=out.name) as trackers:
        log = (lambda step, m: log_all(trackers, m, step)) if trackers else None
        watcher = Watcher(opts, say, warn, log)
        try:
            n = watcher.run()
        except KeyboardInterrupt:
            say(f"stopped: {out} holds every step read to its end ({watcher.appended} now)")
            return
    if until_idle is not None or once:
        say(f"{n} append(s) to {out}; done" if n else f"nothing new for {out}")
