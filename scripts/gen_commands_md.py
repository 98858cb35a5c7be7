"""Generate docs/commands.md from the CLI itself, so the reference cannot drift from --help.

    python scripts/gen_commands_md.py          # rewrite docs/commands.md
    python scripts/gen_commands_md.py --check  # exit 1 if docs/commands.md is stale

tests/test_docs.py runs the check.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import click
import typer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's package, not whichever one is installed
OUT = ROOT / "docs" / "commands.md"

INTRO = """# Command reference

Generated from the CLI by `scripts/gen_commands_md.py`; a test fails when this page and
`mismatch COMMAND --help` disagree. Conventions everywhere: `delta = logp_infer - logp_train`
(nats); both sides are log-probs of the sampling distribution (after temperature, min-p,
top-k, top-p); buckets and `(1 - p)` use the training-side probability unless `--by infer`.

Every command exits non-zero with one `error:` line (no traceback) on bad input.
"""


def _is_argument(p: click.Parameter) -> bool:
    return p.param_type_name == "argument"  # typer vendors click: no isinstance checks


def _default(p: click.Parameter) -> str:
    if getattr(p, "is_flag", False):
        if p.secondary_opts:
            return f"`{p.opts[0]}`" if p.default else f"`{p.secondary_opts[0]}`"
        return "on" if p.default else "off"
    if p.default is None or p.default == () or p.required:
        return "required" if p.required else "-"
    return f"`{p.default}`"


def _names(p: click.Parameter) -> str:
    if _is_argument(p):
        return f"`{p.name.upper()}`"
    names = list(p.opts)
    if getattr(p, "is_flag", False) and p.secondary_opts:
        names = [f"{p.opts[0]} / {p.secondary_opts[0]}"]
    return ", ".join(f"`{n}`" for n in names)


def _cell(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def render() -> str:
    sys.path.insert(0, str(ROOT))  # this checkout's package, not whichever one is installed
    from mismatch_cli.cli import app

    group = typer.main.get_command(app)
    ctx = click.Context(group)
    lines = [INTRO]
    names = list(group.list_commands(ctx))
    lines.append("Commands: " + ", ".join(f"[`{n}`](#mismatch-{n})" for n in names) + ".\n")
    for name in names:
        cmd = group.get_command(ctx, name)
        lines.append(f"## mismatch {name}\n")
        lines.append(inspect.cleandoc(cmd.help or "") + "\n")
        params = [p for p in cmd.params if p.name != "help"]
        lines.append("| argument / option | default | description |")
        lines.append("|---|---|---|")
        for p in params:
            help_text = getattr(p, "help", None) or ""
            lines.append(f"| {_names(p)} | {_cell(_default(p))} | {_cell(help_text)} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python scripts/gen_commands_md.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
