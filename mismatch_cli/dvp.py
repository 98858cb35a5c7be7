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
    mask = safe_vocab_mask(logits, rho, rule, temperature)
    return probs.masked_fill(mask, 0.0).sum(dim=-1)


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
    if any(b <= a for a, b in itertools.pairwise(grid)):
        raise ValueError("the pruning grid must be strictly ascending")
    g = torch.tensor(list(grid), dtype=torch.float32, device=probs.device)  # [G]
    n = len(grid)
    flat = probs.reshape(-1, probs.shape[-1])  # [N, V]
    if rule == "min-p":
        thresholds = flat.amax(dim=-1, keepdim=True) * g  # [N, G] float32, ascending
        # bin b(i) = number of thresholds p_i is NOT below: token i is pruned at g >= b(i)
        bins = torch.searchsorted(thresholds.contiguous(), flat, right=True)  # [N, V]
    elif rule == "absolute":
        bins = torch.bucketize(flat, g, right=True)  # [N, V] in 0..G
    else:
        raise ValueError(f"grid pruned mass supports min-p and absolute, not {rule!r}")
    mass = torch.zeros(flat.shape[0], n + 1, dtype=flat.dtype, device=flat.device)
    mass.scatter_add_(1, bins, flat)  # [N, G+1]
    # tokens in bin b are pruned at thresholds g >= b: m_g = sum_{b <= g} mass_b
    out = mass[:, :n].cumsum(dim=1)  # [N, G]
    return out.reshape(*probs.shape[:-1], n)


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
    "safe_vocab_mask",
    "safe_vocab_mask_from_logp",
    "safe_vocab_mask_from_probs",
    "top_p_mask",
]
