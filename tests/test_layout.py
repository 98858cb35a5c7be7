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


# Modules upstream of the run directory (they produce runs: engines, models, importers) and the
# command layer; every other module reads run directories and must import no heavy library.
UPSTREAM = {
    "mismatch_cli.rollout", "mismatch_cli.rescore", "mismatch_cli.models", "mismatch_cli.pipeline",
    "mismatch_cli.rescore_run", "mismatch_cli.cluster",
    "mismatch_cli.dvp", "mismatch_cli.sampling", "mismatch_cli.prompts", "mismatch_cli.config",
    "mismatch_cli.synthetic", "mismatch_cli.diagnose", "mismatch_cli.validate",
    "mismatch_cli.monitor",  # inside a trainer: reads its torch tensors (never an engine)
    "mismatch_cli.vllm_plugin",  # runs inside vLLM's engine processes
}  # fmt: skip
# integrations/: the monitor inside a trainer's loop (its torch tensors), upstream like it
TERMINAL = {"mismatch_cli.render", "mismatch_cli.progress"}  # the only modules that draw with rich


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _cli_layer(name: str) -> bool:
    return name.startswith("mismatch_cli.commands") or name in (
        "mismatch_cli.cli",
        "mismatch_cli.__main__",
    )


def _downstream() -> list[str]:
    """Every module that reads run directories: not upstream, not an importer, not a trainer
    plug-in (`integrations/`: it runs inside a trainer, upstream of the run directory), not
    the CLI."""
    return [
        m
        for m in _modules()
        if m not in UPSTREAM
        and not m.startswith(("mismatch_cli.importers", "mismatch_cli.integrations"))
        and not _cli_layer(m)
    ]


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(absolute module, under `if TYPE_CHECKING`) of every import in a file, lazy ones too."""
    import ast

    tree = ast.parse(path.read_text())
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    typing_only = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
            typing_only |= {id(m) for m in ast.walk(n)}
    out = []
    for n in ast.walk(tree):
        tc = id(n) in typing_only
        if isinstance(n, ast.Import):
            out += [(a.name, tc) for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            base = pkg[: len(pkg) - n.level + 1] if n.level else []
            mod = ".".join([*base, *([n.module] if n.module else [])])
            out += [(mod, tc), *((f"{mod}.{a.name}", tc) for a in n.names)]
    return out


def test_downstream_modules_never_import_an_engine_or_torch() -> None:
    """No module downstream of the run directory imports torch, vLLM or transformers, even
    inside a function (statically), nor at import time (in a fresh interpreter)."""
    mods = _modules()
    bad = [(m, i) for m in _downstream() for i, _ in _imports(mods[m]) if i.split(".")[0] in HEAVY]
    assert bad == []
    code = (
        "import importlib, sys\n"
        f"for m in {_downstream()!r}: importlib.import_module(m)\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def test_the_library_never_imports_the_renderer_or_rich() -> None:
    """Numbers become text in `formatting`; only the terminal layer (render, progress) and
    the command layer draw with rich."""
    mods = _modules()
    bad = [
        (m, i)
        for m, p in mods.items()
        if m not in TERMINAL and not _cli_layer(m)
        for i, _ in _imports(p)
        if i.split(".")[0] == "rich" or i in TERMINAL
    ]
    assert bad == []


def test_no_import_loop_but_type_checking_ones() -> None:
    """The package's import graph (lazy imports included, `if TYPE_CHECKING` ones left out)
    has no cycle: no import runs back up the layers."""
    mods = _modules()
    graph = {
        m: {i for i, tc in _imports(p) if not tc and i in mods and i != m} for m, p in mods.items()
    }
    seen: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(m: str, path: list[str]) -> None:
        seen[m] = 1
        for n in sorted(graph[m]):
            assert seen.get(n) != 1, f"import loop: {' -> '.join([*path, m, n])}"
            if n not in seen:
                visit(n, [*path, m])
        seen[m] = 2

    for m in graph:
        if m not in seen:
            visit(m, [])


def _contract_names() -> set[str]:
    """Names every module of a registry defines by contract: an import format's
    (`importers.toolkit.Format` and its optional hooks) and a figure module's."""
    from mismatch_cli.importers import toolkit

    names = {"DEFAULT", "applies"}  # plots/<figure>.py: NAME, TITLE, plot_<name>, optional
    for proto in (toolkit.Format, toolkit.SelectsFiles, toolkit.WarnsOnSteps):
        names |= {n for n in vars(proto) if not n.startswith("_")}
        names |= set(getattr(proto, "__annotations__", {}))
    return names | {"NAME", "TITLE"}


def test_no_public_name_is_defined_twice() -> None:
    """Each public function, class and constant of the package has one home (a second
    definition under the same name is a copy, or two concepts sharing a word); the names
    a registry's modules define by contract, and each command module's command, are exempt."""
    import ast

    from mismatch_cli.cli import app

    commands = {c.callback.__name__ for c in app.registered_commands if c.callback}
    exempt = _contract_names()
    homes: dict[str, list[str]] = {}
    for m, p in _modules().items():
        for n in ast.parse(p.read_text()).body:
            if isinstance(n, (ast.FunctionDef, ast.ClassDef)):
                names = [n.name]
            elif isinstance(n, ast.Assign):
                names = [t.id for t in n.targets if isinstance(t, ast.Name)]
            elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
                names = [n.target.id]
            else:
                continue
            for name in names:
                if name.startswith("_") or name in exempt:
                    continue
                if m.startswith("mismatch_cli.commands") and name in commands:
                    continue
                homes.setdefault(name, []).append(m)
    twice = {k: v for k, v in homes.items() if len(v) > 1}
    assert twice == {}
