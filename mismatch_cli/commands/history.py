"""`mismatch history`: the mismatch metrics a trainer already logged, by step, from its own
log (TRL, verl, prime-rl, a W&B or TensorBoard export); the drift alarm over them."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..options import PANEL_INPUT, PANEL_OUTPUT, JsonOpt, LogToOpt


def history(
    logs: Annotated[
        list[Path],
        typer.Argument(
            help="One or more trainer logs: TRL's trainer_state.json (or the output / checkpoint "
            "directory holding it), verl's file-logger JSONL, prime-rl's metrics.jsonl, a CSV "
            "export with a step column (W&B), TensorBoard event files (a file or directory).",
            metavar="LOG...",
            show_default=False,
        ),
    ],
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            metavar="trl|verl|prime-rl|csv|tensorboard",
            help="The log's format. Default: detected from the file.",
            show_default=False,
            rich_help_panel=PANEL_INPUT,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Directory for the history figure (history.png) and history.json "
            "(created if needed). Default: no files written.",
            show_default=False,
            rich_help_panel=PANEL_OUTPUT,
        ),
    ] = None,
    log_to: LogToOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """The training-inference mismatch a trainer already logs, over its steps: each
    mismatch-related series found, what it is in this project's terms (its sign against
    delta = logp_infer - logp_train, clipped or raw, token or sequence level), its values by
    step, and the drift alarm of the monitor run over the k3-like and mean |delta|-like
    ones (which metric rose, from what to what). No token dump needed; what such a log
    cannot tell (buckets, the (1 - p) check, the pruning sweep) takes `mismatch import` of
    a token dump, or the trainer plug-ins (docs/integrations.md).
    """
    from rich.console import Console

    from ..history import history as read_history
    from ..history import replay, unique_labels
    from ..results import json_ready

    err = Console(stderr=True)
    if log_to:
        from ..trackers import check_log_to

        check_log_to(log_to)  # a bad spec fails before any work
    results = [read_history(p, fmt) for p in logs]
    unique_labels(results)
    written: list[Path] = []
    if out is not None:
        from ..plots.history import write_history_figure

        written = write_history_figure(results, out)
        payload = json.dumps(json_ready({"logs": results}), indent=2, allow_nan=False)
        (out / "history.json").write_text(payload + "\n")
        written.append(out / "history.json")
    if log_to:
        for line in replay(results, log_to):
            err.print(f"logged: {line}", highlight=False, soft_wrap=True)
    if json_out:
        sys.stdout.write(
            json.dumps(json_ready({"logs": results}), indent=2, allow_nan=False) + "\n"
        )
    else:
        from ..render import print_history

        print_history(results)
    for p in written:
        err.print(f"wrote: {p}", highlight=False)
