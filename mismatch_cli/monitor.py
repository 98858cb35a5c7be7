"""The mismatch inside a trainer, step by step: `StepMonitor.update(logp_infer, logp_train,
mask)` on the tensors a trainer already holds, returning a flat dict of metrics under
`mismatch/...` keys for the trainer's own logger.

Every number comes from the functions `mismatch report` and `mismatch corrections` use (one
definition of each): a step's tokens go through `aggregates.Batch` into an
`aggregates.Aggregates` (the step's own, and the run's, which grows step by step) and
through `corrections.SequenceStream` (every correction rule at its shipped bounds).
`summary()` therefore equals `report --json` (with `--eps` the monitor's eps) and
`corrections --json` (the rows without DVP) on a run directory of the same tokens.

Conventions: delta = logp_infer - logp_train (nats), p_train = exp(logp_train); a token is a
position where mask is true (a model-generated token that carries loss); each row of a
[B, T] batch (or each segment of a packed 1-D batch, `seq_lens`) is one sequence. A
non-finite delta (NaN or infinite log-probs) is counted in `mismatch/num_infinite` and left
out of every mean, as in `report`; a log-prob above 0 is counted in
`mismatch/num_logp_above_0` (its p lies outside [0, 1]: outside every bucket). A step with
no token gives NaN metrics and `mismatch/num_tokens` 0. Shapes that do not match raise a
ValueError naming them; the plug-ins (`integrations/`) catch it, warn once and leave the
trainer's step alone.

Imports neither vLLM nor transformers; torch only to read tensors (numpy arrays work too).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .aggregates import DEFAULT_EDGES, DEFAULT_TAIL, Aggregates, Batch, parse_edges
from .corrections import SequenceStream
from .quantiles import EXACT_LIMIT, QuantileAccumulator

PREFIX = "mismatch/"
# The report metrics every step logs (their names in `report --json`'s `metrics`).
STEP_METRICS: tuple[str, ...] = (
    "k1", "k2", "k3", "mean_delta", "mean_abs_delta", "max_abs_delta", "p99_abs_delta",
    "chi2_token", "ess_token", "ess_seq", "is_seq_max", "frac_ratio_outside_0.5_2",
    "mean_abs_dp", "log_ppl_gap_mean",
)  # fmt: skip
# What each correction logs per step: the shares it would mask or clip.
CORRECTION_KEYS: tuple[str, ...] = ("tokens_masked", "sequences_masked", "tokens_clipped")
# Logit values per chunk of the DVP pass (2^22 float32: 16 MiB, a few hundred KiB per row).
DVP_CHUNK = 1 << 22


def _array(x: Any, dtype: Any) -> np.ndarray:
    """A torch tensor (any device, any float dtype) or array-like as a numpy array."""
    if hasattr(x, "detach"):
        t = x.detach()
        if t.is_floating_point():
            t = t.float()
        x = t.cpu().numpy()
    return np.asarray(x, dtype=dtype)


@dataclass
class Tokens:
    """A step's tokens, flat: the positions where mask is true, sequence by sequence."""

    logp_infer: np.ndarray  # [n] float64
    logp_train: np.ndarray  # [n] float64
    seq: np.ndarray  # [n] int64, 0..k-1: the step's sequences with at least one token
    pos: np.ndarray  # [n] int64, position in its row (or segment)
    row: np.ndarray  # [k] int64, the row (segment) of each sequence
    num_rows: int  # B (rows or segments given, with or without a token)
    index: np.ndarray  # [n] int64, each token's index into the flattened log-probs

    @property
    def n(self) -> int:
        return int(self.seq.size)


def flatten(
    logp_infer: Any, logp_train: Any, mask: Any = None, seq_lens: Sequence[int] | Any = None
) -> Tokens:
    """The tokens of a padded [B, T] batch (mask [B, T], true = a token carrying loss;
    None: every position) or of a packed 1-D batch of B segments (`seq_lens` [B], summing
    to its length; mask [N] or None). Raises ValueError when the shapes do not match."""
    li = _array(logp_infer, np.float64)
    lt = _array(logp_train, np.float64)
    if li.shape != lt.shape:
        raise ValueError(f"logp_infer has shape {li.shape} but logp_train {lt.shape}")
    m = np.ones(li.shape, bool) if mask is None else _array(mask, np.float64) != 0
    if m.shape != li.shape:
        raise ValueError(f"mask has shape {m.shape} but the log-probs {li.shape}")
    if seq_lens is not None:
        lens = _array(seq_lens, np.int64).reshape(-1)
        if li.ndim != 1:
            raise ValueError(f"seq_lens is for packed 1-D log-probs, got shape {li.shape}")
        if (lens < 0).any() or int(lens.sum()) != li.size:
            raise ValueError(
                f"seq_lens sum to {int(lens.sum())} but the packed log-probs hold {li.size}"
            )
        row_of = np.repeat(np.arange(lens.size), lens)  # [N]
        pos = np.arange(li.size) - np.repeat(np.cumsum(lens) - lens, lens)
        B = int(lens.size)
    else:
        if li.ndim == 1:
            li, lt, m = li[None], lt[None], m[None]
        if li.ndim != 2:
            raise ValueError(
                f"log-probs must be [B, T] (or packed 1-D with seq_lens), got {li.shape}"
            )
        B, T = li.shape
        row_of = np.repeat(np.arange(B), T)
        pos = np.tile(np.arange(T), B)
        li, lt, m = li.reshape(-1), lt.reshape(-1), m.reshape(-1)
    keep = np.flatnonzero(m)
    rows = row_of[keep]
    present, seq = np.unique(rows, return_inverse=True)
    return Tokens(li[keep], lt[keep], seq.astype(np.int64), pos[keep], present, B, keep)


class DriftDetector:
    """An alarm before the reward falls: a one-sided CUSUM on each watched metric against
    its first `warmup` steps.

    For a metric x (k3 on a log scale, the tail's share of |delta| as is), the first
    `warmup` finite values give a baseline mean mu and spread sigma (their standard
    deviation, floored at `min_rel_sigma` * |mu| so a flat start does not make every wiggle
    an alarm); then z_t = (x_t - mu) / sigma and S_t = max(0, S_{t-1} + z_t - slack). The
    alarm is raised while S_t > threshold: a rise sustained over several steps of more than
    `slack` sigmas (a slack of 1 sigma keeps the error of a 20-step baseline from adding up
    to an alarm on a stationary stream). Measured on synthetic streams in tests/test_monitor.py (docs/integrations.md
    quotes them): on a stationary stream the false-alarm rate and on a ramp the delay."""

    def __init__(
        self,
        keys: Sequence[str] = ("k3", "tail_abs_delta_share"),
        warmup: int = 20,
        slack: float = 1.0,
        threshold: float = 8.0,
        min_rel_sigma: float = 0.05,
        log_keys: Sequence[str] = ("k3",),
    ) -> None:
        self.keys, self.warmup = tuple(keys), int(warmup)
        self.slack, self.threshold, self.min_rel_sigma = slack, threshold, min_rel_sigma
        self.log_keys = set(log_keys)
        self._seen: dict[str, list[float]] = {k: [] for k in self.keys}
        self._base: dict[str, tuple[float, float, float]] = {}  # key: (mu, sigma, mu raw)
        self.cusum = dict.fromkeys(self.keys, 0.0)
        self.reason: str | None = None

    def _x(self, key: str, v: float) -> float:
        if key in self.log_keys:
            return math.log(v) if v > 0 else math.nan
        return v

    def update(self, metrics: dict[str, float]) -> bool:
        """Feed one step's metrics (report names); True while the alarm is raised. `reason`
        says which metric rose, from what to what."""
        raised = []
        for k in self.keys:
            v = metrics.get(k, math.nan)
            x = self._x(k, v) if v is not None else math.nan
            if not math.isfinite(x):
                continue
            if k not in self._base:
                self._seen[k].append(x)
                if len(self._seen[k]) >= self.warmup:
                    a = np.asarray(self._seen[k])
                    mu = float(a.mean())
                    raw = float(np.exp(a).mean()) if k in self.log_keys else mu
                    scale = abs(mu) if k not in self.log_keys else 1.0
                    sigma = max(float(a.std(ddof=1)), self.min_rel_sigma * scale, 1e-12)
                    self._base[k] = (mu, sigma, raw)
                continue
            mu, sigma, raw = self._base[k]
            self.cusum[k] = max(0.0, self.cusum[k] + (x - mu) / sigma - self.slack)
            if self.cusum[k] > self.threshold:
                raised.append(
                    f"{k} rose from {raw:.3g} (first {self.warmup} steps) to {v:.3g} "
                    f"(CUSUM {self.cusum[k]:.1f} > {self.threshold:g})"
                )
        self.reason = "; ".join(raised) if raised else None
        return bool(raised)


@dataclass
class StepMonitor:
    """The monitor a trainer calls once per step (module doc).

    edges / tail: the report's probability buckets and tail threshold; eps: the logit
    perturbation size of the (1 - p) envelope whose exceedance each step reports (None: no
    envelope share, only the eps the step needs at q99); corrections: the correction methods
    to replay (None: every one but DVP); rho: the DVP threshold of `update(logits=...)`;
    alert: the drift detector (None: none); sample: a `TokenSampler` keeping a share of the
    raw tokens as a run directory; history: the last `history_limit` steps' metric dicts
    (bounded: slime and SkyRL call once per micro-batch, for the life of the run)."""

    edges: Sequence[float] = DEFAULT_EDGES
    tail: float = DEFAULT_TAIL
    eps: float | None = None
    corrections: Sequence[str] | None = None
    rho: float = 1e-4
    alert: DriftDetector | None = field(default_factory=DriftDetector)
    sample: Any = None
    exact_limit: int = EXACT_LIMIT
    history_limit: int = 1000
    history: deque[dict[str, float]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.edges = parse_edges(self.edges)
        if not 0 < self.tail <= 1:
            raise ValueError(f"tail must be in (0, 1], got {self.tail}")
        if self.eps is not None and not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps}")
        if not 0 < self.rho < 1:
            raise ValueError(f"rho must be in (0, 1), got {self.rho}")
        if self.history_limit < 1:
            raise ValueError(f"history_limit must be >= 1, got {self.history_limit}")
        self.history = deque(self.history, maxlen=self.history_limit)
        self.alert_steps: list[int] = []  # every step that raised the alert, not only recent
        self.run = self._aggregates(np.empty(0, np.int64))
        self.stream = SequenceStream(self.corrections, edges=self.edges)
        self.num_steps = 0
        self.num_logp_above_0 = 0
        self._next_seq = 0

    def _aggregates(self, seq_ids: np.ndarray) -> Aggregates:
        agg = Aggregates(
            self.edges, "train", self.tail, seq_ids, QuantileAccumulator(1), (), self.exact_limit
        )
        if self.eps is not None:
            agg.set_eps(self.eps, "the monitor's eps")
        return agg

    def update(
        self,
        logp_infer: Any,
        logp_train: Any,
        mask: Any = None,
        *,
        step: int | None = None,
        seq_lens: Any = None,
        logits: Any = None,
        token_ids: Any = None,
    ) -> dict[str, float]:
        """Add a step's tokens; return its metrics (flat, `mismatch/` keys). Shapes: [B, T]
        log-probs and mask (right-padded), or packed 1-D with `seq_lens`. `logits` (the
        training side's, [B, T, V] or [N, V], same positions as the log-probs) adds DVP's
        pruned mass at `rho`; `token_ids` (same shape as the log-probs) goes to the sampler."""
        tok = flatten(logp_infer, logp_train, mask, seq_lens)
        step = self.num_steps if step is None else int(step)
        self.num_steps += 1
        delta = tok.logp_infer - tok.logp_train  # [n]
        with np.errstate(over="ignore"):
            p_train, p_infer = np.exp(tok.logp_train), np.exp(tok.logp_infer)
        above0 = int(np.count_nonzero((tok.logp_infer > 0) | (tok.logp_train > 0)))
        self.num_logp_above_0 += above0
        k = int(tok.row.size)
        ids = np.arange(self._next_seq, self._next_seq + k)
        self._next_seq += k
        rows = {"delta": delta, "p_train": p_train, "p_infer": p_infer}
        step_agg = self._aggregates(ids)
        self.run.extend_sequences(ids)
        if tok.n:
            step_agg.add(Batch(rows, tok.seq, "train", self.edges))
            self.run.add(Batch(rows, tok.seq + int(ids[0]), "train", self.edges))
        out = self._step_metrics(step_agg, step, above0, tok)
        if tok.n:
            corr = self.stream.add(delta, tok.seq, p_train)
            for name, res in corr.items():
                if name:
                    for key in CORRECTION_KEYS:
                        out[f"{PREFIX}corrections/{name}/{key}"] = _float(res[key])
        if logits is not None and tok.n:
            out.update(self._pruned_mass(logits, tok))
        if self.alert is not None:
            raised = self.alert.update({k.removeprefix(PREFIX): v for k, v in out.items()})
            out[f"{PREFIX}alert"] = 1.0 if raised else 0.0
            if raised:
                self.alert_steps.append(step)
            for key, s in self.alert.cusum.items():
                out[f"{PREFIX}alert/cusum_{key}"] = float(s)
        if self.sample is not None:
            self.sample.add(step, tok, delta, token_ids, seq_lens)
        self.history.append(out)
        return out

    def _step_metrics(
        self, agg: Aggregates, step: int, above0: int, tok: Tokens
    ) -> dict[str, float]:
        from .analysis import report

        nan = math.nan
        out: dict[str, float] = {
            f"{PREFIX}step": float(step),
            f"{PREFIX}num_tokens": float(tok.n),
            f"{PREFIX}num_sequences": float(tok.row.size),
            f"{PREFIX}num_infinite": float(agg.num_infinite),
            f"{PREFIX}num_logp_above_0": float(above0),
        }
        if not tok.n or not agg.num_finite:
            for key in STEP_METRICS:
                out[PREFIX + key] = nan
            return out
        rep = report(agg)
        m = rep["metrics"]
        for key in STEP_METRICS:
            out[PREFIX + key] = _float(m[key])
        tl = rep["tail"]
        out[f"{PREFIX}tail_abs_delta_share"] = _float(tl["abs_delta_share"])
        out[f"{PREFIX}tail_token_share"] = _float(tl["token_share"])
        out[f"{PREFIX}tail_mean_delta"] = _float(tl["mean_delta"])
        out[f"{PREFIX}tail_z_vs_head"] = _float(tl["z_diff"])
        out[f"{PREFIX}eps_needed_q99"] = _float(rep["eps_needed_q99"])
        if self.eps is not None:
            out[f"{PREFIX}frac_above_envelope"] = _float(rep["envelope"]["exact"]["frac_above"])
        for b in rep["buckets"]:
            lab = _bucket_key(b["lo"], b["hi"])
            out[f"{PREFIX}bucket/{lab}/mean_abs_delta"] = _float(b["mean_abs_delta"])
            out[f"{PREFIX}bucket/{lab}/num_tokens"] = float(b["count"])
        return out

    def _pruned_mass(self, logits: Any, tok: Tokens) -> dict[str, float]:
        """DVP at rho (min-p rule, `dvp.pruned_mass`) on the training side's logits at the
        step's tokens ([..., V], the log-probs' positions): the mean pruned mass per token,
        and the share of sampled tokens outside the safe set (vLLM's min-p comparison on
        the sampled token's p_train = exp(logp_train)). One float32 softmax per position
        serves the mask, the mass and max p, `DVP_CHUNK` values at a time (rows are
        independent: the numbers equal one pass over all rows)."""
        import torch

        from .dvp import pruned_mass_from_probs

        z = logits.detach() if hasattr(logits, "detach") else torch.as_tensor(logits)
        flat = z.reshape(-1, z.shape[-1])
        if flat.shape[0] <= int(tok.index.max()):
            raise ValueError(
                f"logits hold {flat.shape[0]} positions but the log-probs {int(tok.index.max()) + 1}"
            )
        index = torch.as_tensor(tok.index, device=flat.device)
        step = max(1, DVP_CHUNK // flat.shape[1])
        mass, p_max = np.empty(tok.n), np.empty(tok.n, np.float32)  # [n]
        for a in range(0, tok.n, step):
            probs = torch.softmax(flat[index[a : a + step]].float(), dim=-1)  # [rows, V]
            p_max[a : a + step] = probs.amax(dim=-1).cpu().numpy()
            m = pruned_mass_from_probs(probs, self.rho, inplace=True)  # probs zeroed where kept
            mass[a : a + step] = m.double().cpu().numpy()
        outside = np.exp(tok.logp_train).astype(np.float32) < np.float32(self.rho) * p_max
        return {
            f"{PREFIX}dvp/pruned_mass_mean": float(mass.mean()),
            f"{PREFIX}dvp/tokens_outside": float(outside.mean()),
            f"{PREFIX}dvp/rho": float(self.rho),
        }

    def summary(self) -> dict[str, Any]:
        """The whole run so far: `report` (the dict `report --json` gives for a run of the
        same tokens, with --eps the monitor's eps), `corrections` (the method rows of
        `corrections --json`, DVP aside), the steps, the alerts raised."""
        from .analysis import report

        rep = report(self.run) if self.run.num_tokens and self.run.num_finite else None
        return {
            "num_steps": self.num_steps,
            "num_tokens": self.run.num_tokens,
            "num_logp_above_0": self.num_logp_above_0,
            "report": rep,
            "corrections": self.stream.rows() if self.stream.num_tokens else [],
            "alert_steps": list(self.alert_steps),
        }

    def close(self) -> Path | None:
        """Finish the sampled run directory (if sampling); returns its path."""
        return self.sample.close() if self.sample is not None else None


class TokenSampler:
    """A share of each step's sequences kept as a run directory, so every command that reads
    runs (report, report --group-by step, plot with the drift figure, corrections, compare)
    works on the trained run afterwards. Rows: seq_id, pos, token_id (when `update` gets
    token_ids), logp_infer, logp_train and the derived columns, step; no top-K, eps_hat or
    pruned-mass grid (the trainer's tensors hold none), so `sweep-threshold` needs a rescore.
    One part file per step; `close()` writes the tables and marks the run complete (a run
    that was not closed stays incomplete, and every command says so)."""

    def __init__(self, out: str | Path, fraction: float = 0.1, seed: int = 0) -> None:
        from .runs import RunDir, check_out, new_meta

        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.run = RunDir(Path(out))
        check_out(self.run.path, overwrite=False)
        self.fraction = float(fraction)
        self.rng = np.random.default_rng(seed)
        self.parts = 0
        self.next_seq = 0
        self.seq_parts: list[Any] = []
        self.meta = new_meta(
            "monitor",
            source={"format": "monitor", "fraction": self.fraction, "seed": seed},
            engines={"infer": {"engine": "trainer rollouts"}, "train": {"engine": "trainer"}},
        )
        self.run.path.mkdir(parents=True, exist_ok=True)
        self.run.write_meta(self.meta)

    def add(self, step: int, tok: Tokens, delta: np.ndarray, token_ids: Any, seq_lens: Any) -> None:
        """Keep each of the step's sequences with probability `fraction` (one part file)."""
        import pandas as pd

        from .runs import token_frame

        k = int(tok.row.size)
        keep_seq = self.rng.random(k) < self.fraction  # [k]
        if not keep_seq.any():
            return
        keep = keep_seq[tok.seq]  # [n]
        new = np.cumsum(keep_seq) - 1 + self.next_seq  # [k] the kept ones' run seq_ids
        cols: dict[str, Any] = {
            "seq_id": new[tok.seq[keep]].astype(np.int64),
            "pos": tok.pos[keep].astype(np.int32),
            "logp_infer": tok.logp_infer[keep],
            "logp_train": tok.logp_train[keep],
            "eps_hat": np.full(int(keep.sum()), np.nan),
            "step": np.full(int(keep.sum()), step, dtype=np.int64),
        }
        if token_ids is not None:
            ids = _array(token_ids, np.int64).reshape(-1)
            cols["token_id"] = ids[tok.index[keep]]
        self.run.write_part("tokens", self.parts, token_frame(cols))
        self.seq_parts.append(
            pd.DataFrame({"seq_id": new[keep_seq].astype(np.int64), "step": step})
        )
        self.parts += 1
        self.next_seq += int(keep_seq.sum())

    def close(self) -> Path:
        """Write tokens.parquet and sequences.parquet, mark the run complete."""
        import pandas as pd

        from .runs import now

        seqs = pd.concat(self.seq_parts, ignore_index=True) if self.seq_parts else None
        summary = self.run.finalize(self.parts, seqs)
        self.meta.update(status="complete", completed=now(), summary=summary)
        self.run.write_meta(self.meta)
        return self.run.path


def _float(v: Any) -> float:
    return math.nan if v is None else float(v)


def _bucket_key(lo: float, hi: float) -> str:
    """A bucket as a metric-name part: '1e-06_1e-05', '0.99_0.999'."""
    return f"{lo:g}_{hi:g}"


__all__ = [
    "CORRECTION_KEYS",
    "PREFIX",
    "STEP_METRICS",
    "DriftDetector",
    "StepMonitor",
    "TokenSampler",
    "Tokens",
    "flatten",
]
