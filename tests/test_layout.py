"""The layout's promises: fast --help, one home per helper, one direction of flow."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "mismatch_cli"
HEAVY = ("torch", "vllm", "transformers")


def _commands() -> list[str]:
    from mismatch_cli.cli import app

    return [c.name for c in app.registered_commands]


@pytest.mark.parametrize("command", [None, *_commands()])
def test_help_imports_no_heavy_library(command: str | None) -> None:
    """`mismatch [COMMAND] --help` answers without importing torch, vLLM or transformers."""
    args = [command, "--help"] if command else ["--help"]
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from mismatch_cli.cli import app\n"
        f"r = CliRunner().invoke(app, {args!r})\n"
        "assert r.exit_code == 0, r.output\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"{command} --help imported {proc.stdout.strip()}"


def _sources() -> dict[Path, str]:
    return {p: p.read_text() for p in PKG.rglob("*.py")}


@pytest.mark.parametrize(
    "pattern",
    [r"def _?first_line\(", r"def json_ready\(", r"def _?pct\(", r"def _?fmt\(", r"def _num\("],
)
def test_each_helper_is_defined_once(pattern: str) -> None:
    hits = [p for p, s in _sources().items() if re.search(pattern, s)]
    assert len(hits) <= 1, hits
    if pattern != r"def _num\(":
        assert len(hits) == 1, pattern


def test_the_library_never_imports_the_cli_layer() -> None:
    """Only cli.py and commands/ may import commands/ (data flows one way)."""
    bad = [
        p.relative_to(PKG)
        for p, s in _sources().items()
        if "commands" not in p.parts
        and p.name not in ("cli.py", "__main__.py")
        and re.search(r"from \.+commands|import mismatch_cli\.commands|from \.+cli import", s)
    ]
    assert bad == []


def test_synthetic_and_analysis_modules_do_not_import_torch() -> None:
    code = (
        "import sys, mismatch_cli, mismatch_cli.synthetic, mismatch_cli.analysis, "
        "mismatch_cli.sweep, mismatch_cli.plots, mismatch_cli.render, mismatch_cli.runs\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""
