"""`mismatch import`: read the rollouts an RL framework saved into a run directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..importers import FORMATS
from ..options import (
    PANEL_INPUT,
    PANEL_OUTPUT,
    PANEL_TRAINING,
    GpusPerWorkerOpt,
    HtmlPageOpt,
    JsonOpt,
    RayAddressOpt,
    RayOpt,
    ReplayMinPOpt,
    ReplayTemperatureOpt,
    ReplayTopKOpt,
    ReplayTopPOpt,
    RescoreMemoryOpt,
    WorkersOpt,
    ray_options,
)


def import_(
    format: Annotated[
        str,
        typer.Argument(
            metavar="FORMAT",
            help=f"The framework's dump format: {', '.join(FORMATS)} (docs/import.md).",
            show_default=False,
        ),
    ],
    source: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="SOURCE...",
            help="Files, folders (searched recursively for the format's files, e.g. prime-rl's "
            "output folder, its token_exports/ or one step_N/) or globs; several steps at once.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="The run directory to write (required).",
            rich_help_panel=PANEL_OUTPUT,
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Model of the run (folder, hub id or `default`). Needed to rescore: dumps "
            "with only the inference side are rescored with it; without --rescore a dump "
            "with both sides only records its name.",
            rich_help_panel=PANEL_TRAINING,
            show_default=False,
        ),
    ] = None,
    rescore: Annotated[
        bool,
        typer.Option(
            "--rescore",
            help="Recompute the training side with transformers (float32, eager attention, "
            "like `measure`) even if the dump has trainer log-probs: fills the columns "
            "`sweep-threshold` needs (entropy, training top-K, pruned-mass grid).",
            rich_help_panel=PANEL_TRAINING,
        ),
    ] = False,
    steps: Annotated[
        str | None,
        typer.Option(
            metavar="10,20-30",
            help="Import only these training steps (comma-separated steps and ranges).",
            rich_help_panel=PANEL_INPUT,
            show_default=False,
        ),
    ] = None,
    temperature: ReplayTemperatureOpt = 1.0,
    top_p: ReplayTopPOpt = 1.0,
    top_k: ReplayTopKOpt = -1,
    min_p: ReplayMinPOpt = 0.0,
    trust_pickle: Annotated[
        bool,
        typer.Option(
            "--trust-pickle",
            help="Allow reading pickles (skyrl, verl) and slime .pt files that hold numpy "
            "values beyond tensors. Nothing from a file is ever run, with or without it: a "
            "restricted loader reads an allow-list of exact names (the frameworks' batch "
            "classes, tensors, plain numpy arrays) and refuses every other name in one line. "
            "--trust-pickle widens what is read, never what is run.",
            rich_help_panel=PANEL_INPUT,
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
    rescore_batch_tokens: Annotated[
        int,
        typer.Option(
            help="Padded tokens per training-side forward pass when rescoring.",
            rich_help_panel=PANEL_TRAINING,
            min=1,
        ),
    ] = 4096,
    rescore_memory: RescoreMemoryOpt = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace a run in --out; the old one is kept until the new one is complete "
            "(the new run is written beside it and renamed into place). --out is never the "
            "dump's file or folder, nor inside or around it.",
            rich_help_panel=PANEL_OUTPUT,
        ),
    ] = False,
    append: Annotated[
        bool,
        typer.Option(
            "--append",
            help="Add to the import in --out: read only the files it has not read (run.json "
            "records each file's size, mtime and sha256; a file changed since is refused). "
            "The run is rewritten beside --out and swapped in: it stays whole if interrupted. "
            "Without a run in --out, a plain import.",
            rich_help_panel=PANEL_OUTPUT,
        ),
    ] = False,
    json_out: JsonOpt = False,
    html: HtmlPageOpt = True,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    workers: WorkersOpt = None,
    gpus_per_worker: GpusPerWorkerOpt = None,
) -> None:
    """Import the rollouts an RL framework saved (prime-rl, slime, SkyRL, verl, or the
    generic `tokens` format) into a run directory that `report`, `plot` and
    `sweep-threshold` read like any other.

    A dump with both sides (inference and trainer log-probs) is imported as measured
    ("scored", no model needed). A dump with only the inference side, or any dump with
    `--rescore --model MODEL`, is rescored by transformers replaying the sampling flags.
    Conventions are normalised: delta = logp_infer - logp_train (nats) whatever sign the
    framework used; token rows exist only for model-generated (loss-masked) tokens; the
    source files, their sha256 and the mode are recorded in run.json under `source`.
    """
    from rich.console import Console

    from ..errors import MismatchError
    from ..importers.ingest import ImportOptions, run_import
    from ..progress import progress
    from ..render import print_import

    if out is None:
        raise MismatchError("--out RUN is required: the run directory to write")
    if append and overwrite:
        raise MismatchError("--append adds to the run in --out, --overwrite replaces it: pick one")
    opts = ImportOptions(
        fmt=format,
        sources=source or [],
        out=out,
        model=model,
        rescore=rescore,
        steps=steps,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        trust_pickle=trust_pickle,
        overwrite=overwrite,
        append=append,
        device=device,
        batch_tokens=rescore_batch_tokens,
        rescore_memory=rescore_memory,
        ray=ray_options(ray, ray_address, workers, gpus_per_worker, resume=False),
    )
    err = Console(stderr=True)
    with progress(err) as prog:
        result = run_import(opts, prog)
    if result.get("num_new_files") == 0 and "summary" not in result:
        if json_out:
            sys.stdout.write(json.dumps(result, indent=2) + "\n")
        else:
            err.print(
                f"{out} already holds every {format} file found ({result['num_files']}): "
                "nothing to append",
                highlight=False,
            )
        return
    for w in result["warnings"]:
        err.print(f"[bold yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    if html:
        from .common import write_report_page

        write_report_page(Path(result["run"]), err)
    if json_out:
        from ..results import json_ready

        sys.stdout.write(json.dumps(json_ready(result), indent=2, allow_nan=False) + "\n")
        if result.get("interrupted"):
            raise typer.Exit(130)
        return
    print_import(result, Console())
    if result.get("interrupted"):
        raise typer.Exit(130)
