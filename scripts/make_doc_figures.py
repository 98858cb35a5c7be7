"""Produce the figures shown in README.md and docs/ from a real run (default: the demo run).

    python scripts/make_doc_figures.py [RUN] [--out docs/figures] [--diagnose DIR]

Nothing in docs/figures is drawn by hand: every image comes from `mismatch_cli.plots` on a
run made by `mismatch measure` (`make demo` writes runs/demo).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mismatch_cli.plots import make_figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", default="runs/demo")
    ap.add_argument("--out", default="docs/figures")
    ap.add_argument("--dpi", type=int, default=110)
    ap.add_argument("--diagnose", help="also draw diagnose.png from this diagnose directory")
    args = ap.parse_args()
    files = make_figures([args.run], args.out, formats=["png"], dpi=args.dpi)
    meta = json.loads((Path(args.run) / "run.json").read_text())
    source = (
        f"Drawn by scripts/make_doc_figures.py from run {args.run} "
        f"(model {meta['model']['name']}, {meta['summary']['num_tokens']} tokens, "
        f"created {meta['created']}).\n"
    )
    if args.diagnose:
        from mismatch_cli.runs import diagnose_runs

        runs, names = diagnose_runs(Path(args.diagnose)) or ([], [])
        files += make_figures(
            runs, args.out, formats=["png"], labels=names, figures=["diagnose"], dpi=args.dpi
        )
        base = json.loads((Path(runs[0]) / "run.json").read_text())
        source += (
            f"diagnose.png: from the diagnose directory {args.diagnose} (`mismatch diagnose`, "
            f"{base['summary']['num_tokens']} tokens, created {base['created']}).\n"
        )
    (Path(args.out) / "SOURCE.txt").write_text(source)
    for f in files:
        print(f)


if __name__ == "__main__":
    main()
