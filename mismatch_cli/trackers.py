"""Experiment trackers the monitor's metrics are replayed into: `--log-to KIND[:TARGET]`
(`mismatch watch`, `mismatch history`), repeatable.

    tensorboard:DIR     event files under DIR (the tensorboard package's own writer)
    mlflow[:URI]        an MLflow tracking store; a local `file:` store (./mlruns) by default,
                        a bare path is a file store there
    wandb:PROJECT       a Weights & Biases run in offline mode (WANDB_MODE=offline: no
                        network; `wandb sync` uploads it later), under WANDB_DIR or ./wandb
    trackio:PROJECT     a trackio project (local SQLite under TRACKIO_DIR or the HF cache)

`parse_log_to(specs)` checks every spec (an unknown kind lists the known ones) and opens
each tracker; its package is imported then, never at module import (a missing one is one
line naming the extra to install). `Tracker.log(metrics, step)` takes the monitor's
`mismatch/...` keys and the training step; values that are not finite numbers are left
out (a tracker would draw NaN as a gap or refuse it). `open_trackers(specs)` closes them
all on exit. Anything a tracker's library prints goes to stderr: stdout holds results.

A new tracker: a `Tracker` subclass with `_open`, `_log`, `_close`, one row in `TRACKERS`.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

from .errors import MismatchError, first_line


def _quiet() -> contextlib.AbstractContextManager[Any]:
    """A tracker library's prints go to stderr (stdout holds tables and --json)."""
    return contextlib.redirect_stdout(sys.stderr)


class Tracker:
    """One open tracker. Subclasses: KIND, EXTRA (the pip extra), MODULE (imported lazily),
    NEEDS_TARGET, and `_open` / `_log` / `_close`."""

    KIND: ClassVar[str] = ""
    MODULE: ClassVar[str] = ""
    NEEDS_TARGET: ClassVar[bool] = True
    HINT: ClassVar[str] = ""

    def __init__(self, target: str, run_name: str | None = None) -> None:
        self.target, self.run_name = target, run_name
        self.closed = False
        self._require()
        try:
            with _quiet():
                self._open()
        except MismatchError:
            raise
        except Exception as e:  # the library refused the target: one line
            raise MismatchError(f"--log-to {self.spec}: cannot open it: {first_line(e)}") from e

    @property
    def spec(self) -> str:
        return f"{self.KIND}:{self.target}" if self.target else self.KIND

    @classmethod
    def _require(cls) -> None:
        import importlib

        try:
            importlib.import_module(cls.MODULE)
        except ImportError as e:
            raise MismatchError(
                f"--log-to {cls.KIND} needs the {cls.MODULE.split('.')[0]} package: "
                f"pip install 'mismatch-cli[{cls.KIND}]' ({first_line(e)})"
            ) from e

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Write one step's metrics (non-finite values left out)."""
        clean = {k: float(v) for k, v in metrics.items() if _finite(v)}
        if clean:
            with _quiet():
                self._log(clean, int(step))

    def close(self) -> None:
        """Flush and close (idempotent)."""
        if not self.closed:
            self.closed = True
            with _quiet():
                self._close()

    def _open(self) -> None:
        raise NotImplementedError

    def _log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


class TensorBoardTracker(Tracker):
    """Scalars into DIR/events.out.tfevents.* (tensorboard's EventFileWriter: no torch)."""

    KIND, MODULE = "tensorboard", "tensorboard.summary.writer.event_file_writer"
    HINT = "DIR"

    def _open(self) -> None:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        Path(self.target).mkdir(parents=True, exist_ok=True)
        self._w = EventFileWriter(self.target)

    def _log(self, metrics: dict[str, float], step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=k, simple_value=v) for k, v in metrics.items()]
        self._w.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))

    def _close(self) -> None:
        self._w.close()


class MlflowTracker(Tracker):
    """One MLflow run (experiment "mismatch") in a tracking store; metrics by step."""

    KIND, MODULE, NEEDS_TARGET = "mlflow", "mlflow.tracking", False
    HINT = "[:URI]"
    EXPERIMENT = "mismatch"

    def _open(self) -> None:
        from mlflow.tracking import MlflowClient

        uri = self.target or "file:./mlruns"
        if "://" not in uri and not uri.startswith("file:"):
            uri = Path(uri).resolve().as_uri()
        self.uri = uri
        if uri.startswith("file:"):  # MLflow >= 3.x refuses its file store unless allowed
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self._c = MlflowClient(tracking_uri=uri)
        exp = self._c.get_experiment_by_name(self.EXPERIMENT)
        exp_id = exp.experiment_id if exp else self._c.create_experiment(self.EXPERIMENT)
        tags = {"mlflow.runName": self.run_name} if self.run_name else None
        self.run_id = self._c.create_run(exp_id, tags=tags).info.run_id

    def _log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, v, ts, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):  # MLflow's log_batch limit: 1000 metrics
            self._c.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def _close(self) -> None:
        self._c.set_terminated(self.run_id)


class WandbTracker(Tracker):
    """A W&B run in offline mode (never the network): WANDB_DIR/wandb/offline-run-*."""

    KIND, MODULE = "wandb", "wandb"
    HINT = "PROJECT"

    def _open(self) -> None:
        import wandb

        os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_SILENT", "true")
        self._run = wandb.init(
            project=self.target,
            name=self.run_name,
            mode="offline",
            dir=os.environ.get("WANDB_DIR") or None,
            reinit="create_new",
        )
        self.dir = Path(self._run.dir).parent  # offline-run-*/ (files/ is run.dir)

    def _log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def _close(self) -> None:
        self._run.finish()


class TrackioTracker(Tracker):
    """A trackio run in a local project (SQLite)."""

    KIND, MODULE = "trackio", "trackio"
    HINT = "PROJECT"

    def _open(self) -> None:
        import trackio

        self._run = trackio.init(
            project=self.target,
            name=self.run_name,
            embed=False,
            auto_log_gpu=False,
            auto_log_cpu=False,
        )

    def _log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def _close(self) -> None:
        from trackio import context_vars

        try:
            self._run.finish()
        finally:  # as trackio.finish() does, for this run only
            if context_vars.current_run.get() is self._run:
                context_vars.current_run.set(None)


TRACKERS: dict[str, type[Tracker]] = {
    t.KIND: t for t in (TensorBoardTracker, MlflowTracker, WandbTracker, TrackioTracker)
}


def known_trackers() -> str:
    """'tensorboard:DIR, mlflow[:URI], wandb:PROJECT, trackio:PROJECT'."""
    return ", ".join(
        f"{k}{'' if t.HINT.startswith('[') else ':'}{t.HINT}" for k, t in TRACKERS.items()
    )


def check_spec(spec: str) -> tuple[type[Tracker], str]:
    """(tracker class, target) of one `--log-to` spec, or a one-line MismatchError."""
    kind, _, target = spec.strip().partition(":")
    cls = TRACKERS.get(kind.lower())
    if cls is None:
        raise MismatchError(
            f"unknown tracker {kind!r} in --log-to {spec!r}; known: {known_trackers()}"
        )
    if cls.NEEDS_TARGET and not target:
        raise MismatchError(f"--log-to {kind} needs a target: --log-to {kind}:{cls.HINT}")
    return cls, target


def check_log_to(specs: Sequence[str] | None) -> list[tuple[type[Tracker], str]]:
    """Check `--log-to` specs and that each tracker's package imports, opening nothing: a
    command calls it before its work, so a typo fails at once, not at the end."""
    checked = [check_spec(s) for s in specs or ()]
    for cls, _ in checked:
        cls._require()
    return checked


def parse_log_to(specs: Sequence[str] | None, run_name: str | None = None) -> list[Tracker]:
    """Open one tracker per spec (every spec checked before any is opened); on an error
    the ones already open are closed."""
    checked = check_log_to(specs)
    opened: list[Tracker] = []
    try:
        for cls, target in checked:
            opened.append(cls(target, run_name))
    except BaseException:
        close_all(opened)
        raise
    return opened


def close_all(trackers: Sequence[Tracker]) -> None:
    """Close every tracker, even when one fails (the first error is raised after)."""
    err: BaseException | None = None
    for t in trackers:
        try:
            t.close()
        except Exception as e:  # keep closing the others
            err = err or e
    if err is not None:
        raise MismatchError(f"closing a tracker failed: {first_line(err)}") from err


def log_all(trackers: Sequence[Tracker], metrics: dict[str, float], step: int) -> None:
    """One step's metrics into every tracker."""
    for t in trackers:
        t.log(metrics, step)


@contextlib.contextmanager
def open_trackers(
    specs: Sequence[str] | None, run_name: str | None = None
) -> Iterator[list[Tracker]]:
    """`with open_trackers(["tensorboard:tb"]) as ts: log_all(ts, metrics, step)`."""
    trackers = parse_log_to(specs, run_name)
    try:
        yield trackers
    finally:
        close_all(trackers)


__all__ = [
    "TRACKERS",
    "Tracker",
    "check_log_to",
    "check_spec",
    "close_all",
    "known_trackers",
    "log_all",
    "open_trackers",
    "parse_log_to",
]
