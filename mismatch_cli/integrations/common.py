"""What every plug-in needs around a `StepMonitor`: an update that never fails the trainer's
step, one warning per kind of bad input, and the same metric keys on every call.

Trainers reduce metrics across micro-batches and data-parallel ranks by key (slime stacks
the values into one tensor and all-reduces it; SkyRL all-reduces a dict), so every call must
return the same keys in the same order even when a micro-batch holds no token or its
tensors do not fit: `Guarded.keys` is the key set of a step with tokens (found once on a
throwaway copy of the monitor), and a key the monitor did not give this time is NaN.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from typing import Any

import numpy as np

from ..monitor import PREFIX, StepMonitor


class MonitorWarning(RuntimeWarning):
    """A plug-in could not measure (part of) a step; the trainer's step goes on unchanged."""


def probe_keys(monitor: StepMonitor) -> list[str]:
    """The keys `monitor.update` returns on a step with tokens (no logits), in order, from a
    throwaway copy fed two sequences (the monitor itself is untouched)."""
    probe = dataclasses.replace(
        monitor, alert=copy.deepcopy(monitor.alert), sample=None, history=()
    )
    lt = np.log(np.array([[0.5, 0.2, 0.9], [0.3, 0.6, 0.8]]))
    return list(probe.update(lt + 0.01, lt))


class Guarded:
    """A `StepMonitor` whose `update` never raises: bad input warns once per kind
    (`MonitorWarning`) and gives NaN metrics; the result always has the keys `keys`."""

    def __init__(
        self, monitor: StepMonitor, extra_keys: tuple[str, ...] = (), note: str = ""
    ) -> None:
        self.monitor = monitor
        self.keys = probe_keys(monitor) + list(extra_keys)
        self.note = note  # appended to the warnings on unusable tokens
        self.warned: set[str] = set()

    def warn(self, kind: str, message: str) -> None:
        """Warn once per `kind` for the life of the plug-in."""
        if kind not in self.warned:
            self.warned.add(kind)
            warnings.warn(f"mismatch monitor: {message}", MonitorWarning, stacklevel=3)

    def nan(self) -> dict[str, float]:
        return dict.fromkeys(self.keys, math.nan)

    def fill(self, out: dict[str, float]) -> dict[str, float]:
        """`out` on the fixed key set (missing keys NaN; keys outside it dropped)."""
        return {k: float(out.get(k, math.nan)) for k in self.keys}

    def update(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """`StepMonitor.update(*args, **kwargs)` on the fixed key set; on an error (shapes
        that do not fit, anything else) one warning and NaN metrics. Steps whose tokens are
        partly unusable warn once per kind and keep the documented counts."""
        try:
            out = self.monitor.update(*args, **kwargs)
        except Exception as e:  # never the trainer's step: every failure is a NaN step
            self.warn(type(e).__name__, f"step not measured ({type(e).__name__}: {e}); NaN metrics")
            return self.nan()
        if out.get(f"{PREFIX}num_tokens") == 0:
            self.warn("empty", "a step with no token under the mask: NaN metrics")
        if out.get(f"{PREFIX}num_infinite", 0) > 0:
            self.warn(
                "infinite",
                "non-finite log-probs (NaN or infinite delta): left out of every mean, "
                f"counted in {PREFIX}num_infinite{self.note}",
            )
        if out.get(f"{PREFIX}num_logp_above_0", 0) > 0:
            self.warn(
                "above0",
                "log-probs above 0 (not log-probabilities?): counted in "
                f"{PREFIX}num_logp_above_0{self.note}",
            )
        return self.fill(out)


__all__ = ["Guarded", "MonitorWarning", "probe_keys"]
