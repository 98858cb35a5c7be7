"""Option types and help-panel names shared by several commands (declared once, reused)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import MismatchError

# Help panels: options are grouped under these headings in every command's --help.
PANEL_INPUT = "Input"
PANEL_SAMPLING = "Sampling (replayed on the training side)"
PANEL_ENGINE = "Inference engine"
PANEL_TRAINING = "Training side"
PANEL_ANALYSIS = "Analysis"
PANEL_OUTPUT = "Output"
PANEL_RECOMMENDATION = "Recommendation"
PANEL_VALIDATION = "Validation (reruns the model)"
PANEL_RAY = "Ray cluster (the training side spread over workers)"

RunArg = Annotated[
    Path,
    typer.Argument(
        help="A run directory (written by `mismatch measure` or `mismatch import`).",
        show_default=False,
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the result as one JSON object instead of tables.")
]
EdgesOpt = Annotated[
    str | None,
    typer.Option(
        "--edges",
        help="Comma-separated bucket edges of p in [0, 1], ascending "
        "(default 0,1e-6,1e-5,1e-4,1e-3,1e-2,0.1,0.5,0.9,0.99,0.999,1).",
        show_default=False,
        rich_help_panel=PANEL_ANALYSIS,
    ),
]
EpsOpt = Annotated[
    float | None,
    typer.Option(
        help="Logit perturbation eps for the envelopes (nats); default: the 0.99 quantile "
        "of the per-position eps_hat.",
        show_default=False,
        rich_help_panel=PANEL_ANALYSIS,
    ),
]
HtmlPageOpt = Annotated[
    bool,
    typer.Option(
        "--html/--no-html",
        envvar="MISMATCH_HTML",
        help="Write the report page, report.html (one self-contained HTML file), into the "
        "output directory at the end. MISMATCH_HTML=0 in the environment turns it off.",
        rich_help_panel=PANEL_OUTPUT,
    ),
]
RescoreMemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--rescore-memory",
        help="Byte budget of the training side's per-position pass, e.g. 2GiB: it works on as "
        "many rows of the [tokens x vocabulary] logits at a time as fit (default: 25% of the "
        "memory free on the logits' device, at most 2GiB).",
        show_default=False,
        rich_help_panel=PANEL_TRAINING,
    ),
]

# `--ray` and its companions, shared by `rescore` and `import --rescore` (cluster.RayOptions).
# Typer's parser has no option with an optional value, so the address is its own option.
RayOpt = Annotated[
    bool,
    typer.Option(
        "--ray",
        help="Score on a Ray cluster: the run's parts, in shards balanced by token count, "
        "over --workers actors that each load the model once (the same tokens as one "
        "process). Needs the `ray` extra.",
        rich_help_panel=PANEL_RAY,
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help="The cluster for --ray: `auto` (the one `ray start` made on this node), "
        "HOST:PORT or ray://HOST:PORT (default: a new local Ray on every core).",
        show_default=False,
        rich_help_panel=PANEL_RAY,
    ),
]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers",
        help="Ray actors, each with one copy of the model (default: the cluster's GPUs / "
        "--gpus-per-worker, or its CPUs).",
        show_default=False,
        rich_help_panel=PANEL_RAY,
    ),
]
GpusPerWorkerOpt = Annotated[
    float | None,
    typer.Option(
        "--gpus-per-worker",
        help="GPUs per actor: more than 1 spreads its model over them (device_map); 0: CPU "
        "actors with one torch thread each (default: 1 where the cluster has GPUs, else 0).",
        show_default=False,
        rich_help_panel=PANEL_RAY,
    ),
]
RayResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue the unfinished --ray job of the same --out (kept beside it as "
        ".NAME.partial): finished parts are never scored again.",
        rich_help_panel=PANEL_RAY,
    ),
]


def ray_options(
    ray: bool,
    address: str | None,
    workers: int | None,
    gpus_per_worker: float | None,
    resume: bool,
) -> Any:
    """`cluster.RayOptions` from the `--ray` flags (None without --ray); one line for a
    companion flag given without --ray."""
    if not ray:
        given = [n for n, v in (("--ray-address", address), ("--workers", workers),
                                ("--gpus-per-worker", gpus_per_worker)) if v is not None]  # fmt: skip
        if resume:
            given.append("--resume")
        if given:
            raise MismatchError(f"{', '.join(given)} need(s) --ray")
        return None
    from .cluster import RayOptions

    opts = RayOptions(address, workers, gpus_per_worker, resume=resume)
    opts.check()
    return opts


# `--data-parallel N` (measure, diagnose's baseline): N vLLM engines as Ray actors.
DataParallelOpt = Annotated[
    int,
    typer.Option(
        "--data-parallel",
        help="vLLM engines generating at once, each a Ray actor over a contiguous shard of "
        "the prompts with the run's own tensor / pipeline parallel size (on a CPU: its own "
        "cores); 1: one engine in this process. The rollouts are those of one process "
        "(same parts, same seeds). Needs the `ray` extra when > 1.",
        rich_help_panel=PANEL_ENGINE,
    ),
]
DataParallelAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help="The Ray cluster for --data-parallel: `auto` (the one `ray start` made on this "
        "node), HOST:PORT or ray://HOST:PORT (default: a new local Ray on every core).",
        show_default=False,
        rich_help_panel=PANEL_ENGINE,
    ),
]


# Input and sampling options that `measure` and `diagnose` declare alike (each command sets
# its own default).
ChatTemplateOpt = Annotated[
    bool,
    typer.Option(
        help="Apply the model's chat template when it has one.", rich_help_panel=PANEL_INPUT
    ),
]
SamplesPerPromptOpt = Annotated[
    int, typer.Option(help="Completions per prompt.", rich_help_panel=PANEL_SAMPLING)
]
MaxTokensOpt = Annotated[
    int, typer.Option(help="Maximum completion length.", rich_help_panel=PANEL_SAMPLING)
]
TopPOpt = Annotated[
    float, typer.Option(help="Nucleus sampling mass in (0, 1].", rich_help_panel=PANEL_SAMPLING)
]
TopKOpt = Annotated[
    int, typer.Option(help="Top-k sampling (-1 = off).", rich_help_panel=PANEL_SAMPLING)
]
# The sampling settings of a run made elsewhere (`import`, `watch`): not applied to generation,
# only replayed on the training side when rescoring, and recorded in run.json.
ReplayTemperatureOpt = Annotated[
    float,
    typer.Option(
        "--temperature",
        help="Temperature the run sampled with (replayed when rescoring; recorded).",
        rich_help_panel=PANEL_SAMPLING,
    ),
]
ReplayTopPOpt = Annotated[
    float,
    typer.Option(
        "--top-p",
        help="Top-p of the run (replayed when rescoring).",
        rich_help_panel=PANEL_SAMPLING,
    ),
]
ReplayTopKOpt = Annotated[
    int,
    typer.Option(
        "--top-k",
        help="Top-k of the run, -1 = off (replayed when rescoring).",
        rich_help_panel=PANEL_SAMPLING,
    ),
]
ReplayMinPOpt = Annotated[
    float,
    typer.Option(
        "--min-p",
        help="Min-p of the run (replayed when rescoring).",
        rich_help_panel=PANEL_SAMPLING,
    ),
]
MaxModelLenOpt = Annotated[
    int | None, typer.Option(help="vLLM maximum context length.", rich_help_panel=PANEL_ENGINE)
]
TrainDeviceOpt = Annotated[
    str | None,
    typer.Option(
        help="Training-side device (default: cuda if available, else cpu).",
        rich_help_panel=PANEL_TRAINING,
    ),
]
LogToOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--log-to",
        metavar="TRACKER[:TARGET]",
        help="Also write the metrics (the monitor's mismatch/... names) into an experiment "
        "tracker, by training step; repeat for several: tensorboard:DIR, mlflow[:URI] (default a local file store, ./mlruns), "
        "wandb:PROJECT (offline mode: no network), trackio:PROJECT. Each needs its extra: "
        "pip install 'mismatch-cli[tensorboard]' (or [trackers] for all).",
        show_default=False,
        rich_help_panel=PANEL_OUTPUT,
    ),
]
