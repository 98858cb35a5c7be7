"""SkyRL plug-in: a policy loss that runs a named SkyRL loss unchanged and adds the monitor's
metrics to the metrics dict it returns.

    from mismatch_cli.integrations import skyrl as mismatch_skyrl
    mismatch_skyrl.register()            # before SkyRL starts Ray: "mismatch" wraps "regular"
    ... trainer.algorithm.policy_loss_type=mismatch generator.sampling_params.logprobs=1

Written against NovaSky-AI/SkyRL a956457 (skyrl/backends/skyrl_train/utils/ppo_utils.py):
`register_policy_loss(name)` puts a loss in `PolicyLossRegistry` (synced to a Ray actor, so
workers get it cloudpickled); the worker (workers/worker.py `_forward_backward_micro`, and
the Megatron wrapper) looks up `trainer.algorithm.policy_loss_type` and calls, once per
micro-batch, `loss_fn(log_probs, old_log_probs, advantages, config=AlgorithmConfig,
loss_mask=, rollout_logprobs=)` on right-aligned [B, R] tensors; the loss returns `(loss,
metrics: dict[str, float])`, which SkyRL logs as `policy/loss_metrics/<key>`, averaging over
micro-batches and data-parallel ranks (max for keys ending in `_max`, min for `_min`).

delta = rollout_logprobs - old_log_probs (the trainer's forward before the update; the
current `log_probs`, detached, when SkyRL skipped that forward). The wrapped loss gets the
same arguments and a copy of the config naming itself as `policy_loss_type` (SkyRL's PPO
loss checks that name); its loss and metrics are returned unchanged. SkyRL's own
`off_policy_correction` does the corrections, inside the wrapped loss.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ..monitor import StepMonitor
from .common import Guarded

PPO_UTILS = "skyrl.backends.skyrl_train.utils.ppo_utils"


def _with_loss_type(config: Any, name: str) -> Any:
    """`config` naming `name` as its policy_loss_type (a copy; the original is untouched)."""
    if getattr(config, "policy_loss_type", name) == name:
        return config
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.replace(config, policy_loss_type=name)
    out = copy.copy(config)
    out.policy_loss_type = name
    return out


class MonitoredLoss:
    """A SkyRL policy loss: `inner` (a registered loss name) plus the monitor's metrics.
    One monitor per process (each worker unpickles its own copy)."""

    def __init__(
        self,
        inner: str = "regular",
        monitor: StepMonitor | None = None,
        registry: Any = None,
    ) -> None:
        self.inner = inner
        self.guard = Guarded(monitor if monitor is not None else StepMonitor())
        self.registry = registry
        self._fn: Callable[..., Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fn"] = None  # looked up again in the worker
        return state

    @property
    def monitor(self) -> StepMonitor:
        return self.guard.monitor

    def inner_loss(self) -> Callable[..., Any]:
        """The wrapped loss, looked up once in SkyRL's registry."""
        if self._fn is None:
            registry = self.registry
            if registry is None:
                import importlib

                registry = importlib.import_module(PPO_UTILS).PolicyLossRegistry
            self._fn = registry.get(self.inner)
        return self._fn

    def __call__(
        self,
        log_probs: Any,
        old_log_probs: Any,
        advantages: Any,
        config: Any,
        loss_mask: Any = None,
        rollout_logprobs: Any = None,
    ) -> tuple[Any, dict[str, float]]:
        """SkyRL's policy-loss signature; returns the inner loss with `mismatch/...` added."""
        loss, metrics = self.inner_loss()(
            log_probs,
            old_log_probs,
            advantages,
            config=_with_loss_type(config, self.inner),
            loss_mask=loss_mask,
            rollout_logprobs=rollout_logprobs,
        )
        out = dict(metrics)
        out.update(self.measure(log_probs, old_log_probs, loss_mask, rollout_logprobs))
        return loss, out

    def measure(
        self, log_probs: Any, old_log_probs: Any, loss_mask: Any, rollout_logprobs: Any
    ) -> dict[str, float]:
        """The monitor on one micro-batch ([B, R] tensors); NaN metrics, one warning, when
        the rollout log-probs are missing or the tensors do not fit."""
        if rollout_logprobs is None:
            self.guard.warn(
                "no-rollout",
                "no rollout_logprobs (set generator.sampling_params.logprobs=1): NaN metrics",
            )
            return self.guard.nan()
        train = old_log_probs if old_log_probs is not None else log_probs
        if hasattr(train, "detach"):
            train = train.detach()
        return self.guard.update(rollout_logprobs, train, loss_mask)


def register(
    name: str = "mismatch",
    inner: str = "regular",
    monitor: StepMonitor | None = None,
    ppo_utils: ModuleType | Any = None,
) -> MonitoredLoss:
    """Register `name` with SkyRL's `register_policy_loss`, wrapping the registered loss
    `inner`; returns the loss object (its `.monitor` holds the driver's copy). `ppo_utils`:
    SkyRL's module (default: imported; SkyRL must be installed)."""
    if ppo_utils is None:
        import importlib

        ppo_utils = importlib.import_module(PPO_UTILS)
    loss = MonitoredLoss(inner, monitor, registry=ppo_utils.PolicyLossRegistry)
    ppo_utils.register_policy_loss(name)(loss)
    return loss


__all__ = ["MonitoredLoss", "register"]
