"""Open a report page (`mismatch report RUN --html FILE`) in headless Chromium with the
network off: check it (no console error, every image decoded, every section present) and
take a full-page screenshot. Shared by tests/test_html_report.py and the docs screenshot:

    python scripts/page_browser.py RUN_OR_PAGE [--out docs/figures/report-page.png]

RUN_OR_PAGE: a report.html, or a run directory (its page is written first into a
temporary folder). The docs image is the top of the page at 1100 px, scaled to 800 px.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
# no network: every host resolves nowhere and any proxy is unreachable
NO_NETWORK = (
    "--proxy-server=http://127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
FLAGS = ("--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", *NO_NETWORK)

# Injected first in <head> of a copy of the page: records errors (script errors, failed
# loads, CSP violations, console.error) from the first element on, then, after `load`,
# decodes every image and writes the findings into <pre id="mismatch-probe">.
PROBE = """<script>
(function () {
  var errors = [];
  window.addEventListener("error", function (e) {
    var t = e.target && e.target.tagName ? e.target.tagName + " " + (e.target.src || e.target.href || "") : "";
    errors.push("error: " + (e.message || t).slice(0, 200));
  }, true);
  document.addEventListener("securitypolicyviolation", function (e) {
    errors.push("blocked: " + e.violatedDirective + " " + e.blockedURI);
  });
  var ce = console.error;
  console.error = function () { errors.push("console.error: " + Array.prototype.join.call(arguments, " ")); ce.apply(console, arguments); };
  window.addEventListener("load", function () {
    var imgs = Array.prototype.slice.call(document.images);
    Promise.all(imgs.map(function (im) {
      return im.decode().then(function () { return true; }, function () { return false; });
    })).then(function (decoded) {
      var out = {
        errors: errors,
        images: imgs.map(function (im, i) {
          return {figure: im.getAttribute("data-figure"), alt: im.alt, decoded: decoded[i],
                  naturalWidth: im.naturalWidth, naturalHeight: im.naturalHeight};
        }),
        sections: Array.prototype.map.call(document.querySelectorAll("section[id]"), function (s) { return s.id; }),
        height: Math.ceil(document.documentElement.scrollHeight),
        width: Math.ceil(document.documentElement.scrollWidth),
        viewport: window.innerWidth
      };
      var pre = document.createElement("pre");
      pre.id = "mismatch-probe";
      pre.textContent = JSON.stringify(out);
      document.body.appendChild(pre);
    });
  });
})();
</script>"""
# the page forbids scripts (its Content-Security-Policy); the probe's copy allows inline ones
CSP_SCRIPT = "default-src 'none'; script-src 'unsafe-inline';"


def find_chromium() -> str | None:
    """The path of a Chromium-family browser, or None."""
    for name in CANDIDATES:
        if path := shutil.which(name):
            return path
    return None


def _run(chromium: str, args: list[str], timeout: int) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="mismatch-chromium-") as profile:
        return subprocess.run(
            [chromium, *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "HOME": profile},
        )


def probe(
    page: Path, work: Path, chromium: str, timeout: int = 120, width: int = 1280
) -> dict[str, Any]:
    """Open a copy of `page` with the probe injected in a window `width` CSS pixels wide;
    return the probe's findings (`width`, `height`: the document's scroll size) plus
    `console` (error lines Chromium logged to stderr)."""
    text = page.read_text(encoding="utf-8")
    copy = work / f"probe-{page.name}"
    text = text.replace("default-src 'none';", CSP_SCRIPT, 1)
    copy.write_text(text.replace("<head>", "<head>\n" + PROBE, 1), encoding="utf-8")
    proc = _run(
        chromium,
        ["--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000",
         f"--window-size={width},900", "--dump-dom", copy.resolve().as_uri()],
        timeout,
    )  # fmt: skip
    m = re.search(r'<pre id="mismatch-probe">(.*?)</pre>', proc.stdout, re.S)
    if m is None:
        raise RuntimeError(
            f"the probe did not report (rc {proc.returncode}): {proc.stderr[-2000:]}"
        )
    out = json.loads(html.unescape(m.group(1)))
    out["console"] = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln and ":ERROR:" in ln]
    return out


def probe_at(page: Path, work: Path, chromium: str, width: int) -> dict[str, Any]:
    """`probe` in a window `width` CSS pixels wide (a narrow screen: 400)."""
    return probe(page, work, chromium, width=width)


def screenshot(
    page: Path, png: Path, chromium: str, width: int = 1280, height: int = 1600, timeout: int = 120
) -> Path:
    """A screenshot of `page` at width x height CSS pixels into `png` (height: the page's
    full height for a full-page shot)."""
    proc = _run(
        chromium,
        [f"--window-size={width},{height}", "--virtual-time-budget=15000",
         f"--screenshot={png.resolve()}", page.resolve().as_uri()],
        timeout,
    )  # fmt: skip
    if not png.is_file():
        raise RuntimeError(f"no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return png


def full_page(page: Path, png: Path, chromium: str, width: int = 1280) -> dict[str, Any]:
    """Probe the page, then screenshot all of it (height from the probe, at most 30,000 px)."""
    found = probe(page, png.parent, chromium, width=width)
    screenshot(page, png, chromium, width, min(max(found["height"], 200), 30_000))
    return found


def not_blank(png: Path) -> bool:
    """The image has real content: many colours and more than one near-white region."""
    from PIL import Image, ImageStat

    with Image.open(png) as im:
        rgb = im.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 16)
        stat = ImageStat.Stat(rgb.convert("L"))
    return (colours is None or len(colours) > 50) and stat.stddev[0] > 5


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="a report.html or a run directory")
    ap.add_argument("--out", default="docs/figures/report-page.png")
    ap.add_argument("--width", type=int, default=1100)
    ap.add_argument("--height", type=int, default=1500)
    ap.add_argument("--scale", type=int, default=800, help="width of the saved image")
    args = ap.parse_args()
    chromium = find_chromium()
    if chromium is None:
        raise SystemExit("no chromium found: apt-get install -y chromium")
    src = Path(args.source)
    with tempfile.TemporaryDirectory() as tmp:
        page = src
        if src.is_dir():
            from mismatch_cli.html_report import write_page

            page, _ = write_page([src], Path(tmp) / "report.html")
        found = probe(page, Path(tmp), chromium)
        if found["errors"] or found["console"]:
            raise SystemExit(f"the page logged errors: {found['errors'] + found['console']}")
        shot = screenshot(page, Path(tmp) / "shot.png", chromium, args.width, args.height)
        from PIL import Image

        with Image.open(shot) as im:
            h = round(im.height * args.scale / im.width)
            small = im.convert("RGB").resize((args.scale, h), Image.LANCZOS)
            small = small.quantize(colors=128, method=Image.Quantize.MEDIANCUT)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            small.save(args.out, optimize=True)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
