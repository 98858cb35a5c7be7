"""`mismatch report RUN... --html FILE`: the page of a run, of several runs and of a diagnose
directory (synthetic runs: no model), parsed strictly, its links and numbers checked, bad
input as one line; then opened in headless Chromium with the network off."""

from __future__ import annotations

import html
import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mismatch_cli import html_report as H
from mismatch_cli.analysis import analyze
from mismatch_cli.formatting import fmt
from mismatch_cli.runs import read_sequences, read_tokens, token_frame, write_run
from mismatch_cli.schema import DIAGNOSE_JSON, REPORT_HTML
from mismatch_cli.synthetic import synthetic_meta, write_synthetic_run

from .conftest import ROOT, assert_one_line_error, cli_in_process

sys.path.insert(0, str(ROOT / "scripts"))
import page_browser as B


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A demo-sized run (~6.5k tokens), a smaller one with training steps, and a diagnose
    directory of synthetic variants."""
    base = tmp_path_factory.mktemp("page")
    demo = write_synthetic_run(base / "demo", num_sequences=64, max_len=160, eps=0.1, seed=3)
    steps = write_synthetic_run(base / "steps", num_sequences=40, max_len=48, eps=0.03, seed=4)
    tok = pd.read_parquet(steps / "tokens.parquet")
    tok["step"] = (tok["seq_id"] // 10).astype(np.int64)
    tok.to_parquet(steps / "tokens.parquet")
    diag = base / "diag"
    for name, eps in {"baseline": 0.1, "prefill-fp32": 0.01}.items():
        write_synthetic_run(diag / "variants" / name, num_sequences=12, eps=eps, seed=5)
    b = read_tokens(diag / "variants" / "baseline")
    cols = {c: b[c].to_numpy() for c in b.columns if c not in ("delta", "p_train", "p_infer")}
    cols["logp_infer"] = cols["logp_train"]
    write_run(diag / "variants" / "null", token_frame(cols), read_sequences(diag / "variants" / "baseline"), synthetic_meta())  # fmt: skip
    from mismatch_cli.diagnose import summarize

    names = ["baseline", "prefill-fp32", "fp16-both", "null"]
    # the reference: the baseline's own tokens and training side (seed 5 again)
    write_synthetic_run(diag / "reference", num_sequences=12, eps=0.1, seed=5)
    result = summarize(diag, names, {"fp16-both": "vLLM could not start: float16 refused"}, {},
                       references=["reference"])  # fmt: skip
    (diag / DIAGNOSE_JSON).write_text(json.dumps(result))
    return {"demo": demo, "steps": steps, "diag": diag, "base": base}


@pytest.fixture(scope="module")
def pages(runs: dict[str, Path]) -> dict[str, Path]:
    out = runs["base"] / "pages"
    out.mkdir()
    return {
        "demo": H.write_page([runs["demo"]], out / "demo.html")[0],
        "two": H.write_page([runs["demo"], runs["steps"]], out / "two.html")[0],
        "diag": H.write_page([runs["diag"]], out / "diag.html")[0],
    }


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.hrefs: list[str] = []
        self.imgs: list[dict[str, str | None]] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.add(tag)
        if a.get("id"):
            self.ids.add(a["id"])  # type: ignore[arg-type]
        if tag == "a" and a.get("href"):
            self.hrefs.append(a["href"])  # type: ignore[arg-type]
        if tag == "img":
            self.imgs.append(a)


def _parse(page: Path) -> _Collect:
    import html5lib

    text = page.read_text(encoding="utf-8")
    parser = html5lib.HTMLParser(strict=True)
    parser.parse(text)  # raises on the first parse error
    assert parser.errors == []
    c = _Collect()
    c.feed(text)
    return c


@pytest.mark.parametrize("name", ["demo", "two", "diag"])
def test_page_parses_strictly_links_resolve_images_inline(
    pages: dict[str, Path], name: str
) -> None:
    c = _parse(pages[name])
    for sec in H.SECTION_IDS:
        assert sec in c.ids
    internal = [h for h in c.hrefs if h.startswith("#")]
    assert internal and all(h[1:] in c.ids for h in internal), set(internal) - {
        f"#{i}" for i in c.ids
    }
    for h in c.hrefs:  # no other link but docs/theory.md sections
        assert h.startswith("#") or "theory.md#" in h, h
    assert c.imgs and all(i["src"].startswith("data:image/") for i in c.imgs)  # type: ignore[union-attr]
    assert all(i.get("alt") for i in c.imgs)
    assert not {"script", "link", "iframe", "object"} & c.tags  # nothing fetched, nothing run
    assert "table" in c.tags


def test_demo_sized_page_size_sections_and_numbers(
    runs: dict[str, Path], pages: dict[str, Path]
) -> None:
    page = pages["demo"]
    text = page.read_text(encoding="utf-8")
    rep = analyze(runs["demo"])
    assert 5_000 < rep["num_tokens"] < 8_000  # demo-sized
    assert page.stat().st_size <= 3_000_000
    assert rep["verdict"] in html.unescape(text)  # the words `report` prints
    k3 = re.search(r'id="metric-k3">.*?<td class="num">([^<]*)</td>', text, re.S)
    assert k3 is not None and k3.group(1) == fmt(rep["metrics"]["k3"], 4)
    figs = set(re.findall(r'data-figure="(\w+)"', text))
    assert figs == {"bound", "bias", "sequence", "distribution", "sweep", "corrections"}
    # absent sections say why in one line
    assert "no training steps" in text and "not a diagnose directory" in text
    assert "recommended rho" in text or "no recommendation" in text


def test_a_large_svg_becomes_a_png(runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from mismatch_cli.plots import load_runs

    data = load_runs([runs["steps"]])
    assert H.draw("bias", data).mime == "image/svg+xml"  # type: ignore[union-attr]
    monkeypatch.setattr(H, "SVG_LIMIT", 1_000)
    img = H.draw("bound", data)
    assert img.mime == "image/png" and img.src.startswith("data:image/png;base64,")  # type: ignore[union-attr]


def test_runs_with_steps_and_several_runs(pages: dict[str, Path]) -> None:
    text = pages["two"].read_text(encoding="utf-8")
    assert 'data-figure="drift"' in text and "Per training step (tail" in text
    assert "mismatch report: demo, steps" in text
    assert text.count('class="verdict"') == 2


def test_diagnose_directory_page(pages: dict[str, Path]) -> None:
    text = pages["diag"].read_text(encoding="utf-8")
    assert 'data-figure="diagnose"' in text
    assert "Ranking by k3" in text and "The variant matrix" in text
    assert "fp16-both: skipped (vLLM could not start" in text
    assert "Which side: each side" in text and "inference</td>" in text


def test_cli_writes_the_page_and_refuses_bad_input(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "p.html"
    proc = cli_in_process("report", str(runs["steps"]), "--html", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and "wrote" in proc.stderr
    # a directory, an unwritable path, a run that is not complete: one line, nothing written
    assert_one_line_error(
        cli_in_process("report", str(runs["steps"]), "--html", str(tmp_path)), "is a directory"
    )
    bad = tmp_path / "file.txt"
    bad.write_text("")
    assert_one_line_error(
        cli_in_process("report", str(runs["steps"]), "--html", str(bad / "p.html")), "not a folder"
    )
    assert_one_line_error(
        cli_in_process("report", str(runs["steps"]), "--html", str(tmp_path / "no" / "p.html")),
        "does not exist",
    )
    inc = tmp_path / "inc"
    write_synthetic_run(inc, num_sequences=4, max_len=8)
    meta = json.loads((inc / "run.json").read_text())
    (inc / "run.json").write_text(json.dumps({**meta, "status": "incomplete"}))
    target = tmp_path / "inc.html"
    assert_one_line_error(cli_in_process("report", str(inc), "--html", str(target)), "not complete")
    assert not target.exists() and not list(tmp_path.glob(".inc.html.*"))
    assert_one_line_error(cli_in_process("report", str(runs["steps"]), str(runs["demo"])), "--html")  # fmt: skip


def test_a_failed_write_leaves_nothing(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / REPORT_HTML
    target.write_text("old page")

    def boom(_page: object) -> str:
        raise RuntimeError("rendering failed")

    monkeypatch.setattr(H, "render", boom)
    with pytest.raises(RuntimeError):
        H.write_page([runs["steps"]], target)
    assert target.read_text() == "old page" and sorted(p.name for p in tmp_path.iterdir()) == [
        REPORT_HTML
    ]


def test_in_headless_chromium_offline(pages: dict[str, Path], tmp_path: Path) -> None:
    """No console error, every image decoded, every section present, a non-blank screenshot."""
    chromium = B.find_chromium()
    if chromium is None:
        pytest.skip(
            "no chromium on PATH: the browser test needs it (`make test` installs it as root with apt-get)"
        )
    for name in ("demo", "two", "diag"):
        png = tmp_path / f"{name}.png"
        found = B.full_page(pages[name], png, chromium)
        assert found["errors"] == [] and found["console"] == [], found
        assert set(H.SECTION_IDS) <= set(found["sections"])
        assert found["images"] and all(
            i["decoded"] and i["naturalWidth"] > 0 for i in found["images"]
        ), found["images"]
        assert B.not_blank(png)
    # a narrow screen (headless Chromium's narrowest window, ~500 px): no page-wide
    # horizontal scroll (wide tables scroll inside their own box)
    narrow = B.probe_at(pages["demo"], tmp_path, chromium, width=420)
    assert narrow["viewport"] <= 520 and narrow["width"] <= narrow["viewport"], narrow


def test_import_writes_the_page_by_default(tmp_path: Path) -> None:
    """Without MISMATCH_HTML (the suite sets it to 0) import writes RUN/report.html;
    --no-html and MISMATCH_HTML=0 do not."""
    import os
    import subprocess
    import sys

    from . import import_fixtures as F

    src = F.write_prime_rl(F.known_run(), tmp_path / "out")
    env = {k: v for k, v in os.environ.items() if k != "MISMATCH_HTML"}

    def imp(out: Path, *extra: str, **env_extra: str) -> None:
        subprocess.run([sys.executable, "-m", "mismatch_cli", "import", "prime-rl", str(src),
                        "--out", str(out), *extra], cwd=ROOT, env={**env, **env_extra},
                       check=True, capture_output=True, text=True)  # fmt: skip

    imp(tmp_path / "a")
    page = (tmp_path / "a" / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "prime-rl" in page
    imp(tmp_path / "b", "--no-html")
    imp(tmp_path / "c", MISMATCH_HTML="0")
    assert not (tmp_path / "b" / "report.html").exists()
    assert not (tmp_path / "c" / "report.html").exists()
