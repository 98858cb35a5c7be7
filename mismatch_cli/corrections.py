"""Every published training-inference mismatch correction applied to a run's stored tokens
(`mismatch corrections RUN`): what each one masks, clips, leaves behind and costs.

Notation (docs/theory.md, "9. Mismatch corrections"; docs/corrections.md shows how to read
the result):
    delta_t = logp_infer - logp_train      this tool's sign
    d_t     = -delta_t                     every framework's log_ratio (train - rollout)
    r_t     = exp(d_t)                     the token importance ratio pi_train / pi_infer
    S_i     = sum_t d_t                    sequence log-ratio: exp(S_i) is the product ratio
    G_i     = S_i / T_i                    its geometric mean, T_i = token rows of sequence i

Each method is one pure function `rule(delta [N], seq [N], **params) -> Applied` (weights,
masks, clipping), applied to every token of the run at once: per-sequence aggregates come
from the token rows through np.bincount in float64 (never from sequences.parquet), and no
Python loop runs over tokens or sequences. A token with an infinite delta (the training
side's own truncation removed it; `kept_train` False) is masked by every method, since no
framework can give it a finite weight, and a sequence holding one is masked by every
sequence-level method.

Ratios that become weights are exp of the log-ratio clamped to +-20 (verl's SAFETY_BOUND,
SkyRL's safe_exp_delta; `metrics.importance_ratio`): the clamp only changes weights below
exp(-20) or above every cap, never a mask decision at the shipped bounds.

The DVP rows (`dvp-minp`, `dvp-abs`) are the seed paper's pruning, taken from `sweep.py`:
its recommendation rule picks rho (unless `--rho` / `--set dvp-*.rho=` gives one), its
`kept_mask` decides which sampled tokens leave the safe set, and its rows give the bias
bound and the curve through every grid value. A run without the pruned-mass grid (or
without `p_max_train` for min-p) gets a `skipped` note on those rows; the others still work.

Optional token columns: `advantage` (imported runs) gives each method's share of the
advantage-weighted signal removed (sum |A_t| over masked tokens / sum |A_t|) and makes it the
x axis of the Pareto front; `step` gives the masked fraction per training step.
No torch here: the command must start fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import metrics
from .errors import MismatchError
from .grouped import Segments, TopValues
from .render import fmt, pct
from .results import json_ready

LOG2 = math.log(2.0)
RATIO_BAND = (0.5, 2.0)  # left_frac_ratio_outside_0.5_2

# ----------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Applied:
    """What a rule does to each token (N token rows)."""

    weight: np.ndarray  # [N] float64: the weight after the rule, 0 where masked
    masked: np.ndarray  # [N] bool: carries no gradient (weight zeroed or token dropped)
    clipped: np.ndarray  # [N] bool: weight changed by a cap or clip (never a masked token)
    excess: np.ndarray | None  # [N] float64: |raw weight - weight| where clipped (None: 0)


@dataclass(frozen=True)
class SeqView:
    """The sequences as a rule sees them, from the token rows in float64 (S sequences)."""

    seg: Segments
    finite: np.ndarray  # [N] bool
    d: np.ndarray  # [N] d_t = -delta_t, 0 where delta is not finite
    S: np.ndarray  # [S] sum_t d_t over the finite tokens
    T: np.ndarray  # [S] token rows
    has_inf: np.ndarray  # [S] holds a token with an infinite delta

    @property
    def G(self) -> np.ndarray:
        """[S] geometric-mean log-ratio S / T."""
        return self.S / np.maximum(self.T, 1)


def seq_view(delta: np.ndarray, seq: np.ndarray) -> SeqView:
    """S, T, G and the infinite-delta flag of every sequence (`seq`: indices 0..S-1)."""
    seg = Segments.of(seq)
    fin = np.isfinite(delta)
    d = np.where(fin, -delta, 0.0)
    return SeqView(seg, fin, d, seg.sum(d), seg.sizes().astype(np.float64), seg.any(~fin))


def _clamped_exp(x: np.ndarray) -> np.ndarray:
    """exp(clamp(x, +-20)), as verl's SAFETY_BOUND and SkyRL's safe_exp_delta."""
    return np.exp(np.clip(x, -metrics.LOG_RATIO_CLAMP, metrics.LOG_RATIO_CLAMP))


def _ratio_clamped(delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(r = exp(clamp(d, +-20)) with d = -delta, 0 where delta is not finite; finite). [N]"""
    fin = np.isfinite(delta)
    r = _clamped_exp(np.where(fin, -delta, 0.0))
    r[~fin] = 0.0
    return r, fin


def _token_result(
    fin: np.ndarray, weight: np.ndarray, masked: np.ndarray | None,
    clipped: np.ndarray | None = None, excess: np.ndarray | None = None,
) -> Applied:  # fmt: skip
    """A token rule's result: infinite-delta tokens masked, masked tokens weight 0."""
    masked = ~fin if masked is None else masked | ~fin
    if clipped is None:
        clipped = np.zeros(fin.shape, bool)
    else:
        clipped &= ~masked
        excess = np.where(clipped, excess, 0.0) if excess is not None else None
    weight[masked] = 0.0
    return Applied(weight, masked, clipped, excess if clipped.any() else None)


def _seq_result(
    v: SeqView, w_seq: np.ndarray | None, drop_seq: np.ndarray | None,
    clip_seq: np.ndarray | None = None, excess_seq: np.ndarray | None = None,
) -> Applied:  # fmt: skip
    """Broadcast per-sequence weights (None: 1) and drops [S] to the tokens; a sequence
    holding an infinite delta is dropped whole."""
    drop = v.has_inf if drop_seq is None else drop_seq | v.has_inf  # [S]
    w = np.ones(drop.shape) if w_seq is None else w_seq.astype(np.float64, copy=True)
    w[drop] = 0.0
    bc = v.seg.broadcast
    if clip_seq is None:
        return Applied(bc(w), bc(drop), np.zeros(v.finite.shape, bool), None)
    clip = clip_seq & ~drop
    exc = np.where(clip, excess_seq, 0.0) if excess_seq is not None else None
    has = bool(clip.any())
    return Applied(bc(w), bc(drop), bc(clip), bc(exc) if has and exc is not None else None)


def rule_none(delta: np.ndarray, seq: np.ndarray) -> Applied:
    """No correction: weight 1 (only the infinite-delta tokens are masked)."""
    fin = np.isfinite(delta)
    return _token_result(fin, np.ones(delta.shape), None)


def rule_tis_token(delta: np.ndarray, seq: np.ndarray, C: float) -> Applied:
    """Truncated IS per token: w_t = min(r_t, C) (verl, SkyRL, TRL token_truncate)."""
    r, fin = _ratio_clamped(delta)
    over = r > C
    return _token_result(fin, np.minimum(r, C), None, over, r - C)


def rule_cispo(delta: np.ndarray, seq: np.ndarray, cap: float) -> Applied:
    """CISPO's clamp: w_t = min(r_t, cap), the cap being TRL's epsilon_high itself."""
    return rule_tis_token(delta, seq, cap)


def rule_tis_seq(delta: np.ndarray, seq: np.ndarray, C: float) -> Applied:
    """Truncated IS per sequence: every token gets min(exp(clamp(S, +-20)), C) (verl, SkyRL)."""
    v = seq_view(delta, seq)
    eS = _clamped_exp(v.S)  # [S]
    return _seq_result(v, np.minimum(eS, C), None, eS > C, eS - C)


def rule_icepop(delta: np.ndarray, seq: np.ndarray, lo: float, hi: float) -> Applied:
    """IcePop: w_t = r_t if lo <= r_t <= hi, else 0 (masked)."""
    r, fin = _ratio_clamped(delta)
    return _token_result(fin, r, ~((r >= lo) & (r <= hi)))


def rule_seq_mask_product(delta: np.ndarray, seq: np.ndarray, lo: float, hi: float) -> Applied:
    """Drop the sequence if exp(S) is outside [lo, hi] (SkyRL's product mask); weight 1."""
    v = seq_view(delta, seq)
    eS = _clamped_exp(v.S)
    return _seq_result(v, None, ~((eS >= lo) & (eS <= hi)))


def rule_seq_mask_geo(delta: np.ndarray, seq: np.ndarray, lo: float, hi: float) -> Applied:
    """Drop the sequence if exp(G) = exp(S / T) is outside [lo, hi] (SkyRL's geometric mask)."""
    v = seq_view(delta, seq)
    eG = _clamped_exp(v.G)
    return _seq_result(v, None, ~((eG >= lo) & (eG <= hi)))


def rule_seq_mask_k3(delta: np.ndarray, seq: np.ndarray, tau: float) -> Applied:
    """Drop the sequence if mean_t k3_t > tau, k3_t = r_t - 1 - log r_t on the +-20-clamped
    log-ratio (verl's seq_mean_k3)."""
    v = seq_view(delta, seq)
    d = np.clip(v.d, -metrics.LOG_RATIO_CLAMP, metrics.LOG_RATIO_CLAMP)  # [N]
    mean_k3 = v.seg.sum(np.expm1(d) - d) / np.maximum(v.T, 1)  # [S]
    return _seq_result(v, None, mean_k3 > tau)


def rule_seq_veto(delta: np.ndarray, seq: np.ndarray, tau: float) -> Applied:
    """Drop the sequence if any token has r_t < tau, i.e. d_t < log tau (slime's
    rs_veto_threshold, verl's removed veto, SkyRL's outlier_token_is_threshold_low)."""
    v = seq_view(delta, seq)
    return _seq_result(v, None, v.seg.any(v.finite & (v.d < math.log(tau))))


def rule_gspo_clip(delta: np.ndarray, seq: np.ndarray, lo: float, hi: float) -> Applied:
    """GSPO's sequence ratio exp(G) clipped to [lo, hi]; every token gets the clipped value."""
    v = seq_view(delta, seq)
    eG = _clamped_exp(v.G)
    w = np.clip(eG, lo, hi)
    return _seq_result(v, w, None, (eG < lo) | (eG > hi), np.abs(eG - w))


def rule_nemo_seq_mult(delta: np.ndarray, seq: np.ndarray, tau: float) -> Applied:
    """Drop the sequence if mean_t exp(|delta_t|) > tau (NeMo-RL's seq_logprob_error_threshold)."""
    v = seq_view(delta, seq)
    with np.errstate(over="ignore"):
        e = np.exp(np.abs(v.d))  # [N]; inf past |delta| > 709: dropped
    mult = v.seg.sum(e) / np.maximum(v.T, 1)  # [S]
    return _seq_result(v, None, ~(mult <= tau))


def rule_dvp(delta: np.ndarray, seq: np.ndarray, kept: np.ndarray) -> Applied:
    """DVP: drop the sampled tokens outside the safe vocabulary (`kept` [N] from
    `sweep.kept_mask` on the training side's support); weight 1 on the others."""
    return _token_result(np.isfinite(delta), np.ones(delta.shape), ~kept)


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Method:
    """One correction: its rule, the level it masks at, defaults, the formula and source."""

    name: str
    level: str  # "token" or "sequence"
    rule: Callable[..., Applied] | None  # None for DVP (built from the sweep)
    defaults: Mapping[str, float | None]
    formula: str
    source: str
    dvp_rule: str | None = None  # sweep rule of a DVP row


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("none", "token", rule_none, {}, "w = 1", "no correction"),
        Method(
            "tis-token", "token", rule_tis_token, {"C": 2.0}, "w = min(r, C)",
            "verl token TIS, SkyRL token_tis_ratio_clip_high, TRL token_truncate",
        ),
        Method(
            "tis-seq", "sequence", rule_tis_seq, {"C": 5.0}, "w = min(exp(S), C) per sequence",
            "SkyRL sequence_tis_ratio_clip_high, verl rollout_is=sequence",
        ),
        Method(
            "icepop", "token", rule_icepop, {"lo": 0.5, "hi": 5.0},
            "w = r if lo <= r <= hi else 0", "verl decoupled_token_icepop, OpenRLHF icepop",
        ),
        Method(
            "icepop-narrow", "token", rule_icepop, {"lo": 0.5, "hi": 2.0},
            "w = r if lo <= r <= hi else 0", "SkyRL token_mask_is_threshold (docs), TRL token_mask",
        ),
        Method(
            "seq-mask-product", "sequence", rule_seq_mask_product, {"lo": 0.5, "hi": 2.0},
            "drop sequence if exp(S) outside [lo, hi]", "SkyRL product mask, verl seq_sum_k1",
        ),
        Method(
            "seq-mask-geo", "sequence", rule_seq_mask_geo, {"lo": 0.99, "hi": 1.01},
            "drop sequence if exp(G) outside [lo, hi]", "SkyRL geometric mask (verl: 0.999_1.001)",
        ),
        Method(
            "seq-mask-k3", "sequence", rule_seq_mask_k3, {"tau": 0.01},
            "drop sequence if mean_t k3_t > tau", "verl seq_mean_k3",
        ),
        Method(
            "seq-veto", "sequence", rule_seq_veto, {"tau": 1e-4},
            "drop sequence if any r_t < tau", "slime rs_veto_threshold, SkyRL outlier low",
        ),
        Method(
            "gspo-clip", "sequence", rule_gspo_clip, {"lo": 1 - 3e-4, "hi": 1 + 4e-4},
            "w = clip(exp(G), lo, hi) per sequence", "GSPO (TRL docs recipe, OpenRLHF gspo)",
        ),
        Method(
            "cispo", "token", rule_cispo, {"cap": 5.0}, "w = min(r, cap)",
            "TRL cispo (cap = epsilon_high)",
        ),
        Method(
            "nemo-seq-mult", "sequence", rule_nemo_seq_mult, {"tau": 1.5},
            "drop sequence if mean_t exp(|delta_t|) > tau",
            "NeMo-RL seq_logprob_error_threshold",
        ),
        Method(
            "dvp-minp", "token", None, {"rho": None},
            "drop tokens with p < rho * max p (training side)", "seed paper, sweep-threshold",
            dvp_rule="min-p",
        ),
        Method(
            "dvp-abs", "token", None, {"rho": None}, "drop tokens with p < rho (training side)",
            "seed paper, sweep-threshold --rule absolute", dvp_rule="absolute",
        ),
    )
}  # fmt: skip
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)

# Domain of every parameter key: (test, words for the error).
_DOMAINS: dict[str, tuple[Callable[[float], bool], str]] = {
    "C": (lambda v: v > 0, "> 0"),
    "cap": (lambda v: v > 0, "> 0"),
    "tau": (lambda v: v > 0, "> 0"),
    "lo": (lambda v: v >= 0, ">= 0"),
    "hi": (lambda v: v > 0, "> 0"),
    "rho": (lambda v: 0 < v < 1, "in (0, 1)"),
}


def check_methods(names: Iterable[str] | None) -> list[str]:
    """Validated method names, in registry order (all when None or empty). Each value may
    be a comma-separated list (`--method icepop,tis-token`)."""
    if names is None:
        return list(METHOD_NAMES)
    picked: list[str] = []
    for v in names:
        for part in str(v).split(","):
            part = part.strip()
            if not part:
                continue
            if part not in METHODS:
                raise MismatchError(
                    f"unknown method {part!r}; choose from {', '.join(METHOD_NAMES)}"
                )
            picked.append(part)
    if not picked:
        raise MismatchError(f"--method needs at least one of {', '.join(METHOD_NAMES)}")
    return [n for n in METHOD_NAMES if n in picked]


def parse_sets(values: Iterable[str] | None) -> dict[str, dict[str, float]]:
    """`--set NAME.KEY=VALUE` overrides (each value may hold several, comma-separated) as
    {name: {key: value}}; names and keys checked here, domains in `resolve_params`."""
    out: dict[str, dict[str, float]] = {}
    for v in values or ():
        for item in str(v).split(","):
            item = item.strip()
            if not item:
                continue
            lhs, eq, rhs = item.partition("=")
            name, dot, key = lhs.strip().rpartition(".")
            if not (eq and dot and name and key and rhs.strip()):
                raise MismatchError(
                    f"--set {item!r} is not NAME.KEY=VALUE (e.g. --set tis-token.C=3)"
                )
            if name not in METHODS:
                raise MismatchError(
                    f"--set {item!r}: unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}"
                )
            keys = list(METHODS[name].defaults)
            if key not in keys:
                has = f"its parameters: {', '.join(keys)}" if keys else "it has no parameters"
                raise MismatchError(f"--set {item!r}: {name} has no parameter {key!r} ({has})")
            try:
                value = float(rhs)
            except ValueError:
                raise MismatchError(f"--set {item!r}: {rhs.strip()!r} is not a number") from None
            out.setdefault(name, {})[key] = value
    return out


def resolve_params(
    name: str, overrides: Mapping[str, float] | None = None, rho: float | None = None
) -> dict[str, float | None]:
    """A method's parameters: defaults, then `rho` (DVP rows), then `overrides`; each value
    checked against its domain (finite, C/cap/tau/hi > 0, lo >= 0, lo <= hi, rho in (0, 1))."""
    m = METHODS[name]
    params: dict[str, float | None] = dict(m.defaults)
    if m.dvp_rule is not None and rho is not None:
        params["rho"] = float(rho)
    for k, v in (overrides or {}).items():
        if k not in params:
            raise MismatchError(f"{name} has no parameter {k!r}")
        params[k] = float(v)
    for k, v in params.items():
        if v is None:
            continue
        test, words = _DOMAINS[k]
        if not (math.isfinite(v) and test(v)):
            flag = "--rho" if k == "rho" and rho is not None and v == rho else f"{name}.{k}"
            raise MismatchError(f"{flag} must be {words}, got {v:g}")
    if "lo" in params and params["lo"] > params["hi"]:  # type: ignore[operator]
        raise MismatchError(f"{name}.lo ({params['lo']:g}) must be <= {name}.hi ({params['hi']:g})")
    return params


# ----------------------------------------------------------------------------- run tokens

BASE_COLUMNS: tuple[str, ...] = ("seq_id", "delta", "p_train")
OPTIONAL_COLUMNS: tuple[str, ...] = ("kept_train", "advantage", "step", "p_max_train")


@dataclass
class RunTokens:
    """The token rows every method reads, prepared once (N token rows, S sequences)."""

    delta: np.ndarray  # [N] float64, +inf where the training side's truncation removed it
    seq: np.ndarray  # [N] int64 sequence index 0..S-1
    seg: Segments
    bucket: np.ndarray  # [N] int64 bucket of p_train in `edges`, -1 outside
    edges: np.ndarray  # [B + 1]
    advantage: np.ndarray | None  # [N] float64, NaN -> 0
    step: np.ndarray | None  # [N] int64 index into step_values
    step_values: np.ndarray | None  # [K] the distinct steps, ascending
    finite: np.ndarray  # [N] bool
    abs_delta: np.ndarray  # [N] |delta|, 0 where infinite
    k3: np.ndarray  # [N] k3_t = exp(d) - 1 - d, unclamped, 0 where infinite
    outside: np.ndarray  # [N] bool: r outside [0.5, 2]
    top: TopValues  # the largest |delta|, for the p99 left by each method
    totals: dict[str, Any]  # sums over all tokens; per method only the masked side is read

    @property
    def num_tokens(self) -> int:
        return int(self.delta.size)

    @property
    def num_sequences(self) -> int:
        return self.seg.num


def run_tokens(df: pd.DataFrame, edges: Sequence[float] | np.ndarray | None = None) -> RunTokens:
    """Prepare a token table (seq_id, delta, p_train; optional kept_train, advantage, step)."""
    from .analysis import bucket_index, parse_edges

    missing = [c for c in BASE_COLUMNS if c not in df.columns]
    if missing:
        raise MismatchError(f"the token table lacks column(s) {', '.join(missing)}")
    if len(df) == 0:
        raise MismatchError("the run has no tokens: nothing to correct")
    e = parse_edges(edges)
    delta = df["delta"].to_numpy(dtype=np.float64, copy=True)  # [N]
    if "kept_train" in df.columns:
        delta[~df["kept_train"].to_numpy(dtype=bool)] = np.inf
    finite = np.isfinite(delta)
    delta[np.isnan(delta)] = np.inf  # NaN counts as infinite
    seq, uniq = pd.factorize(df["seq_id"], sort=True)
    seq = seq.astype(np.int64)
    abs_delta = np.where(finite, np.abs(delta), 0.0)
    finite_delta = np.where(finite, delta, 0.0)
    adv = step = step_values = None
    if "advantage" in df.columns:
        adv = np.nan_to_num(df["advantage"].to_numpy(dtype=np.float64), nan=0.0)
    if "step" in df.columns and df["step"].notna().any():
        codes, step_values = pd.factorize(df["step"], sort=True)
        step, step_values = codes.astype(np.int64), np.asarray(step_values)
    t = RunTokens(
        delta=delta,
        seq=seq,
        seg=Segments.of(seq, len(uniq)),
        bucket=bucket_index(df["p_train"].to_numpy(dtype=np.float64), e),
        edges=e,
        advantage=adv,
        step=step,
        step_values=step_values,
        finite=finite,
        abs_delta=abs_delta,
        k3=metrics.k3_per_token(finite_delta),
        outside=finite & (abs_delta > LOG2),
        top=TopValues(abs_delta, finite),
        totals={},
    )
    t.totals = _totals(t)
    return t


def _totals(t: RunTokens) -> dict[str, Any]:
    """Sums over every token row, so that a method's kept-token sums are totals minus the
    (usually few) masked rows."""
    B = len(t.edges) - 1
    tot: dict[str, Any] = {
        "finite": int(np.count_nonzero(t.finite)),
        "abs": float(t.abs_delta.sum()),
        "k3": float(t.k3.sum()),
        "outside": int(np.count_nonzero(t.outside)),
        "bucket": np.bincount(t.bucket + 1, minlength=B + 1)[1:],
    }
    if t.advantage is not None:
        tot["adv"] = float(np.abs(t.advantage).sum())
    if t.step is not None and t.step_values is not None:
        K = len(t.step_values)
        tot["step"] = np.bincount(t.step, minlength=K)
        tot["step_abs"] = np.bincount(t.step, weights=t.abs_delta, minlength=K)
    return tot


def _read(path: str | Path) -> tuple[pd.DataFrame, dict[str, Any], list[str]]:
    """The columns corrections need (optional ones where the run has them; p_max_train
    for the DVP min-p row, handed to the sweep with the others)."""
    import pyarrow.parquet as pq

    from .schema import TOKENS_FILE
    from .tokens import load_tokens

    file = Path(path) / TOKENS_FILE
    have = set(pq.read_schema(file).names) if file.is_file() else set()
    cols = [*BASE_COLUMNS, *(c for c in OPTIONAL_COLUMNS if c in have)]
    return load_tokens(path, columns=cols)


# ----------------------------------------------------------------------------- summaries


def _share(part: float, total: float) -> float:
    return part / total if total > 0 else float("nan")


def _ess(w: np.ndarray) -> float:
    """(sum w)^2 / (n sum w^2) = 1 / mean((w / mean w)^2); NaN if empty or all zero."""
    s2 = float(np.dot(w, w))
    return float(w.sum()) ** 2 / (w.size * s2) if w.size and s2 > 0 else float("nan")


def _side(mask: np.ndarray, count: int) -> tuple[np.ndarray, bool]:
    """Row indices of the smaller side of a mask: (indices, True) of the True rows if they
    are at most half, else (indices of the False rows, False). Sums over a side are read
    from these rows only; the other side's are totals minus them."""
    if count <= mask.size // 2:
        return np.flatnonzero(mask), True
    return np.flatnonzero(~mask), False


def _per_group(idx: np.ndarray, on_true: bool, group: np.ndarray, total: np.ndarray) -> np.ndarray:
    """Rows of the mask's True side per group (-1 = none): from the side `idx` holds."""
    m = total.size + 1
    c = np.bincount(group[idx] + 1, minlength=m)[1:]
    return c if on_true else total - c


def summarize(a: Applied, t: RunTokens) -> dict[str, Any]:
    """Every per-method quantity of the issue (the keys of a method object, less name,
    params, level, bias_bound and skipped). Kept-token sums are totals minus the masked
    rows (or sums over the kept rows, whichever side is smaller); weights are 0 on masked
    tokens, so their sums run over all rows."""
    N, S, tot = t.num_tokens, t.num_sequences, t.totals
    n_masked = int(np.count_nonzero(a.masked))
    n = N - n_masked  # tokens that still carry gradient (all finite)
    idx, on_masked = _side(a.masked, n_masked)

    def kept_sum(x: np.ndarray, total: float) -> float:
        part = float(x[idx].sum())
        return total - part if on_masked else part

    nan = float("nan")
    abs_kept = kept_sum(t.abs_delta, tot["abs"])
    k3_kept = kept_sum(t.k3, tot["k3"])
    out_kept = kept_sum(t.outside, tot["outside"])
    fin_masked = int(np.count_nonzero(t.finite[idx])) if on_masked else tot["finite"] - n
    w = a.weight  # [N], 0 where masked
    sw, sw2 = float(w.sum()), float(np.dot(w, w))
    w_mean = sw / n if n else nan
    kept_per_seq = t.seg.sizes() - t.seg.sum(a.masked)  # [S]
    alive = kept_per_seq > 0  # [S] sequences not masked whole
    w_seq = t.seg.sum(w)[alive] / kept_per_seq[alive]
    clip_mass = float(t.seg.sum(a.excess).mean()) if a.excess is not None else 0.0
    adv_share = None
    if t.advantage is not None:
        adv_share = _share(tot["adv"] - kept_sum(np.abs(t.advantage), tot["adv"]), tot["adv"])
    in_top = ~a.masked[t.top.index]  # the kept rows among the largest |delta|
    B = len(t.edges) - 1
    masked_b = _per_group(idx, on_masked, t.bucket, tot["bucket"])  # [B]
    n_clip = int(np.count_nonzero(a.clipped))
    cidx, c_on = _side(a.clipped, n_clip)
    clipped_b = _per_group(cidx, c_on, t.bucket, tot["bucket"])
    with np.errstate(invalid="ignore", divide="ignore"):
        by_bucket = [
            {"lo": t.edges[i], "hi": t.edges[i + 1], "num_tokens": tot["bucket"][i],
             "masked": masked_b[i] / tot["bucket"][i], "clipped": clipped_b[i] / tot["bucket"][i]}
            for i in range(B)
        ]  # fmt: skip
        by_step = None
        if t.step is not None and t.step_values is not None:
            ks = tot["step"]
            ms = _per_group(idx, on_masked, t.step, ks)
            cs = _per_group(cidx, c_on, t.step, ks)
            part = np.bincount(t.step[idx], weights=t.abs_delta[idx], minlength=ks.size)
            left_abs = tot["step_abs"] - part if on_masked else part
            by_step = [
                {"step": v, "num_tokens": ks[i], "masked": ms[i] / ks[i], "clipped": cs[i] / ks[i],
                 "left_mean_abs_delta": left_abs[i] / (ks[i] - ms[i])}
                for i, v in enumerate(t.step_values)
            ]  # fmt: skip
    return {
        "tokens_masked": n_masked / N,
        "sequences_masked": float((~alive).mean()) if S else nan,
        "tokens_clipped": n_clip / N,
        "weight_mean": w_mean,
        "weight_std": math.sqrt(max(sw2 / n - w_mean**2, 0.0)) if n else nan,
        "weight_max": float(w.max()) if n else nan,  # weights are >= 0, masked ones 0
        "ess_token": sw**2 / (n * sw2) if n and sw2 > 0 else nan,
        "ess_seq": _ess(w_seq),
        "left_mean_abs_delta": abs_kept / n if n else nan,
        "left_k3": k3_kept / n if n else nan,
        "left_p99_abs_delta": t.top.quantile(in_top, n, 0.99, lambda: ~a.masked),
        "left_max_abs_delta": t.top.quantile(in_top, n, 1.0, lambda: ~a.masked),
        "left_frac_ratio_outside_0.5_2": out_kept / n if n else nan,
        "removed_token_share": _share(fin_masked, tot["finite"]),
        "removed_abs_delta_share": _share(tot["abs"] - abs_kept, tot["abs"]),
        "clipped_mass_per_seq": clip_mass,
        "removed_advantage_share": adv_share,
        "by_bucket": by_bucket,
        "by_step": by_step,
    }


# Keys of every method object, in order (docs/formats.md).
METHOD_KEYS: tuple[str, ...] = (
    "name",
    "level",
    "params",
    "skipped",
    "tokens_masked",
    "sequences_masked",
    "tokens_clipped",
    "weight_mean",
    "weight_std",
    "weight_max",
    "ess_token",
    "ess_seq",
    "left_mean_abs_delta",
    "left_k3",
    "left_p99_abs_delta",
    "left_max_abs_delta",
    "left_frac_ratio_outside_0.5_2",
    "removed_token_share",
    "removed_abs_delta_share",
    "clipped_mass_per_seq",
    "bias_bound",
    "removed_advantage_share",
    "by_bucket",
    "by_step",
)
SCALAR_KEYS: tuple[str, ...] = tuple(
    k for k in METHOD_KEYS if k not in ("params", "by_bucket", "by_step")
)


def _skipped(name: str, params: dict[str, Any], why: str) -> dict[str, Any]:
    row = dict.fromkeys(METHOD_KEYS)
    row.update(name=name, level=METHODS[name].level, params=params, skipped=why)
    return row


def _row(name: str, params: dict[str, Any], a: Applied, t: RunTokens, bias: Any = None) -> dict:
    row = {"name": name, "level": METHODS[name].level, "params": params, "skipped": None}
    row.update(summarize(a, t))
    row["bias_bound"] = bias
    return {k: row[k] for k in METHOD_KEYS}


# ----------------------------------------------------------------------------- DVP


def _dvp_inputs(
    rules: Sequence[str],
    source: str | Path | None,
    df: pd.DataFrame,
    grid: Sequence[float] | None,
) -> dict[str, Any]:
    """The sweep's inputs of each DVP rule (or the MismatchError saying why not): from the
    run (`sweep.load_rules`: both pruned-mass grids streamed together), or from `df` when
    it is the whole table (source None)."""
    from . import sweep as sw

    if source is not None:
        return sw.load_rules(source, rules, grid, tokens=df)
    from .schema import RHO_GRID

    out: dict[str, Any] = {}
    for r in rules:
        try:
            out[r] = sw.prepare(df, r, RHO_GRID if grid is None else grid)
        except MismatchError as e:
            out[r] = e
    return out


def _dvp(
    name: str, params: dict[str, Any], t: RunTokens, inp: Any
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A DVP row from the sweep (recommendation, kept mask, bias bound) and its curve;
    inp: `sweep.SweepInputs`, or the MismatchError that makes the row skipped."""
    from . import sweep as sw

    rule = METHODS[name].dvp_rule
    assert rule is not None
    if isinstance(inp, MismatchError):
        return _skipped(name, params, str(inp)), None
    if inp.num_tokens != t.num_tokens:  # both read the same file in file order
        raise MismatchError(f"{name}: the sweep read {inp.num_tokens} tokens, not {t.num_tokens}")
    res = sw.sweep(inp, rule)
    rows, rec = res["rows"], res["recommended"]
    rho = params["rho"]
    chosen = "given"
    if rho is None:
        rho, chosen = rec["rho"], "recommended"
        if rho is None:
            return _skipped(name, params, f"no rho recommended: {rec['reason']}"), None
    rho, _ = sw.resolve_rhos([rho], inp.grid)[0]  # off-grid -> MismatchError
    params = {**params, "rho": rho, "rho_from": chosen}
    kept = inp.support & sw.kept_mask(inp.p_train, inp.p_max_train, rho, rule)  # [N]
    row = next(r for r in rows if r["rho"] == rho)
    out = _row(name, params, rule_dvp(t.delta, t.seq, kept), t, row["seq_bias_bound_mean"])
    base = res["baseline"]
    n_support = t.num_tokens - base["pruned_tokens"]
    curve = {
        "name": name,
        "rule": rule,
        "rho": rho,
        "recommended": rec["rho"],
        "points": [
            {
                "rho": r["rho"],
                "removed_token_share": _share(
                    r["pruned_tokens"] - base["pruned_tokens"], n_support
                ),
                "left_k3": r["kept_k3"],
                "left_p99_abs_delta": r["kept_p99_abs_delta"],
                "bias_bound": r["seq_bias_bound_mean"],
            }
            for r in rows
        ],
    }
    return out, curve


# ----------------------------------------------------------------------------- Pareto, verdict


def pareto(rows: Sequence[dict[str, Any]], x: str, y: str = "left_k3") -> list[str]:
    """Names of the rows no other row beats on both `x` and `y` (lower is better on both;
    ties stay on the front), ordered by x. Rows with a missing x or y are left out."""
    pts = [
        (r["name"], r[x], r[y])
        for r in rows
        if r.get(x) is not None
        and r.get(y) is not None
        and math.isfinite(r[x])
        and math.isfinite(r[y])
    ]
    front = [
        (n, a, b)
        for n, a, b in pts
        if not any(a2 <= a and b2 <= b and (a2 < a or b2 < b) for _, a2, b2 in pts)
    ]
    return [n for n, _, _ in sorted(front, key=lambda p: (p[1], p[2]))]


def verdict(result: dict[str, Any]) -> str:
    """The plain-words paragraph: the mismatch without a correction, the Pareto front, the
    methods that only reweight, DVP's cost, skipped rows."""
    rows = {r["name"]: r for r in result["methods"]}
    base = result["all_tokens"]
    x = result["pareto_axes"]["x"]
    what = "advantage-weighted signal" if x == "removed_advantage_share" else "tokens"
    k0 = base["k3"]
    parts = [
        f"Without a correction the {result['num_finite']:,} finite tokens carry k3 = "
        f"{fmt(k0)} (mean |delta| {fmt(base['mean_abs_delta'])}, p99 |delta| "
        f"{fmt(base['p99_abs_delta'])} nats)"
        + (
            f"; {result['num_infinite']:,} token(s) with an infinite delta are masked by every "
            "method."
            if result["num_infinite"]
            else "."
        )
    ]
    groups: list[tuple[list[str], dict[str, Any]]] = []  # front points, ties merged
    for n in result["pareto"]:
        r = rows[n]
        if groups and (groups[-1][1][x], groups[-1][1]["left_k3"]) == (r[x], r["left_k3"]):
            groups[-1][0].append(n)
        else:
            groups.append(([n], r))
    front = []
    for ns, r in groups:
        rel = f", {r['left_k3'] / k0:.2f}x none" if k0 else ""
        front.append(f"{', '.join(ns)} ({pct(r[x])} removed, k3 {fmt(r['left_k3'])}{rel})")
    if front:
        parts.append(f"On the Pareto front of ({what} removed, k3 left): {'; '.join(front)}.")
    live = {n: r for n, r in rows.items() if r["skipped"] is None and n != "none"}
    reweight = [n for n, r in live.items() if not r["removed_token_share"] and r["tokens_clipped"]]
    if reweight:
        one = len(reweight) == 1
        parts.append(
            f"{', '.join(reweight)} only reweight{'s' if one else ''}: "
            f"{'it drops' if one else 'they drop'} no finite token, so the mismatch on the "
            "tokens that carry gradient stays where it was; the weights are bounded instead "
            "(clipped share and ESS in the table)."
        )
    idle = [n for n, r in live.items() if not r["removed_token_share"] and not r["tokens_clipped"]]
    if idle:
        parts.append(
            f"{', '.join(idle)} neither mask nor clip a token on this run at these bounds."
        )
    for n in ("dvp-minp", "dvp-abs"):
        r = rows.get(n)
        if r is not None and r["skipped"] is None:
            p = r["params"]
            parts.append(
                f"{n} at rho = {p['rho']:g} ({p['rho_from']}) removes {pct(r['removed_token_share'])}"
                f" of the tokens and leaves k3 {fmt(r['left_k3'])}, at a mean per-sequence bias "
                f"bound of {fmt(r['bias_bound'])}."
            )
    skipped = [f"{n} ({r['skipped']})" for n, r in rows.items() if r["skipped"] is not None]
    if skipped:
        parts.append(f"Skipped: {'; '.join(skipped)}.")
    return " ".join(parts)


# ----------------------------------------------------------------------------- entry


def corrections(
    source: pd.DataFrame | str | Path,
    methods: Iterable[str] | None = None,
    overrides: Mapping[str, Mapping[str, float]] | None = None,
    rho: float | None = None,
    edges: Sequence[float] | str | None = None,
    grid: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Apply every correction (or `methods`) to a run (path) or a token table.

    overrides: {method: {key: value}} (`parse_sets`); rho: the DVP threshold (default: the
    sweep's recommendation); edges: probability buckets of `by_bucket` (default the
    report's); grid: pruning grid of a DataFrame source (default schema.RHO_GRID).
    Returns a strict-JSON dict: run, num_tokens, num_sequences, num_finite, num_infinite,
    edges, has_advantage, has_step, all_tokens, methods (METHOD_KEYS each, registry order),
    pareto (names), pareto_axes, dvp_curves, verdict, warnings, conventions.
    """
    names = check_methods(methods)
    overrides = overrides or {}
    for n in overrides:
        if n not in names:
            raise MismatchError(f"--set names {n}, which --method does not select")
    if rho is not None and not (0 < rho < 1):
        raise MismatchError(f"--rho must be in (0, 1), got {rho:g}")
    params = {n: resolve_params(n, overrides.get(n), rho) for n in names}
    warnings: list[str] = []
    run = None
    if isinstance(source, pd.DataFrame):
        df = source
    else:
        run = str(source)
        df, meta, warnings = _read(source)
        if grid is None and meta.get("rho_grid"):
            grid = meta["rho_grid"]
    t = run_tokens(df, edges)
    rows: dict[str, dict[str, Any]] = {}
    curves = []
    dvp = [n for n in names if METHODS[n].dvp_rule is not None]
    if dvp:  # DVP first: then the table the sweep shares can go
        path = None if isinstance(source, pd.DataFrame) else source
        rules = [METHODS[n].dvp_rule for n in dvp]
        inputs = _dvp_inputs(rules, path, df, grid)  # type: ignore[arg-type]
        for n, r in zip(dvp, rules, strict=True):
            rows[n], curve = _dvp(n, params[n], t, inputs.pop(r))
            if curve is not None:
                curves.append(curve)
        del inputs
    del df
    for n in names:
        m = METHODS[n]
        if m.rule is not None:
            rows[n] = _row(n, params[n], m.rule(t.delta, t.seq, **params[n]), t)
    rows_list = [rows[n] for n in names]
    x = "removed_advantage_share" if t.advantage is not None else "removed_token_share"
    base = summarize(rule_none(t.delta, t.seq), t)  # every finite token
    steps = None
    if base["by_step"] is not None:
        steps = [
            {
                "step": r["step"],
                "num_tokens": r["num_tokens"],
                "mean_abs_delta": r["left_mean_abs_delta"],
            }
            for r in base["by_step"]
        ]
    n_fin = int(np.count_nonzero(t.finite))
    result: dict[str, Any] = {
        "run": run,
        "num_tokens": t.num_tokens,
        "num_sequences": t.num_sequences,
        "num_finite": n_fin,
        "num_infinite": t.num_tokens - n_fin,
        "edges": t.edges,
        "has_advantage": t.advantage is not None,
        "has_step": t.step is not None,
        "all_tokens": {
            "mean_abs_delta": base["left_mean_abs_delta"],
            "k3": base["left_k3"],
            "p99_abs_delta": base["left_p99_abs_delta"],
            "max_abs_delta": base["left_max_abs_delta"],
        },
        "steps": steps,
        "methods": rows_list,
        "pareto_axes": {"x": x, "y": "left_k3"},
        "dvp_curves": curves,
        "warnings": warnings,
        "conventions": CONVENTIONS,
    }
    result = json_ready(result)
    result["pareto"] = pareto(result["methods"], x)
    result["verdict"] = verdict(result)
    return result


CONVENTIONS: dict[str, str] = {
    "delta": "delta = logp_infer - logp_train (nats); d = -delta; r = exp(d) = p_train / p_infer",
    "sequence": "S = sum_t d_t, G = S / T over the sequence's token rows, recomputed in float64",
    "clamp": "weights use exp of the log-ratio (or S, G) clamped to +-20, as verl and SkyRL",
    "infinite_delta": (
        "a token with an infinite delta is masked by every method; a sequence holding one by "
        "every sequence-level method"
    ),
    "masked": (
        "tokens_masked over all token rows; sequences_masked = sequences with every token "
        "masked, over sequences with a token row; removed_* over finite tokens (the method's "
        "own cost); left_*, weight_*, ess_* over the tokens (sequences) not masked"
    ),
    "clipped_mass": "per sequence sum_t |raw weight - weight| over clipped tokens, mean over sequences",
    "denominator": (
        "masked means no gradient: verl, OpenRLHF, TRL, slime and NeMo keep IcePop's zeroed "
        "tokens in the loss denominator, SkyRL removes them; counted the same here"
    ),
}


def rows_frame(result: dict[str, Any]) -> pd.DataFrame:
    """The method rows as a DataFrame (for --csv): scalar keys, params as 'k=v;k=v'."""
    recs = []
    for r in result["methods"]:
        rec = {k: r[k] for k in SCALAR_KEYS}
        rec["params"] = ";".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in (r["params"] or {}).items()
            if v is not None
        )
        rec["pareto"] = r["name"] in result["pareto"]
        recs.append(rec)
    cols = ["name", "level", "params", *SCALAR_KEYS[3:], "pareto"]
    return pd.DataFrame(recs, columns=cols)


__all__ = [
    "METHODS",
    "METHOD_KEYS",
    "METHOD_NAMES",
    "Applied",
    "Method",
    "RunTokens",
    "check_methods",
    "corrections",
    "pareto",
    "parse_sets",
    "resolve_params",
    "rows_frame",
    "rule_cispo",
    "rule_dvp",
    "rule_gspo_clip",
    "rule_icepop",
    "rule_nemo_seq_mult",
    "rule_none",
    "rule_seq_mask_geo",
    "rule_seq_mask_k3",
    "rule_seq_mask_product",
    "rule_seq_veto",
    "rule_tis_seq",
    "rule_tis_token",
    "run_tokens",
    "seq_view",
    "summarize",
    "verdict",
]
