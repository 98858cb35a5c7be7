"""slime plug-in: the monitor as slime's custom TIS function.

    --get-mismatch-metrics \\
    --custom-tis-function-path mismatch_cli.integrations.slime.monitor_tis

Written against THUDM/slime 624b824 (slime/backends/megatron_utils/loss.py,
`policy_loss_function`): with `--get-mismatch-metrics` or `--use-tis`, every micro-batch
slime calls `tis_func(args=, pg_loss=, train_log_probs=, rollout_log_probs=, loss_masks=,
total_lengths=, response_lengths=)` (keyword arguments; the log-probs and masks are lists of
per-sample 1-D tensors, `pg_loss` their concatenation) and takes back `(pg_loss,
modified_masks, metrics)`. Each metric value must be a per-token tensor shaped like
`pg_loss`: slime reduces it with `sum_of_sample_mean` (per-rollout token means), sums over
micro-batches and ranks and divides by the step's rollout count, then logs it as
`train/<key>`. A monitor number v is therefore returned as v on every loss token, which that
reduction turns back into v for a step of one micro-batch (docs/integrations.md: several).

delta = rollout_log_probs - train_log_probs (`train_log_probs` is slime's recomputed
`log_probs` when present, else the current forward's, detached). Settings are slime `args`
attributes (a `--custom-config-path` YAML file sets any), else environment variables:

    mismatch_correction  MISMATCH_CORRECTION  a correction_rules method to apply (default:
                                              none, the loss and masks stay as they are)
    mismatch_set         MISMATCH_SET         its parameters, as `mismatch corrections --set`
                                              (e.g. "tis-token.C=3"; default: shipped bounds)
    mismatch_eps         MISMATCH_EPS         the monitor's eps (envelope share per step)
    mismatch_log         MISMATCH_LOG         core (default) or all: which keys slime reduces
    mismatch_sample_dir  MISMATCH_SAMPLE_DIR  keep a share of the tokens as a run directory
                                              (one per rank: <dir>/rank<R>)
    mismatch_sample_fraction  MISMATCH_SAMPLE_FRACTION  that share (default 0.1)
"""

from __future__ import annotations

import atexit
import hashlib
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..correction_rules import METHODS, parse_sets, resolve_params
from ..monitor import PREFIX, StepMonitor, TokenSampler
from .common import Guarded

APPLIED = f"{PREFIX}correction_applied"  # 1.0 on a micro-batch the correction changed, else 0.0
LOG_CHOICES = ("core", "all")
# The keys "core" leaves out (each costs slime a reduction per sample per micro-batch).
ALL_ONLY = (f"{PREFIX}bucket/", f"{PREFIX}corrections/")
RECENT = 64  # micro-batches remembered: a recomputed loss (checkpointing) is not fed twice


@dataclass(frozen=True)
class SlimeConfig:
    """The plug-in's settings (module doc): from slime's args, else the environment."""

    correction: str | None = None
    params: dict[str, float] = field(default_factory=dict)
    eps: float | None = None
    log: str = "core"
    sample_dir: str | None = None
    sample_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.correction is not None:
            m = METHODS.get(self.correction)
            if m is None or m.rule is None:
                names = [n for n, x in METHODS.items() if x.rule is not None]
                raise ValueError(
                    f"mismatch_correction {self.correction!r}: choose one of {', '.join(names)}"
                )
        if self.log not in LOG_CHOICES:
            raise ValueError(f"mismatch_log {self.log!r}: choose core or all")

    @classmethod
    def from_args(cls, args: Any) -> SlimeConfig:
        def get(attr: str) -> Any:
            v = getattr(args, attr, None)
            return os.environ.get(attr.upper()) if v is None else v

        correction = get("mismatch_correction") or None
        if correction in ("none", "None"):
            correction = None
        sets = parse_sets([str(s)]) if (s := get("mismatch_set")) else {}
        for name in sets:
            if name != correction:
                raise ValueError(
                    f"mismatch_set names {name} but mismatch_correction is {correction}"
                )
        params = resolve_params(correction, sets.get(correction)) if correction else {}
        eps, fraction = get("mismatch_eps"), get("mismatch_sample_fraction")
        return cls(
            correction=correction,
            params={k: float(v) for k, v in params.items() if v is not None},
            eps=None if eps in (None, "") else float(eps),
            log=str(get("mismatch_log") or "core"),
            sample_dir=get("mismatch_sample_dir") or None,
            sample_fraction=0.1 if fraction in (None, "") else float(fraction),
        )


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def _cp_local(
    loss_masks: Sequence[torch.Tensor],
    total_lengths: Sequence[int],
    response_lengths: Sequence[int],
) -> list[torch.Tensor]:
    """The masks cut to this context-parallel rank's chunks, as slime's
    `get_sum_of_sample_mean` cuts them (cp_utils.py at 624b824; needs slime and Megatron)."""
    try:
        from slime.backends.megatron_utils.cp_utils import get_logits_and_tokens_offset_with_cp
    except ImportError as e:
        raise ValueError(f"masks and log-probs differ in length and slime's CP helper: {e}") from e
    out = []
    for total, resp, m in zip(total_lengths, response_lengths, loss_masks, strict=True):
        prompt = total - resp
        _, _, _, tok = get_logits_and_tokens_offset_with_cp(total, resp)
        parts = [m[a - prompt : b - prompt] for a, b in tok]
        out.append(torch.cat(parts, dim=0))
    return out


@dataclass
class Packed:
    """One micro-batch as flat arrays (N = its log-prob positions, S samples)."""

    logp_infer: np.ndarray  # [N] float64
    logp_train: np.ndarray  # [N] float64
    mask: np.ndarray  # [N] bool
    lens: np.ndarray  # [S] int64
    masks: list[torch.Tensor]  # the S masks the reduction uses, each [len_i]
    cp: bool  # masks were cut to this rank's context-parallel chunks
    key: bytes  # fingerprint of the micro-batch

    @classmethod
    def of(
        cls,
        pg_loss: torch.Tensor,
        train_log_probs: Sequence[torch.Tensor],
        rollout_log_probs: Sequence[torch.Tensor],
        loss_masks: Sequence[torch.Tensor],
        total_lengths: Sequence[int] | None,
        response_lengths: Sequence[int] | None,
    ) -> Packed:
        """Raises ValueError naming what does not fit."""
        S = len(rollout_log_probs)
        if not (len(train_log_probs) == S == len(loss_masks)):
            raise ValueError(
                f"{len(train_log_probs)} train log-prob tensors, {S} rollout ones, "
                f"{len(loss_masks)} masks"
            )
        lens = np.array([int(t.numel()) for t in rollout_log_probs], np.int64)
        for i, (t, r) in enumerate(zip(train_log_probs, rollout_log_probs, strict=True)):
            if t.shape != r.shape or t.dim() != 1:
                raise ValueError(
                    f"sample {i}: train log-probs {tuple(t.shape)}, rollout {tuple(r.shape)}"
                )
        masks, cp = list(loss_masks), False
        if any(int(m.numel()) != n for m, n in zip(masks, lens, strict=True)):
            if total_lengths is None or response_lengths is None:
                raise ValueError("masks and log-probs differ in length")
            masks, cp = _cp_local(masks, total_lengths, response_lengths), True
            for i, (m, n) in enumerate(zip(masks, lens, strict=True)):
                if int(m.numel()) != n:
                    raise ValueError(f"sample {i}: mask of {m.numel()} tokens, log-probs {n}")
        if int(lens.sum()) != pg_loss.numel():
            raise ValueError(f"pg_loss holds {pg_loss.numel()} values, the log-probs {lens.sum()}")

        def cat(ts: Sequence[torch.Tensor]) -> np.ndarray:
            if not ts:
                return np.empty(0)
            return torch.cat([t.detach().reshape(-1).double() for t in ts]).cpu().numpy()

        li, lt = cat(rollout_log_probs), cat(train_log_probs)
        mask = cat([m.reshape(-1) for m in masks]) != 0
        h = hashlib.blake2b(digest_size=16)
        for a in (li, lt, mask, lens):
            h.update(a.tobytes())
        h.update(str([t.data_ptr() for t in rollout_log_probs]).encode())
        return cls(li, lt, mask, lens, masks, cp, h.digest())


class SlimeMonitor:
    """The monitor behind `monitor_tis`: a `StepMonitor` fed one micro-batch per call, its
    metrics as slime's per-token tensors, and the configured correction (if any)."""

    def __init__(self, config: SlimeConfig | None = None) -> None:
        self.config = config or SlimeConfig()
        sample = None
        if self.config.sample_dir:
            out = Path(self.config.sample_dir) / f"rank{_rank()}"
            sample = TokenSampler(out, fraction=self.config.sample_fraction)
            atexit.register(sample.close)  # a run not closed stays readable, marked incomplete
        self.monitor = StepMonitor(eps=self.config.eps, sample=sample)
        name = self.config.correction
        self.guard = Guarded(
            self.monitor,
            (APPLIED,) if name else (),
            f"; {name} is not applied to such a micro-batch" if name else "",
        )
        keep = self.config.log == "all"
        self.keys = [
            k
            for k in self.guard.keys
            if keep
            or not k.startswith(ALL_ONLY)
            or k.startswith(f"{PREFIX}corrections/{self.config.correction}/")
        ]
        self.recent: OrderedDict[bytes, dict[str, float]] = OrderedDict()

    def __call__(
        self,
        args: Any = None,
        *,
        pg_loss: torch.Tensor,
        train_log_probs: Sequence[torch.Tensor],
        rollout_log_probs: Sequence[torch.Tensor],
        loss_masks: Sequence[torch.Tensor],
        total_lengths: Sequence[int] | None = None,
        response_lengths: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, torch.Tensor]]:
        """slime's TIS-function contract (module doc). Never raises on the step's data."""
        masks = list(loss_masks)
        try:
            packed = Packed.of(
                pg_loss,
                train_log_probs,
                rollout_log_probs,
                loss_masks,
                total_lengths,
                response_lengths,
            )
        except Exception as e:  # never the trainer's step
            self.guard.warn("shape", f"micro-batch not measured ({e}); NaN metrics, loss unchanged")
            return pg_loss, masks, self._tensors(self.guard.nan(), pg_loss, None)
        values = self.recent.get(packed.key)
        if values is None:
            values = self.guard.update(
                packed.logp_infer, packed.logp_train, packed.mask, seq_lens=packed.lens
            )
            self.recent[packed.key] = values
            while len(self.recent) > RECENT:
                self.recent.popitem(last=False)
            fresh = True
        else:
            fresh = False  # the same micro-batch again (a recomputed loss): not fed twice
        if self.config.correction:
            pg_loss, masks, applied = self._correct(pg_loss, masks, packed)
            if fresh:
                values[APPLIED] = 1.0 if applied else 0.0
        return pg_loss, masks, self._tensors(values, pg_loss, packed)

    def _correct(
        self, pg_loss: torch.Tensor, masks: list[torch.Tensor], p: Packed
    ) -> tuple[torch.Tensor, list[torch.Tensor], bool]:
        """The configured rule on the micro-batch's tokens: pg_loss times each token's weight,
        masked tokens dropped from the returned masks. Skipped (loss and masks unchanged,
        one warning) when a token's delta is not finite or a log-prob is above 0, and under
        context parallelism (a rank holds only chunks of each sequence)."""
        name = self.config.correction
        if p.cp:
            self.guard.warn("cp", f"{name} not applied under context parallelism")
            return pg_loss, masks, False
        li, lt = p.logp_infer[p.mask], p.logp_train[p.mask]
        delta = li - lt
        if not np.isfinite(delta).all() or (li > 0).any() or (lt > 0).any():
            return pg_loss, masks, False  # the monitor's warning says so
        if not delta.size:
            return pg_loss, masks, False
        seq = np.repeat(np.arange(p.lens.size), p.lens)[p.mask]
        _, seq = np.unique(seq, return_inverse=True)
        rule = METHODS[name].rule
        assert rule is not None
        applied = rule(delta, seq.astype(np.int64), **self.config.params)
        weight = np.ones(p.mask.size)
        weight[p.mask] = applied.weight
        drop = np.zeros(p.mask.size, bool)
        drop[np.flatnonzero(p.mask)[applied.masked]] = True
        w = torch.as_tensor(weight, dtype=pg_loss.dtype, device=pg_loss.device)
        keep = torch.as_tensor(~drop, device=pg_loss.device).split(p.lens.tolist())
        new_masks = [m * k.to(m.dtype) for m, k in zip(masks, keep, strict=True)]
        return pg_loss * w, new_masks, True

    def _tensors(
        self, values: dict[str, float], pg_loss: torch.Tensor, p: Packed | None
    ) -> dict[str, torch.Tensor]:
        """Each value v as a float32 tensor shaped like pg_loss: v on the loss tokens, 0
        elsewhere (so an infinite v stays infinite through the masked reduction)."""
        out = {}
        on = None
        if p is not None and p.mask.size == pg_loss.numel():
            on = torch.as_tensor(p.mask, device=pg_loss.device).reshape(pg_loss.shape)
        for k in self.keys:
            v = values.get(k, math.nan)
            full = torch.full(pg_loss.shape, v, dtype=torch.float32, device=pg_loss.device)
            out[k] = full if on is None else torch.where(on, full, 0.0)
        return out


_MONITOR: SlimeMonitor | None = None


def get_monitor(args: Any = None) -> SlimeMonitor:
    """This process's monitor, built from `args` (and the environment) on first use."""
    global _MONITOR
    if _MONITOR is None:
        _MONITOR = SlimeMonitor(SlimeConfig.from_args(args))
    return _MONITOR


def reset() -> None:
    """Forget this process's monitor (the next call builds a new one)."""
    global _MONITOR
    _MONITOR = None


def monitor_tis(
    args: Any = None,
    *,
    pg_loss: torch.Tensor,
    train_log_probs: Sequence[torch.Tensor],
    rollout_log_probs: Sequence[torch.Tensor],
    loss_masks: Sequence[torch.Tensor],
    total_lengths: Sequence[int] | None = None,
    response_lengths: Sequence[int] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, torch.Tensor]]:
    """slime's `--custom-tis-function-path` target (module doc): the monitor's metrics
    under `mismatch/...`, the loss and masks unchanged unless `mismatch_correction` is set."""
    return get_monitor(args)(
        args,
        pg_loss=pg_loss,
        train_log_probs=train_log_probs,
        rollout_log_probs=rollout_log_probs,
        loss_masks=loss_masks,
        total_lengths=total_lengths,
        response_lengths=response_lengths,
        **kwargs,
    )


__all__ = ["SlimeConfig", "SlimeMonitor", "get_monitor", "monitor_tis", "reset"]
