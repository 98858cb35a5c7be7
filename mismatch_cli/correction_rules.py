"""The correction rules: every published training-inference mismatch correction as one pure
function, and their registry (`METHODS`). What `mismatch corrections` applies to a run's
stored tokens (`corrections.py` streams the table through these rules), and what a trainer
plug-in applies to the tensors of a step: one definition of each rule.

Notation (docs/theory.md §9 "Mismatch corrections"):
    delta_t = logp_infer - logp_train      this tool's sign
    d_t     = -delta_t                     every framework's log_ratio (train - rollout)
    r_t     = exp(d_t)                     the token importance ratio pi_train / pi_infer
    S_i     = sum_t d_t                    sequence log-ratio: exp(S_i) is the product ratio
    G_i     = S_i / T_i                    its geometric mean, T_i = token rows of sequence i

Each method is one pure function `rule(delta [N], seq [N], **params) -> Applied` (weights,
masks, clipping); a sequence-level rule decides per sequence (`decide_*`) from sums over its
token rows in float64 (`SeqView`), then broadcasts the decision to the tokens. No Python
loop runs over tokens or sequences. A token with an infinite delta is masked by every rule,
and a sequence holding one by every sequence-level rule. Ratios that become weights are exp
of the log-ratio clamped to +-20 (verl's SAFETY_BOUND, SkyRL's safe_exp_delta).

Each `Method` declares its `kind` (KINDS: reweights, masks tokens, masks sequences, prunes
the vocabulary): the figure's markers, `--help` and docs/corrections.md read it from here.
A new method: docs/architecture.md, "A new correction method".
No torch here: numpy in, numpy out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from . import metrics
from .errors import MismatchError
from .per_sequence import BatchSeqs


@dataclass(frozen=True)
class Applied:
    """What a rule does to each token (N token rows)."""

    weight: np.ndarray  # [N] float64: the weight after the rule, 0 where masked
    masked: np.ndarray  # [N] bool: carries no gradient (weight zeroed or token dropped)
    clipped: np.ndarray  # [N] bool: weight changed by a cap or clip (never a masked token)
    excess: np.ndarray | None  # [N] float64: |raw weight - weight| where clipped (None: 0)


@dataclass(frozen=True)
class SeqView:
    """The sequences as the sequence-level rules see them: sums over each sequence's token
    rows in float64 (S sequences), accumulated batch by batch (`SeqAccumulator`)."""

    S: np.ndarray  # [S] sum_t d_t over the finite tokens
    T: np.ndarray  # [S] token rows
    has_inf: np.ndarray  # [S] holds a token with an infinite delta
    k3_sum: np.ndarray  # [S] sum_t exp(d_t) - 1 - d_t, d_t clamped to +-20 (0 if infinite)
    d_min: np.ndarray  # [S] smallest finite d_t (+inf if none): the veto's test
    exp_abs_sum: np.ndarray  # [S] sum_t exp(|d_t|) (1 for an infinite token; inf past 709)

    @property
    def G(self) -> np.ndarray:
        """[S] geometric-mean log-ratio S / T."""
        return self.S / np.maximum(self.T, 1)


class SeqAccumulator:
    """A `SeqView` summed over batches of token rows (a sequence may span batches)."""

    def __init__(self, num_sequences: int) -> None:
        S = int(num_sequences)
        self.S, self.T, self.n_inf = np.zeros(S), np.zeros(S), np.zeros(S)
        self.k3_sum, self.exp_abs_sum = np.zeros(S), np.zeros(S)
        self.d_min = np.full(S, np.inf)

    def add(self, delta: np.ndarray, bs: BatchSeqs) -> None:
        """Add token rows: delta [n] (+inf where not finite), bs their sequences."""
        fin = np.isfinite(delta)
        d = np.where(fin, -delta, 0.0)  # [n]
        bs.add(self.S, d)
        self.T[bs.ids] += bs.part.sizes()
        bs.add(self.n_inf, ~fin)
        bs.add(self.k3_sum, metrics.k3_per_token_clamped(-d))
        bs.minimum(self.d_min, np.where(fin, d, np.inf))
        with np.errstate(over="ignore"):
            bs.add(self.exp_abs_sum, np.exp(np.abs(d)))

    def view(self) -> SeqView:
        return SeqView(self.S, self.T, self.n_inf > 0, self.k3_sum, self.d_min, self.exp_abs_sum)


def seq_view(delta: np.ndarray, seq: np.ndarray) -> SeqView:
    """S, T, G and the other sums of every sequence (`seq`: indices 0..S-1), in memory."""
    seq = np.asarray(seq, dtype=np.int64)
    acc = SeqAccumulator(int(seq.max()) + 1 if seq.size else 0)
    acc.add(np.asarray(delta, dtype=np.float64), BatchSeqs(seq))
    return acc.view()


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


@dataclass(frozen=True)
class SeqDecision:
    """A sequence-level rule decided per sequence [S] (once, from the `SeqView`): weight
    (None: 1), dropped, clipped (None: none) and the clipped excess. A sequence holding an
    infinite delta is dropped whole."""

    weight: np.ndarray  # [S] float64, 0 where dropped
    drop: np.ndarray  # [S] bool
    clip: np.ndarray | None  # [S] bool, never a dropped sequence
    excess: np.ndarray | None  # [S] float64, 0 where not clipped

    @classmethod
    def of(
        cls, v: SeqView, w_seq: np.ndarray | None, drop_seq: np.ndarray | None,
        clip_seq: np.ndarray | None = None, excess_seq: np.ndarray | None = None,
    ) -> SeqDecision:  # fmt: skip
        drop = v.has_inf if drop_seq is None else drop_seq | v.has_inf  # [S]
        w = np.ones(drop.shape) if w_seq is None else w_seq.astype(np.float64, copy=True)
        w[drop] = 0.0
        if clip_seq is None:
            return cls(w, drop, None, None)
        clip = clip_seq & ~drop
        exc = np.where(clip, excess_seq, 0.0) if excess_seq is not None else None
        return cls(w, drop, clip, exc)

    def tokens(self, seq: np.ndarray) -> Applied:
        """The decision broadcast to token rows of sequences seq [n]."""
        if self.clip is None:
            return Applied(self.weight[seq], self.drop[seq], np.zeros(seq.shape, bool), None)
        clip = self.clip[seq]
        has = self.excess is not None and bool(clip.any())
        return Applied(self.weight[seq], self.drop[seq], clip, self.excess[seq] if has else None)  # type: ignore[index]


def _view(delta: np.ndarray, seq: np.ndarray, view: SeqView | None) -> SeqView:
    return seq_view(delta, seq) if view is None else view


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


def rule_icepop(delta: np.ndarray, seq: np.ndarray, lo: float, hi: float) -> Applied:
    """IcePop: w_t = r_t if lo <= r_t <= hi, else 0 (masked)."""
    r, fin = _ratio_clamped(delta)
    return _token_result(fin, r, ~((r >= lo) & (r <= hi)))


def rule_dvp(delta: np.ndarray, seq: np.ndarray, kept: np.ndarray) -> Applied:
    """DVP: drop the sampled tokens outside the safe vocabulary (`kept` [N] from
    `sweep.kept_mask` on the training side's support); weight 1 on the others."""
    return _token_result(np.isfinite(delta), np.ones(delta.shape), ~kept)


# Sequence-level rules: `decide_*(view, **params)` once per run, then `SeqDecision.tokens`
# per batch; `rule_*(delta, seq, **params)` is both on one table (view: its `SeqView`).


def decide_tis_seq(v: SeqView, C: float) -> SeqDecision:
    """Truncated IS per sequence: min(exp(clamp(S, +-20)), C) (verl, SkyRL)."""
    eS = _clamped_exp(v.S)  # [S]
    return SeqDecision.of(v, np.minimum(eS, C), None, eS > C, eS - C)


def decide_seq_mask_product(v: SeqView, lo: float, hi: float) -> SeqDecision:
    """Drop the sequence if exp(S) is outside [lo, hi] (SkyRL's product mask); weight 1."""
    eS = _clamped_exp(v.S)
    return SeqDecision.of(v, None, ~((eS >= lo) & (eS <= hi)))


def decide_seq_mask_geo(v: SeqView, lo: float, hi: float) -> SeqDecision:
    """Drop the sequence if exp(G) = exp(S / T) is outside [lo, hi] (SkyRL's geometric mask)."""
    eG = _clamped_exp(v.G)
    return SeqDecision.of(v, None, ~((eG >= lo) & (eG <= hi)))


def decide_seq_mask_k3(v: SeqView, tau: float) -> SeqDecision:
    """Drop the sequence if mean_t k3_t > tau, k3_t = r_t - 1 - log r_t on the +-20-clamped
    log-ratio (verl's seq_mean_k3)."""
    return SeqDecision.of(v, None, v.k3_sum / np.maximum(v.T, 1) > tau)


def decide_seq_veto(v: SeqView, tau: float) -> SeqDecision:
    """Drop the sequence if any token has r_t < tau, i.e. d_t < log tau (slime's
    rs_veto_threshold, verl's removed veto, SkyRL's outlier_token_is_threshold_low)."""
    return SeqDecision.of(v, None, v.d_min < math.log(tau))


def decide_gspo_clip(v: SeqView, lo: float, hi: float) -> SeqDecision:
    """GSPO's sequence ratio exp(G) clipped to [lo, hi]; every token gets the clipped value."""
    eG = _clamped_exp(v.G)
    w = np.clip(eG, lo, hi)
    return SeqDecision.of(v, w, None, (eG < lo) | (eG > hi), np.abs(eG - w))


def decide_nemo_seq_mult(v: SeqView, tau: float) -> SeqDecision:
    """Drop the sequence if mean_t exp(|delta_t|) > tau (NeMo-RL's seq_logprob_error_threshold)."""
    mult = v.exp_abs_sum / np.maximum(v.T, 1)  # [S]; inf past |delta| > 709: dropped
    return SeqDecision.of(v, None, ~(mult <= tau))


def rule_tis_seq(
    delta: np.ndarray, seq: np.ndarray, C: float, *, view: SeqView | None = None
) -> Applied:
    """Truncated IS per sequence: every token gets min(exp(clamp(S, +-20)), C) (verl, SkyRL)."""
    return decide_tis_seq(_view(delta, seq, view), C).tokens(seq)


def rule_seq_mask_product(
    delta: np.ndarray, seq: np.ndarray, lo: float, hi: float, *, view: SeqView | None = None
) -> Applied:
    """Drop the sequence if exp(S) is outside [lo, hi] (SkyRL's product mask); weight 1."""
    return decide_seq_mask_product(_view(delta, seq, view), lo, hi).tokens(seq)


def rule_seq_mask_geo(
    delta: np.ndarray, seq: np.ndarray, lo: float, hi: float, *, view: SeqView | None = None
) -> Applied:
    """Drop the sequence if exp(G) = exp(S / T) is outside [lo, hi] (SkyRL's geometric mask)."""
    return decide_seq_mask_geo(_view(delta, seq, view), lo, hi).tokens(seq)


def rule_seq_mask_k3(
    delta: np.ndarray, seq: np.ndarray, tau: float, *, view: SeqView | None = None
) -> Applied:
    """Drop the sequence if mean_t k3_t > tau (verl's seq_mean_k3, clamped log-ratio)."""
    return decide_seq_mask_k3(_view(delta, seq, view), tau).tokens(seq)


def rule_seq_veto(
    delta: np.ndarray, seq: np.ndarray, tau: float, *, view: SeqView | None = None
) -> Applied:
    """Drop the sequence if any token has r_t < tau (slime, verl, SkyRL's outlier low)."""
    return decide_seq_veto(_view(delta, seq, view), tau).tokens(seq)


def rule_gspo_clip(
    delta: np.ndarray, seq: np.ndarray, lo: float, hi: float, *, view: SeqView | None = None
) -> Applied:
    """GSPO's sequence ratio exp(G) clipped to [lo, hi]; every token gets the clipped value."""
    return decide_gspo_clip(_view(delta, seq, view), lo, hi).tokens(seq)


def rule_nemo_seq_mult(
    delta: np.ndarray, seq: np.ndarray, tau: float, *, view: SeqView | None = None
) -> Applied:
    """Drop the sequence if mean_t exp(|delta_t|) > tau (NeMo-RL)."""
    return decide_nemo_seq_mult(_view(delta, seq, view), tau).tokens(seq)


# rule -> its per-sequence decision (the streamed path decides once, applies per batch)
SEQ_DECISIONS: dict[Callable[..., Applied], Callable[..., SeqDecision]] = {
    rule_tis_seq: decide_tis_seq,
    rule_seq_mask_product: decide_seq_mask_product,
    rule_seq_mask_geo: decide_seq_mask_geo,
    rule_seq_mask_k3: decide_seq_mask_k3,
    rule_seq_veto: decide_seq_veto,
    rule_gspo_clip: decide_gspo_clip,
    rule_nemo_seq_mult: decide_nemo_seq_mult,
}


# ----------------------------------------------------------------------------- registry


# What a method does to the tokens, as the figure, `--help` and the docs group them.
REWEIGHTS = "reweights"  # changes weights (caps, clips), drops no finite token
MASKS_TOKENS = "masks tokens"  # zeroes the weight of single tokens
MASKS_SEQUENCES = "masks sequences"  # drops whole sequences (weight 0 on every token)
PRUNES = "prunes the vocabulary"  # drops sampled tokens outside a safe vocabulary (DVP)
KINDS: tuple[str, ...] = (REWEIGHTS, MASKS_TOKENS, PRUNES, MASKS_SEQUENCES)


@dataclass(frozen=True)
class Method:
    """One correction: its rule, the level it decides at, what it does to the tokens
    (`kind`, one of KINDS), defaults, the formula and source."""

    name: str
    level: str  # "token" or "sequence"
    kind: str  # one of KINDS
    rule: Callable[..., Applied] | None  # None for DVP (built from the sweep)
    defaults: Mapping[str, float | None]
    formula: str
    source: str
    dvp_rule: str | None = None  # sweep rule of a DVP row

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name}: kind {self.kind!r} is not one of {KINDS}")
        if self.level not in ("token", "sequence"):
            raise ValueError(f"method {self.name}: level {self.level!r} is not token or sequence")
        if (self.rule is None) != (self.dvp_rule is not None):
            raise ValueError(f"method {self.name}: give a rule, or a dvp_rule, not both")


def methods_of_kind(kind: str) -> list[str]:
    """Names of the registered methods of one kind, in registry order."""
    return [m.name for m in METHODS.values() if m.kind == kind]


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("none", "token", REWEIGHTS, rule_none, {}, "w = 1", "no correction"),
        Method(
            "tis-token", "token", REWEIGHTS, rule_tis_token, {"C": 2.0}, "w = min(r, C)",
            "verl token TIS, SkyRL token_tis_ratio_clip_high, TRL token_truncate",
        ),
        Method(
            "tis-seq", "sequence", REWEIGHTS, rule_tis_seq, {"C": 5.0}, "w = min(exp(S), C) per sequence",
            "SkyRL sequence_tis_ratio_clip_high, verl rollout_is=sequence",
        ),
        Method(
            "icepop", "token", MASKS_TOKENS, rule_icepop, {"lo": 0.5, "hi": 5.0},
            "w = r if lo <= r <= hi else 0", "verl decoupled_token_icepop, OpenRLHF icepop",
        ),
        Method(
            "icepop-narrow", "token", MASKS_TOKENS, rule_icepop, {"lo": 0.5, "hi": 2.0},
            "w = r if lo <= r <= hi else 0", "SkyRL token_mask_is_threshold (docs), TRL token_mask",
        ),
        Method(
            "seq-mask-product", "sequence", MASKS_SEQUENCES, rule_seq_mask_product, {"lo": 0.5, "hi": 2.0},
            "drop sequence if exp(S) outside [lo, hi]", "SkyRL product mask, verl seq_sum_k1",
        ),
        Method(
            "seq-mask-geo", "sequence", MASKS_SEQUENCES, rule_seq_mask_geo, {"lo": 0.99, "hi": 1.01},
            "drop sequence if exp(G) outside [lo, hi]", "SkyRL geometric mask (verl: 0.999_1.001)",
        ),
        Method(
            "seq-mask-k3", "sequence", MASKS_SEQUENCES, rule_seq_mask_k3, {"tau": 0.01},
            "drop sequence if mean_t k3_t > tau", "verl seq_mean_k3",
        ),
        Method(
            "seq-veto", "sequence", MASKS_SEQUENCES, rule_seq_veto, {"tau": 1e-4},
            "drop sequence if any r_t < tau", "slime rs_veto_threshold, SkyRL outlier low",
        ),
        Method(
            "gspo-clip", "sequence", REWEIGHTS, rule_gspo_clip, {"lo": 1 - 3e-4, "hi": 1 + 4e-4},
            "w = clip(exp(G), lo, hi) per sequence", "GSPO (TRL docs recipe, OpenRLHF gspo)",
        ),
        Method(
            "cispo", "token", REWEIGHTS, rule_cispo, {"cap": 5.0}, "w = min(r, cap)",
            "TRL cispo (cap = epsilon_high)",
        ),
        Method(
            "nemo-seq-mult", "sequence", MASKS_SEQUENCES, rule_nemo_seq_mult, {"tau": 1.5},
            "drop sequence if mean_t exp(|delta_t|) > tau",
            "NeMo-RL seq_logprob_error_threshold",
        ),
        Method(
            "dvp-minp", "token", PRUNES, None, {"rho": None},
            "drop tokens with p < rho * max p (training side)", "seed paper, sweep-threshold",
            dvp_rule="min-p",
        ),
        Method(
            "dvp-abs", "token", PRUNES, None, {"rho": None}, "drop tokens with p < rho (training side)",
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
        items = [item.strip() for item in str(v).split(",")]
        if not any(items):
            raise MismatchError(
                f"--set {v!r} is empty: give NAME.KEY=VALUE (e.g. --set tis-token.C=3)"
            )
        for item in items:
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
            given = out.setdefault(name, {})
            if key in given and given[key] != value:
                raise MismatchError(
                    f"--set gives {name}.{key} twice ({given[key]:g} and {value:g}): give it once"
                )
            given[key] = value
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


__all__ = [
    "KINDS",
    "MASKS_SEQUENCES",
    "MASKS_TOKENS",
    "METHODS",
    "METHOD_NAMES",
    "PRUNES",
    "REWEIGHTS",
    "SEQ_DECISIONS",
    "Applied",
    "Method",
    "SeqAccumulator",
    "SeqDecision",
    "SeqView",
    "check_methods",
    "methods_of_kind",
    "parse_sets",
    "resolve_params",
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
    "seq_view",
]
