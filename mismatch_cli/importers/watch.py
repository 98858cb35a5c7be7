"""`mismatch watch`: follow a dump folder while the trainer writes it, appending each step
to a run directory once complete (`run_import` with `append`), then writing the step
table, the drift figure and one line per step, with `monitor.DriftDetector`'s alert.

When a step is complete:
    prime-rl      its `step_N/` folder holds the STABLE marker (written once every rank
                  flushed; prime-rl @ 559b447 `trainer/rl/token_export.py`)
    other formats each file's size and mtime unchanged for `settle` seconds
A file is appended once (run.json's `source.files`); a file that changes after it was
read is refused by the append (one line).

A dump with only the inference side (verl), or any with `rescore`, is rescored step by step
with `model`: one `RescoreModel` for the whole watch, so the network loads once and each
step's append rescores only that step's rollouts.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MismatchError
from .ingest import ImportOptions, RescoreModel, discover, run_import

STEPS_CSV = "tables/steps.csv"  # the per-step table of `report --group-by step`
DRIFT_FIGURE = "figures/drift.png"


@dataclass
class WatchOptions:
    """Everything `mismatch watch` was asked to do."""

    fmt: str
    folder: Path
    out: Path
    settle: float = 10.0
    interval: float = 5.0
    until_idle: float | None = None
    once: bool = False
    trust_pickle: bool = False
    figure: bool = True
    model: str | None = None  # --model: rescores inference-only dumps (or all, `rescore`)
    rescore: bool = False
    device: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0


def step_line(row: dict[str, Any], raised: bool) -> str:
    """One step's line: step, tokens, k3, mean |delta|, tail share, alert."""

    def num(v: Any, spec: str) -> str:
        return "n/a" if v is None or not math.isfinite(v) else format(v, spec)

    return (
        f"step {row['step']}: {row['num_tokens']:,} tokens, k3 {num(row['k3'], '.3g')}, "
        f"mean |delta| {num(row['mean_abs_delta'], '.4g')}, tail share "
        f"{num(row['tail_abs_delta_share'] * 100 if row['tail_abs_delta_share'] is not None else None, '.1f')}%, "
        f"alert {'RAISED' if raised else 'no'}"
    )


class Watcher:
    """Polls `opts.folder`; `poll()` appends what is complete and returns the new steps'
    rows. `say` gets each line for the user (steps, waiting, warnings)."""

    def __init__(
        self,
        opts: WatchOptions,
        say: Callable[[str], None],
        warn: Callable[[str], None],
        log: Callable[[int, dict[str, float]], None] | None = None,
    ) -> None:
        from ..monitor import DriftDetector
        from ..runs import RunDir
        from . import get_format
        from .ingest import _Prior

        self.opts, self.say, self.warn, self.log = opts, say, warn, log
        self.mod = get_format(opts.fmt)
        if not opts.folder.is_dir():
            raise MismatchError(f"{opts.folder} is not a folder: watch follows a dump folder")
        if opts.rescore and not opts.model:
            raise MismatchError(
                "--rescore needs --model MODEL: the model whose training side rescores the dump"
            )
        # one model for every step: resolved and loaded by the first rescored append, kept
        self.model = RescoreModel(opts.model) if opts.model else None
        self.detector = DriftDetector()
        self.fed: set[int] = set()  # steps the detector has seen
        self._stat: dict[Path, tuple[int, int, float]] = {}  # size, mtime_ns, since
        self._said: str | None = None
        self.appended = 0  # appends made (steps, or files of a dump without steps)
        self._warned: set[str] = set()
        if RunDir(opts.out).exists():  # resume: the run must be one this watch can extend
            _Prior.open(opts.out, self.mod.NAME)
            rows = self._rows()
            for row in rows:  # the detector's baseline, as if it had watched from the start
                self._feed(row, log=False)  # the trackers had these steps already
            if rows:
                say(f"resuming {opts.out}: {len(rows)} step(s) already imported")

    # ------------------------------------------------------------------ what is ready

    def _recorded(self) -> set[str]:
        from ..runs import RunDir

        run = RunDir(self.opts.out)
        if not run.exists():
            return set()
        return {f["path"] for f in run.read_meta().source.get("files") or []}

    def _candidates(self) -> list[Path]:
        try:
            return discover([self.opts.folder], self.mod.PATTERNS, self.mod.NAME)
        except MismatchError:
            return []  # nothing written yet

    def _complete(self, f: Path, now: float) -> bool:
        """prime-rl: the step folder's STABLE marker; else size and mtime settled."""
        stable = getattr(self.mod, "STABLE", None)
        if stable is not None and self.mod.step_of(f) is not None:
            return (f.parent / stable).exists()
        st = f.stat()
        key = (st.st_size, st.st_mtime_ns)
        seen = self._stat.get(f)
        if seen is None or seen[:2] != key:
            self._stat[f] = (*key, now)
            seen = self._stat[f]
        wall = time.time() - st.st_mtime_ns / 1e9
        return wall >= self.opts.settle or now - seen[2] >= self.opts.settle

    def ready(self) -> tuple[list[list[Path]], int, int]:
        """(groups of complete unread files, one group per step in order, files found,
        files not complete yet)."""
        files = self._candidates()
        done = self._recorded()
        now = time.monotonic()
        new = [f for f in files if str(f.resolve()) not in done]
        ready = [f for f in new if self._complete(f, now)]
        groups: list[list[Path]] = []
        last: Any = object()
        for f in ready:
            step = self.mod.step_of(f)
            if groups and step is not None and step == last:
                groups[-1].append(f)
            else:
                groups.append([f])
            last = step
        return groups, len(files), len(new) - len(ready)

    # ------------------------------------------------------------------ one poll

    def poll(self) -> list[dict[str, Any]]:
        """Append every complete step; print and return the new steps' rows."""
        groups, found, pending = self.ready()
        if not groups:
            if not found:
                self._once(
                    f"waiting for {self.mod.NAME} files ({', '.join(self.mod.PATTERNS)}) under "
                    f"{self.opts.folder}"
                )
            elif pending:
                rule = (
                    f"its {self.mod.STABLE} marker"
                    if hasattr(self.mod, "STABLE")
                    else f"{self.opts.settle:g} s without a change"
                )
                self._once(f"waiting for {pending} file(s) to complete ({rule})")
            return []
        out: list[dict[str, Any]] = []
        for group in groups:
            out.extend(self._append(group))
        self._said = None
        return out

    def _once(self, line: str) -> None:
        if line != self._said and not self.opts.once:  # --once ends in one line of its own
            self.say(line)
            self._said = line

    def _append(self, group: Sequence[Path]) -> list[dict[str, Any]]:
        opts = ImportOptions(
            fmt=self.mod.NAME,
            sources=[str(f) for f in group],
            out=self.opts.out,
            append=True,
            trust_pickle=self.opts.trust_pickle,
            model=self.opts.model,
            rescore=self.opts.rescore,
            device=self.opts.device,
            temperature=self.opts.temperature,
            top_p=self.opts.top_p,
            top_k=self.opts.top_k,
            min_p=self.opts.min_p,
            loaded=self.model,
        )
        result = run_import(opts)
        for w in result.get("warnings", []):
            if w not in self._warned:
                self._warned.add(w)
                self.warn(w)
        if result.get("interrupted"):
            raise KeyboardInterrupt
        self.appended += 1
        rows = self._rows()
        self._write_table(rows)
        new = [r for r in rows if r["step"] not in self.fed]
        for row in new:
            raised = self._feed(row)
            self.say(step_line(row, raised))
            if raised:
                self.warn(f"step {row['step']}: drift alert: {self.detector.reason}")
        if not rows:  # a format or dump without steps: one line per append
            n = result.get("num_tokens", 0)
            self.say(f"appended {len(group)} file(s) ({group[0].name}, ...): {n:,} tokens in all")
        if self.opts.figure and len(rows) >= 2:
            self._write_figure()
        return new

    def _feed(self, row: dict[str, Any], log: bool = True) -> bool:
        """One step's metrics to the detector (and the trackers); True if it raises."""
        from ..monitor import PREFIX

        metrics = {k: (math.nan if v is None else v) for k, v in row.items() if k != "step"}
        raised = self.detector.update(metrics)
        self.fed.add(row["step"])
        if self.log is not None and log:
            flat = {PREFIX + k: float(v) for k, v in metrics.items()}
            flat[f"{PREFIX}alert"] = 1.0 if raised else 0.0
            for key, s in self.detector.cusum.items():
                flat[f"{PREFIX}alert/cusum_{key}"] = float(s)
            self.log(int(row["step"]), flat)
        return raised

    # ------------------------------------------------------------------ outputs

    def _rows(self) -> list[dict[str, Any]]:
        from ..analysis import analyze_groups
        from ..runs import token_columns

        if "step" not in token_columns(self.opts.out):
            return []
        return analyze_groups(self.opts.out, "step")

    def _write_table(self, rows: list[dict[str, Any]]) -> None:
        import pandas as pd

        from ..runs import atomic_write_bytes

        if not rows:
            return
        buf = io.StringIO()
        pd.DataFrame(rows).to_csv(buf, index=False)
        atomic_write_bytes(self.opts.out / STEPS_CSV, buf.getvalue().encode())

    def _write_figure(self) -> None:
        """The drift figure, drawn to a temporary file and renamed into place."""
        import matplotlib.pyplot as plt

        from ..plots import figure
        from ..plots.data import load_runs
        from ..runs import _atomic_path

        fig = figure("drift", load_runs([self.opts.out]))
        path = self.opts.out / DRIFT_FIGURE
        with _atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)

    # ------------------------------------------------------------------ the loop

    def run(self, sleep: Callable[[float], None] = time.sleep) -> int:
        """Poll until `until_idle` seconds pass without a new step (or once with `once`);
        returns the number of appends. `once` with nothing found is an error."""
        last_new = time.monotonic()
        while True:
            before = self.appended
            self.poll()
            if self.appended > before:
                last_new = time.monotonic()
            if self.opts.once:
                if self.appended == 0 and not self._recorded():
                    raise MismatchError(
                        f"no complete {self.mod.NAME} step under {self.opts.folder}: nothing to "
                        "import"
                    )
                return self.appended
            idle = time.monotonic() - last_new
            if self.opts.until_idle is not None and idle >= self.opts.until_idle:
                return self.appended
            sleep(self.opts.interval)


__all__ = ["DRIFT_FIGURE", "STEPS_CSV", "WatchOptions", "Watcher", "step_line"]
