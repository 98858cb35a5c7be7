"""The `mismatch` command line: commands only (parse, call the library, print)."""

from __future__ import annotations

import logging
import os
import sys

import typer

from .errors import MismatchError


def quiet_third_party() -> None:
    """Keep third-party noise out of the user's terminal and logs; our own progress lines
    say what happens. Each setting yields to one the user made (set VLLM_LOGGING_LEVEL=INFO,
    TQDM_DISABLE=0, HF_HUB_DISABLE_PROGRESS_BARS=0, TORCH_CPP_LOG_LEVEL=WARNING to see
    them again).

    - vLLM logs on stdout by default: its log goes to stderr (stdout holds results: tables,
      --json), errors only: its warnings on a CPU are performance hints (LD_PRELOAD,
      Triton, NUMA). Some are logged while `import vllm` runs, before vLLM configures its
      own logging, so the `vllm` logger's level is set here too.
    - tqdm and huggingface_hub read their switches when first imported: transformers'
      GGUF de-quantisation, weight-loading and shard-writing bars would otherwise write
      carriage returns into a log.
    - torch's C++ warnings (vLLM's CPU worker prints a NUMA binding notice through them)
      at ERROR: TORCH_CPP_LOG_LEVEL, read when torch loads in the engine process.
    - Python warnings of the child processes: FutureWarnings of modules vLLM's engine
      imports, and multiprocessing's resource tracker reporting the engine's shared memory
      at exit (PYTHONWARNINGS, read by every new interpreter).
    Runs when this module is imported, so vLLM's spawned engine process (which re-imports
    the main module) is quiet too."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    os.environ.setdefault(
        "PYTHONWARNINGS", "ignore::FutureWarning,ignore:resource_tracker:UserWarning"
    )
    level = logging.getLevelName(os.environ["VLLM_LOGGING_LEVEL"].upper())
    if isinstance(level, int):
        logging.getLogger("vllm").setLevel(level)


# The commands that stream a token table through numpy: their BLAS calls are 1-D dot
# products of one batch, which OpenBLAS's threads make slower (up to 5x on two busy cores)
# and which would compete with the reader thread (tokens.prefetch).
STREAMING_COMMANDS = ("report", "plot", "compare", "sweep-threshold", "corrections")


def single_thread_blas(argv: list[str]) -> None:
    """One OpenBLAS thread for a streaming command (unless the user set one): read by
    numpy when it loads, so it runs before any command module is imported. Engines
    (measure, rescore, diagnose) keep their threads."""
    if len(argv) > 1 and argv[1] in STREAMING_COMMANDS and "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


quiet_third_party()
single_thread_blas(sys.argv)


def steady_memory(argv: list[str]) -> None:
    """For a streaming command, memory that stays mapped between batches. Each batch
    allocates arrays of ~8 MB and frees them; on this 2-core Xeon (THP `enabled=madvise`,
    `defrag=madvise`) the kernel's time in `report` at 10^7 rows went to faulting them in
    again, zeroed, in huge pages, compacting memory first: 0.5-3 s of a 2-4 s command,
    varying with the machine's memory. Two settings, each yielding to one the user made:
    Arrow's allocator (mimalloc) without huge OS pages (MIMALLOC_ALLOW_LARGE_OS_PAGES=0,
    read when pyarrow loads: sys 1.2-1.5 s -> 0.2-0.8, wall 2.4-2.5 -> 2.0-2.2, median of
    four), and on glibc freed blocks kept in the process (mallopt: no mmap up to 32 MB, a
    trim only past 1 GB free). Peak memory is unchanged (the same blocks are reused). Only
    in the CLI's own process: a trainer importing the library keeps its settings."""
    if len(argv) < 2 or argv[1] not in STREAMING_COMMANDS or "pyarrow" in sys.modules:
        return
    os.environ.setdefault("MIMALLOC_ALLOW_LARGE_OS_PAGES", "0")
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # musl: other codes, no mallopt
            return
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
        libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):
        return


steady_memory(sys.argv)

app = typer.Typer(
    name="mismatch",
    help=(
        "Measure the training-inference mismatch of an LLM: vLLM rollouts rescored by "
        "transformers, bucketed by token probability, checked against the (1 - p) bound, "
        "and turned into a vocabulary-pruning threshold.\n\n"
        "Convention: delta = logp_infer - logp_train (nats); both are log-probs of the "
        "sampling distribution (after temperature / top-p / top-k / min-p)."
    ),
    rich_markup_mode="markdown",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

from .commands import compare as _compare  # noqa: E402
from .commands import corrections as _corrections  # noqa: E402
from .commands import demo as _demo  # noqa: E402
from .commands import diagnose as _diagnose  # noqa: E402
from .commands import history as _history  # noqa: E402
from .commands import import_ as _import  # noqa: E402
from .commands import measure as _measure  # noqa: E402
from .commands import plot as _plot  # noqa: E402
from .commands import report as _report  # noqa: E402
from .commands import rescore as _rescore  # noqa: E402
from .commands import sweep as _sweep  # noqa: E402
from .commands import watch as _watch  # noqa: E402

app.command("measure", no_args_is_help=False)(_measure.measure)
app.command("report")(_report.report)
app.command("plot")(_plot.plot)
app.command("demo")(_demo.demo)
app.command("sweep-threshold")(_sweep.sweep_threshold)
app.command("import")(_import.import_)
app.command("watch")(_watch.watch)
app.command("corrections")(_corrections.corrections)
app.command("rescore")(_rescore.rescore)
app.command("compare")(_compare.compare)
app.command("diagnose", no_args_is_help=False)(_diagnose.diagnose)
app.command("history")(_history.history)


def _is_usage_error(e: BaseException) -> bool:
    """A click error Typer raises for the command line (by class name: Typer vendors click
    privately, and its own error printer tests the class name too)."""
    return any(c.__name__ == "ClickException" for c in type(e).__mro__)


def _usage_line(e: Exception) -> str:
    """A usage error (a flag out of range, a missing or unknown option) as one line, naming
    the command's --help (Typer would draw a boxed panel of several lines)."""
    msg = " ".join(e.format_message().split())
    ctx = getattr(e, "ctx", None)
    cmd = f"mismatch {ctx.info_name}" if ctx is not None and ctx.parent is not None else "mismatch"
    return f"{msg} (see `{cmd} --help`)"


def main() -> None:
    """Entry point: run the app; user errors (a `MismatchError`, or a flag Typer refuses)
    become one line on stderr and exit code 2."""
    quiet_third_party()
    try:
        rv = app(standalone_mode=False)  # usage errors raised here, not printed as a panel
    except typer.Abort:
        from rich.console import Console

        Console(stderr=True).print("[bold red]error:[/] aborted", highlight=False)
        sys.exit(1)
    except MismatchError as e:
        from rich.console import Console
        from rich.markup import escape

        # escaped: a message naming an extra ('mismatch-cli[ray]') is not rich markup
        Console(stderr=True).print(
            f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True
        )
        sys.exit(e.exit_code)
    except Exception as e:  # a bug, not a user error: one line unless asked for the traceback
        if type(e).__name__ == "NoArgsIsHelpError":
            sys.exit(2)  # `mismatch` alone: the help is already printed
        if _is_usage_error(e):
            from rich.console import Console

            Console(stderr=True).print(
                f"[bold red]error:[/] {_usage_line(e)}", highlight=False, soft_wrap=True
            )
            sys.exit(int(getattr(e, "exit_code", 2)))
        if os.environ.get("MISMATCH_DEBUG"):
            raise
        from rich.console import Console

        Console(stderr=True).print(
            f"[bold red]internal error:[/] {type(e).__name__}: {e} "
            "(set MISMATCH_DEBUG=1 for the traceback; please report it)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)
