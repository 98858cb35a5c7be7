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


def _theory_sections() -> tuple[dict[int, list[str]], set[str]]:
    """docs/theory.md: {section number: headings inside it} and the GitHub anchors."""
    sections: dict[int, list[str]] = {}
    anchors: set[str] = set()
    current = 0
    for line in (ROOT / "docs" / "theory.md").read_text().splitlines():
        m = re.match(r"^(#+)\s+(.*)$", line)
        if not m:
            continue
        title = m.group(2).strip()
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        anchors.add(slug)
        n = re.match(r"^(\d+)\.\s+(.*)$", title)
        if len(m.group(1)) == 2 and n:
            current = int(n.group(1))
            sections[current] = [n.group(2)]
        elif current:
            sections[current].append(title)
    return sections, anchors


def test_citations_of_theory_md_name_real_sections() -> None:
    """Every `theory.md §N`, `§N "Title"`, `theory.md, "Title"` and `theory.md#anchor` in the
    package, the scripts and the docs points at a section that exists under that number and
    title (a renumbered section fails here, not in a reader's hands)."""
    sections, anchors = _theory_sections()
    headings = {t for ts in sections.values() for t in ts}
    files = [*PKG_FILES, *PAGES]
    cited = 0
    for f in files:
        text = re.sub(r"\s*\n\s*(#\s*)?", " ", f.read_text())  # citations wrap lines
        for m in re.finditer(r"theory\.md,?\s*§(\d+)(?:\s*[\"']([^\"']+)[\"'])?", text):
            n, title = int(m.group(1)), m.group(2)
            assert n in sections, f"{f.name}: {m.group(0)!r} cites no such section"
            if title is not None:
                ok = any(h.startswith(title) for h in sections[n])
                assert ok, f"{f.name}: {m.group(0)!r}: not a heading of §{n}"
            cited += 1
        for m in re.finditer(r"theory\.md,\s*[\"']([^\"']+)[\"']", text):
            title = re.sub(r"^\d+\.\s+", "", m.group(1))
            ok = any(h.startswith(title) for h in headings)
            assert ok, f"{f.name}: {m.group(0)!r} cites no such heading"
            cited += 1
        for m in re.finditer(r"theory\.md#([\w\-]+)", text):
            assert m.group(1) in anchors, f"{f.name}: broken anchor {m.group(0)}"
            cited += 1
        for m in re.finditer(r"theory\.md §(\d+)\]\(theory\.md#(\d+)-", text):
            assert m.group(1) == m.group(2), f"{f.name}: {m.group(0)!r} links another section"
        bare = re.search(
            r"theory\.md,?\s*(section|s\.)\s*\d|theory\.md,?\s*§\d+(?!\s*[\"'\]])", text
        )
        if f.suffix == ".py":  # code and --help cite a number with its title: checkable
            assert bare is None, f'{f.name}: {bare.group(0)!r}: cite as §N "Title"'
    assert cited > 10


PKG_FILES = [
    *sorted((ROOT / "mismatch_cli").rglob("*.py")),
    *sorted((ROOT / "scripts").glob("*.py")),
]


def test_code_references_in_the_docs_exist() -> None:
    """Every `module.name` the docs cite (`tokens.open_run_tokens`, `plots.data.RunData`,
    `mismatch_cli.quantiles.QuantileSketch`, ...) names something the package defines: a
    renamed or moved function fails here, not in a newcomer's hands."""
    import importlib

    mods = {
        ".".join(p.relative_to(ROOT / "mismatch_cli").with_suffix("").parts).removesuffix(
            ".__init__"
        )
        for p in (ROOT / "mismatch_cli").rglob("*.py")
    }
    ref = re.compile(r"`(?:mismatch_cli\.)?([a-z_]+(?:\.[a-z_]+)*)\.([A-Za-z_]\w*)[(`]")
    bad, seen = [], 0
    for page in PAGES:
        for m in ref.finditer(page.read_text()):
            mod, name = m.group(1), m.group(2)
            if mod not in mods or name in ("py", "md", "json", "parquet", "jsonl", "csv"):
                continue
            seen += 1
            obj = importlib.import_module(f"mismatch_cli.{mod}")
            if not hasattr(obj, name) and f"{mod}.{name}" not in mods:  # or a submodule
                bad.append(f"{page.name}: {mod}.{name}")
    assert bad == []
    assert seen > 30
