"""Option types and help-panel names shared by several commands (declared once, reused)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

# Help panels: options are grouped under these headings in every command's --help.
PANEL_INPUT = "Input"
PANEL_SAMPLING = "Sampling (replayed on the training side)"
PANEL_ENGINE = "Inference engine"
PANEL_TRAINING = "Training side"
PANEL_ANALYSIS = "Analysis"
PANEL_OUTPUT = "Output"
PANEL_RECOMMENDATION = "Recommendation"
PANEL_VALIDATION = "Validation (reruns the model)"

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
