"""The SkyRL plug-in (`integrations.skyrl.register`) against a stand-in for SkyRL's registry
and PPO loss with the signatures of NovaSky-AI/SkyRL a956457 (SkyRL itself needs Ray and
GPU packages): `register_policy_loss` and `PolicyLossRegistry.register/get` as in
skyrl/backends/skyrl_train/utils/ppo_utils.py without the Ray actor, `ppo_policy_loss`'s
signature, name check and return `(loss, {"clip_ratio": float})`, the worker's call
(workers/worker.py `_forward_backward_micro`) and `reduce_metrics` (workers/worker_utils.py)."""

from __future__ import annotations

import math
import pickle
import warnings
from dataclasses import dataclass
from functools import wraps
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from mismatch_cli.integrations import skyrl as K
from mismatch_cli.integrations.common import MonitorWarning
from mismatch_cli.monitor import StepMonitor

# ------------------------------------------------------------ stand-in for SkyRL a956457


class PolicyLossRegistry:
    """BaseFunctionRegistry.register / get, the local (no Ray) path."""

    _functions: ClassVar[dict[str, Any]] = {}

    @classmethod
    def register(cls, name: str, func: Any) -> None:
        if name in cls._functions:
            raise ValueError(f"policy loss '{name}' already registered")
        cls._functions[name] = func

    @classmethod
    def get(cls, name: str) -> Any:
        if name not in cls._functions:
            raise ValueError(f"Unknown policy loss '{name}'. Available: {list(cls._functions)}")
        return cls._functions[name]


def register_policy_loss(name: str):
    def decorator(func):
        @wraps(func)
        def wrapper(*args, **kwargs):
            return func(*args, **kwargs)

        PolicyLossRegistry.register(name, wrapper)
        return wrapper

    return decorator


@dataclass
class AlgorithmConfig:
    """The fields of skyrl.train.config.AlgorithmConfig the PPO loss reads."""

    policy_loss_type: str = "regular"
    eps_clip_low: float = 0.2
    eps_clip_high: float = 0.2


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x.mean() if mask is None else (x * mask).sum() / mask.sum().clamp(min=1)


@register_policy_loss("regular")
def ppo_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    config: AlgorithmConfig,
    loss_mask: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    assert config.policy_loss_type in ["regular", "dual_clip"], "loss_type must be either 'regular' or 'dual_clip'"  # fmt: skip
    ratio = torch.exp((log_probs - old_log_probs).clamp(-20, 20))
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1 - config.eps_clip_low, 1 + config.eps_clip_high) * advantages
    loss = -torch.min(surr1, surr2)
    clip_ratio = masked_mean((-surr2 > -surr1).float(), loss_mask).mean().detach().item()
    loss = (loss * loss_mask).sum() if loss_mask is not None else loss.sum()
    return loss, {"clip_ratio": clip_ratio}


PPO_UTILS = SimpleNamespace(
    PolicyLossRegistry=PolicyLossRegistry, register_policy_loss=register_policy_loss
)


def reduce_metrics(metrics: dict[str, list[float]]) -> dict[str, float]:
    """worker_utils.reduce_metrics (sum_loss_metrics=True): mean, max/min by suffix."""
    out = {}
    for k, v in metrics.items():
        if not all(isinstance(x, (int, float)) for x in v):
            continue
        if k.endswith("_max"):
            out[k] = max(v)
        elif k.endswith("_min"):
            out[k] = min(v)
        elif k == "loss" or k.endswith("_loss"):
            out[k] = sum(v)
        else:
            out[k] = sum(v) / len(v)
    return out


def micro_batch(seed: int = 0, B: int = 3, R: int = 8) -> dict[str, torch.Tensor]:
    """[B, R] tensors, right-aligned as at a956457: response i fills the last r_i columns."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(3, R + 1, B)
    mask = torch.zeros(B, R)
    for b, n in enumerate(lens):
        mask[b, R - n :] = 1.0
    old = torch.tensor(np.log(rng.uniform(0.02, 1, (B, R))), dtype=torch.float32) * mask
    rollout = (old + torch.tensor(rng.normal(0, 0.05, (B, R)), dtype=torch.float32)).clamp(max=0)
    cur = old + torch.tensor(rng.normal(0, 0.02, (B, R)), dtype=torch.float32)
    return {
        "log_probs": cur.requires_grad_(True),
        "old_log_probs": old,
        "advantages": torch.tensor(rng.normal(0, 1, (B, 1)), dtype=torch.float32).expand(B, R),
        "loss_mask": mask,
        "rollout_logprobs": rollout * mask,
    }


def worker_call(name: str, mb: dict, config: AlgorithmConfig) -> tuple[torch.Tensor, dict]:
    """How the worker calls the configured loss (positional tensors, keyword rest)."""
    fn = PolicyLossRegistry.get(name)
    return fn(
        mb["log_probs"], mb["old_log_probs"], mb["advantages"], config=config,
        loss_mask=mb["loss_mask"], rollout_logprobs=mb["rollout_logprobs"],
    )  # fmt: skip


@pytest.fixture
def registered():
    loss = K.register("mismatch", "regular", ppo_utils=PPO_UTILS)
    yield loss
    PolicyLossRegistry._functions.pop("mismatch", None)


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)


# ------------------------------------------------------------------------------------ tests


def test_the_wrapped_loss_is_unchanged_and_the_metrics_equal_a_monitor(registered) -> None:
    """policy_loss_type=mismatch: the loss (value and gradient) is the PPO loss's, its
    clip_ratio is kept, and the mismatch/ keys equal a StepMonitor fed the same [B, R]
    tensors (rollout vs old log-probs); every value is a float, as SkyRL's reduction needs."""
    mb = micro_batch()
    loss, metrics = worker_call("mismatch", mb, AlgorithmConfig(policy_loss_type="mismatch"))
    (g,) = torch.autograd.grad(loss, mb["log_probs"])
    want_loss, want_m = ppo_policy_loss(
        mb["log_probs"], mb["old_log_probs"], mb["advantages"], config=AlgorithmConfig(),
        loss_mask=mb["loss_mask"], rollout_logprobs=mb["rollout_logprobs"],
    )  # fmt: skip
    (want_g,) = torch.autograd.grad(want_loss, mb["log_probs"])
    assert torch.equal(loss, want_loss) and torch.equal(g, want_g)
    assert metrics["clip_ratio"] == want_m["clip_ratio"]
    direct = StepMonitor().update(mb["rollout_logprobs"], mb["old_log_probs"], mb["loss_mask"])
    for k, v in direct.items():
        assert same(metrics[k], v), k
    assert all(type(v) is float for v in metrics.values())
    assert registered.monitor.num_steps == 1


def test_micro_batches_reduce_by_skyrl_rules(registered) -> None:
    """Two micro-batches through SkyRL's reduce_metrics: means, and max for `_max` keys;
    the same keys every time (DP ranks all-reduce them key by key)."""
    cfg = AlgorithmConfig(policy_loss_type="mismatch")
    outs = [worker_call("mismatch", micro_batch(s), cfg)[1] for s in (1, 2)]
    assert list(outs[0]) == list(outs[1])
    red = reduce_metrics({k: [o[k] for o in outs] for k in outs[0]})
    assert red["mismatch/k3"] == pytest.approx(
        (outs[0]["mismatch/k3"] + outs[1]["mismatch/k3"]) / 2
    )
    assert red["mismatch/is_seq_max"] == max(o["mismatch/is_seq_max"] for o in outs)


def test_the_loss_pickles_without_its_looked_up_function(registered) -> None:
    """SkyRL ships registered losses to its workers pickled: the wrapped loss is looked up
    again there, and each worker gets its own copy of the (fresh) monitor."""
    worker_call("mismatch", micro_batch(), AlgorithmConfig(policy_loss_type="mismatch"))
    copy = pickle.loads(pickle.dumps(registered))
    assert copy._fn is None and copy.inner == "regular" and copy.monitor.num_steps == 1
    _, m = copy(**micro_batch(3), config=AlgorithmConfig(policy_loss_type="mismatch"))
    assert "mismatch/k3" in m and copy.monitor.num_steps == 2


def test_registering_a_name_twice_is_skyrls_error(registered) -> None:
    with pytest.raises(ValueError, match="already registered"):
        K.register("mismatch", ppo_utils=PPO_UTILS)


def _bad(kind: str) -> dict:
    mb = micro_batch(4)
    if kind == "shapes":
        mb["rollout_logprobs"] = mb["rollout_logprobs"][:, :-2]
    elif kind == "empty":
        mb["loss_mask"] = torch.zeros_like(mb["loss_mask"])
    elif kind == "nan":
        mb["old_log_probs"][0, -1] = float("nan")
    elif kind == "above0":
        mb["rollout_logprobs"][1, -1] = 0.1
    elif kind == "no-rollout":
        mb["rollout_logprobs"] = None
    return mb


@pytest.mark.parametrize("kind", ["shapes", "empty", "nan", "above0", "no-rollout"])
def test_bad_input_warns_once_and_leaves_the_loss_alone(kind: str, registered) -> None:
    """Mismatched shapes, a mask with no token, a NaN log-prob, a log-prob above 0, no rollout
    log-probs: the step goes on, one MonitorWarning however often, the loss is the PPO
    loss's, the keys are a good micro-batch's; NaN metrics or the documented counts."""
    cfg = AlgorithmConfig(policy_loss_type="mismatch")
    keys = list(worker_call("mismatch", micro_batch(5), cfg)[1])
    mb = _bad(kind)
    want_loss, _ = ppo_policy_loss(
        mb["log_probs"], mb["old_log_probs"], mb["advantages"], config=AlgorithmConfig(),
        loss_mask=mb["loss_mask"], rollout_logprobs=mb["rollout_logprobs"],
    )  # fmt: skip
    with pytest.warns(MonitorWarning) as rec:
        loss, m = worker_call("mismatch", mb, cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("error", MonitorWarning)
            worker_call("mismatch", _bad(kind), cfg)
    assert len(rec) == 1
    assert torch.equal(loss, want_loss) or (torch.isnan(loss) and torch.isnan(want_loss))
    assert list(m) == keys
    if kind in ("shapes", "empty", "no-rollout"):
        assert math.isnan(m["mismatch/k3"])
    else:
        key = "mismatch/num_infinite" if kind == "nan" else "mismatch/num_logp_above_0"
        assert m[key] == 1.0 and math.isfinite(m["mismatch/k3"])


def test_without_old_log_probs_the_current_ones_stand_in() -> None:
    """SkyRL skips the old-log-prob forward for some losses: the current log-probs
    (detached) are the training side then."""
    loss = K.MonitoredLoss("regular", registry=PolicyLossRegistry)
    mb = micro_batch(6)
    got = loss.measure(mb["log_probs"], None, mb["loss_mask"], mb["rollout_logprobs"])
    want = StepMonitor().update(mb["rollout_logprobs"], mb["log_probs"].detach(), mb["loss_mask"])
    assert same(got["mismatch/k3"], want["mismatch/k3"])
