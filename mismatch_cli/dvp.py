"""Dynamic vocabulary pruning (DVP): the training-side primitive an RL trainer imports.

The safe vocabulary at a context c (docs/theory.md, "Dynamic vocabulary pruning (DVP)"):
    min-p rule     S_rho(c) = {a : p(a|c) >= rho * max_b p(b|c)}
    absolute rule  S_tau(c) = {a : p(a|c) >= tau}
    top-p rule     the smallest set of most likely tokens whose mass reaches rho
The pruned policy is p restricted to S and renormalised:
    log p~(a|c) = log p(a|c) - log P(S),    P(S) = sum_{b in S} p(b|c)
and the pruned mass m(c) = 1 - P(S) is the total-variation distance between p and p~.

One rule everywhere: the comparisons are vLLM's (`sampling.min_p_keep`: float32 softmax
probabilities, threshold float32(rho) * max p), so `measure --min-p`, a rollout engine
sampling with `min_p = rho`, this module and `sweep-threshold` keep or prune a token at the
boundary identically. The absolute rule compares the same probabilities with float32(tau).

Shapes: logits [..., V] (any leading batch dims, e.g. [B, T, V]); tokens [...].
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal

import torch

from .sampling import min_p_keep, top_p_drop

Rule = Literal["min-p", "absolute", "top-p"]
RULES: tuple[str, ...] = ("min-p", "absolute", "top-p")


def _check(rho: float, rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; use one of {', '.join(RULES)}")
    if not (0.0 < rho < 1.0) and not (rule == "top-p" and rho == 1.0):
        raise ValueError(f"rho must be in (0, 1), got {rho}")


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = logits.float()
    return z / temperature if temperature != 1.0 else z


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """float32 log-softmax of logits / temperature. [..., V] -> [..., V]."""
    return torch.log_softmax(_scaled(logits, temperature), dim=-1)


def safe_vocab_mask_from_probs(
    probs: torch.Tensor, rho: float, rule: Rule = "min-p"
) -> torch.Tensor:
    """Boolean mask [..., V] of the safe vocabulary, from float32 softmax probabilities."""
    _check(rho, rule)
    if rule == "min-p":
        return min_p_keep(probs, rho)
    if rule == "absolute":
        return probs >= torch.tensor(rho, dtype=torch.float32, device=probs.device)
    return ~top_p_drop(torch.log(probs), rho)


def safe_vocab_mask_from_logp(logp: torch.Tensor, rho: float, rule: Rule = "min-p") -> torch.Tensor:
    """Boolean mask [..., V] from float32 log-probs (via exp(logp); prefer the logits form,
    whose softmax is bit-identical to the engine's)."""
    return safe_vocab_mask_from_probs(logp.exp(), rho, rule)


def top_p_mask(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus mask [..., V]: keep all but the least likely tokens whose total mass is
    <= 1 - top_p (vLLM's rule, `sampling.top_p_drop`)."""
    return ~top_p_drop(logp, top_p)


def safe_vocab_mask(
    logits: torch.Tensor, rho: float, rule: Rule = "min-p", temperature: float = 1.0
) -> torch.Tensor:
    """Boolean mask [..., V]: True for tokens in the safe vocabulary S_rho."""
    z = _scaled(logits, temperature)
    if rule == "top-p":
        _check(rho, rule)
        return ~top_p_drop(z, rho)
    return safe_vocab_mask_from_probs(torch.softmax(z, dim=-1), rho, rule)


def pruned_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    rho: float,
    rule: Rule = "min-p",
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of `tokens` [...] under the pruned, renormalised policy p~.

    Returns (logp [...], kept [...]): logp is differentiable wrt logits for kept tokens and
    -inf for tokens outside the safe set; kept says which tokens are in the safe set.
    """
    logp = log_probs(logits, temperature)  # [..., V]
    mask = safe_vocab_mask(logits.detach(), rho, rule, temperature)  # [..., V]
    log_mass = torch.logsumexp(logp.masked_fill(~mask, float("-inf")), dim=-1)  # [...]
    tok = tokens.long().unsqueeze(-1)
    logp_tok = logp.gather(-1, tok).squeeze(-1)  # [...]
    kept = mask.gather(-1, tok).squeeze(-1)  # [...]
    out = torch.where(kept, logp_tok - log_mass, torch.full_like(logp_tok, float("-inf")))
    return out, kept


def pruned_mass(
    logits: torch.Tensor, rho: float, rule: Rule = "min-p", temperature: float = 1.0
) -> torch.Tensor:
    """Training-side probability outside the safe set, m = 1 - P(S). [..., V] -> [...]."""
    probs = torch.softmax(_scaled(logits, temperature), dim=-1)
    if rule == "top-p":
        mask = safe_vocab_mask(logits, rho, rule, temperature)
        return probs.masked_fill(mask, 0.0).sum(dim=-1)
    return pruned_mass_from_probs(probs, rho, rule)


def pruned_mass_from_probs(
    probs: torch.Tensor, rho: float, rule: Rule = "min-p", *, inplace: bool = False
) -> torch.Tensor:
    """`pruned_mass` from the float32 softmax probabilities already computed (min-p or
    absolute rule; one softmax serves the mask and the mass). `inplace`: zero the kept
    tokens' entries of `probs` itself (no second [..., V] array). [..., V] -> [...]."""
    keep = safe_vocab_mask_from_probs(probs, rho, rule)
    return (probs.masked_fill_(keep, 0.0) if inplace else probs.masked_fill(keep, 0.0)).sum(-1)


def pruned_mass_grid(
    probs: torch.Tensor,
    grid: Sequence[float],
    rule: Literal["min-p", "absolute"] = "min-p",
) -> torch.Tensor:
    """Pruned mass at every threshold of an ascending `grid` at once. [..., V] -> [..., G].

    One pass: each token goes into the bin of the largest threshold it falls below, its
    probability is summed per bin, and a cumulative sum over bins gives m(rho_g). The
    keep/prune comparison is `safe_vocab_mask_from_probs`'s (float32, vLLM's min-p rule).
    """
    _check_grid(grid)
    if rule not in ("min-p", "absolute"):
        raise ValueError(f"grid pruned mass supports min-p and absolute, not {rule!r}")
    flat = probs.reshape(-1, probs.shape[-1])  # [N, V]
    g = torch.tensor(list(grid), dtype=torch.float32, device=probs.device)  # [G]
    thresholds = flat.amax(dim=-1, keepdim=True) * g if rule == "min-p" else g[None]
    out = _grid_from_bins(flat, _bins(flat, thresholds), len(grid))  # [N, G]
    return out.reshape(*probs.shape[:-1], len(grid))


def pruned_mass_grids(
    probs: torch.Tensor, grid: Sequence[float], p_max: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`pruned_mass_grid` for the min-p and the absolute rule together, sharing the pass
    that reads each probability's exponent. probs [n, V] (p_max [n] = probs.amax(1) if
    already known) -> (min-p [n, G], absolute [n, G]), bit-identical to two calls."""
    _check_grid(grid)
    g = torch.tensor(list(grid), dtype=torch.float32, device=probs.device)  # [G]
    pmax = probs.amax(dim=-1) if p_max is None else p_max  # [n]
    exps = _exponents(probs)
    return tuple(  # type: ignore[return-value]
        _grid_from_bins(probs, _bins(probs, thr, exps), len(grid))
        for thr in (pmax[:, None] * g, g[None])
    )


def _check_grid(grid: Sequence[float]) -> None:
    if any(b <= a for a, b in itertools.pairwise(grid)):
        raise ValueError("the pruning grid must be strictly ascending")


def _grid_from_bins(flat: torch.Tensor, bins: torch.Tensor, n: int) -> torch.Tensor:
    """Sum each row's probabilities per bin (0..n) and accumulate: tokens in bin b are pruned
    at thresholds g >= b, so m_g = sum_{b <= g} mass_b. flat [N, V], bins [N, V] -> [N, n]."""
    N = flat.shape[0]
    if bins.dtype == torch.int32:  # flat indices row * (n + 1) + bin (`_octave_bins`)
        mass = torch.zeros(N * (n + 1), dtype=flat.dtype, device=flat.device)
        mass.index_add_(0, bins.reshape(-1), flat.reshape(-1))  # the order scatter_add_ sums in
        mass = mass.view(N, n + 1)
    else:
        mass = torch.zeros(N, n + 1, dtype=flat.dtype, device=flat.device)
        mass.scatter_add_(1, bins, flat)  # [N, n+1]
    return mass[:, :n].cumsum(dim=1)  # [N, n]


# float32 bit layout: sign (1), exponent (8), mantissa (23); for x >= +0 the int32 view of x
# orders like x itself.
_MANTISSA_BITS = 23
_EXPONENTS = 256


def _exponents(flat: torch.Tensor) -> torch.Tensor | None:
    """The biased float32 exponent of each probability plus row * 256, int32 [N, V] (the
    index of the row's octave table), or None where the octave bins do not apply (not
    float32, or a value with the sign bit set, e.g. -0.0)."""
    if flat.dtype != torch.float32 or flat.numel() == 0 or flat.device.type == "meta":
        return None
    bits = flat.view(torch.int32)  # [N, V]
    # torch.bitwise_right_shift, not `>>`: the operator with a Python int runs ~10x slower
    exps = torch.bitwise_right_shift(bits, _MANTISSA_BITS)  # [N, V] 0..255 for x >= +0, else < 0
    if bool(exps.min() < 0):
        return None
    rows = torch.arange(0, flat.shape[0] * _EXPONENTS, _EXPONENTS, dtype=torch.int32)
    return exps.add_(rows.to(flat.device)[:, None])


def _bins(
    flat: torch.Tensor, thresholds: torch.Tensor, exps: torch.Tensor | None = None
) -> torch.Tensor:
    """For each p_i, the number of thresholds p_i is NOT below (vLLM's comparison
    p_i >= t_g in float32): flat [N, V], thresholds [N or 1, G] ascending float32.

    Fast path (`_octave_bins`), int32 flat indices; else a binary search (int64, [N, V])."""
    if exps is None:
        exps = _exponents(flat)
    if exps is not None:
        bins = _octave_bins(flat, thresholds.expand(flat.shape[0], -1), exps)
        if bins is not None:
            return bins
    if thresholds.shape[0] == 1:
        return torch.bucketize(flat, thresholds[0], right=True)  # [N, V] in 0..G
    return torch.searchsorted(thresholds.contiguous(), flat, right=True)  # [N, V]


def _octave_bins(flat: torch.Tensor, thr: torch.Tensor, exps: torch.Tensor) -> torch.Tensor | None:
    """Bins without a search, exact: when consecutive thresholds differ by a factor >= 2
    (the 1-2-5 grid, and max p times it: float32 rounding keeps t_{g+1} >= 2 t_g), each binary
    octave [2^e, 2^(e+1)) holds at most one threshold, so
        bin(p) = #{t_g : exponent(t_g) <= e(p)} - [p < the threshold in p's octave]
    from two lookups in a 256-entry table per row and one integer comparison (p < t iff
    bits(p) - bits(t) < 0 for p, t >= +0). Returns row * (G + 1) + bin, int32 [N, V], or None
    when a threshold is not a normal float or two share an octave.

    flat [N, V] float32 >= +0; thr [N, G]; exps [N, V] = `_exponents(flat)`."""
    N, G = thr.shape
    tiny = torch.finfo(torch.float32).tiny
    spaced = (thr[:, 1:] >= 2 * thr[:, :-1]).all() & (thr[:, 0] >= tiny).all()
    if not bool(spaced & torch.isfinite(thr[:, -1]).all()):
        return None
    t_exp = (thr.view(torch.int32) >> _MANTISSA_BITS).long()  # [N, G] octave of each threshold
    counts = torch.zeros(N, _EXPONENTS, dtype=torch.int32, device=flat.device)
    counts.scatter_add_(1, t_exp, torch.ones_like(t_exp, dtype=torch.int32))  # [N, 256]
    row0 = torch.arange(0, N * (G + 1), G + 1, dtype=torch.int32, device=flat.device)
    upto = counts.cumsum(dim=1, dtype=torch.int32) + row0[:, None]  # [N, 256] thresholds <= octave
    t_bits = torch.zeros(N, _EXPONENTS, dtype=torch.int32, device=flat.device)
    t_bits.scatter_(1, t_exp, thr.contiguous().view(torch.int32))  # [N, 256], 0 = none there
    e = exps.view(-1)  # [N V]
    below = t_bits.view(-1).index_select(0, e)  # [N V] bits of the threshold in p's octave
    below.sub_(flat.view(torch.int32).reshape(-1)).neg_()  # bits(p) - bits(t), in place (an
    # out= aliasing an input takes a slow path)
    torch.bitwise_right_shift(below, 31, out=below)  # -1 where p < that threshold, else 0
    below += upto.view(-1).index_select(0, e)
    return below.view(flat.shape)


def pruned_mass_grid_from_logp(
    logp: torch.Tensor,
    grid: Sequence[float],
    rule: Literal["min-p", "absolute"] = "min-p",
    probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """`pruned_mass_grid` from log-probs (probs = exp(logp) unless given). [..., V] -> [..., G]."""
    return pruned_mass_grid(logp.exp() if probs is None else probs, grid, rule)


__all__ = [
    "RULES",
    "log_probs",
    "pruned_logprobs",
    "pruned_mass",
    "pruned_mass_grid",
    "pruned_mass_grid_from_logp",
    "pruned_mass_grids",
    "safe_vocab_mask",
    "safe_vocab_mask_from_logp",
    "safe_vocab_mask_from_probs",
    "top_p_mask",
]
