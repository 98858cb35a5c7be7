"""The docs stay true to the code: the command reference is regenerated from the CLI and
compared, and every relative link and image in README.md and docs/ resolves."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|<img[^>]+src=\"([^\"]+)\"")


def test_commands_md_matches_the_cli() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_commands_md.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def test_every_command_and_option_of_the_help_is_documented() -> None:
    """Independent of the generator: parse each command's --help output."""
    import click
    import typer

    from mismatch_cli.cli import app

    text = (ROOT / "docs" / "commands.md").read_text()
    group = typer.main.get_command(app)
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        assert f"## mismatch {name}" in text
        for p in group.get_command(ctx, name).params:
            for opt in getattr(p, "opts", []):
                if opt.startswith("--") and opt != "--help":
                    assert f"`{opt}" in text, f"{name} {opt} missing from docs/commands.md"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_and_images_resolve(page: Path) -> None:
    assert page.exists(), page
    text = page.read_text()
    targets = [a or b for a, b in LINK.findall(text)]
    for t in targets:
        if re.match(r"^[a-z]+://|^mailto:|^#", t):
            continue
        path = (page.parent / t.split("#")[0]).resolve()
        assert path.exists(), f"{page.name}: broken link {t}"
