"""Dynamic vocabulary pruning (DVP): the training-side primitive an RL trainer imports.

The safe vocabulary at a context c (theory.md section 4):
    min-p rule     S_rho(c) = {a : p(a|c) >= rho * max_b p(b|c)}
                   i.e. log p(a|c) >= log max_b p(b|c) + log(rho)
    absolute rule  S_tau(c) = {a : p(a|c) >= tau}
    top-p rule     the smallest set of most likely tokens whose mass reaches rho
The pruned policy is p restricted to S and renormalised:
    log p~(a|c) = log p(a|c) - log P(S),    P(S) = sum_{b in S} p(b|c)
and the pruned mass m(c) = 1 - P(S) is the total-variation distance between p and p~.

Shapes: logits [..., V] (any leading batch dims, e.g. [B, T, V]); tokens [...].
All comparisons are made on float32 log-probs, in exactly the form written above, so
the stored run (`measure`) and `sweep-threshold` reach the same keep/prune decisions.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Literal

import torch

Rule = Literal["min-p", "absolute", "top-p"]
RULES: tuple[str, ...] = ("min-p", "absolute", "top-p")


def _check(rho: float, rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; use one of {', '.join(RULES)}")
    if not (0.0 < rho < 1.0) and not (rule == "top-p" and rho == 1.0):
        raise ValueError(f"rho must be in (0, 1), got {rho}")


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """float32 log-softmax of logits / temperature. [..., V] -> [..., V]."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    return torch.log_softmax(z, dim=-1)


def safe_vocab_mask_from_logp(logp: torch.Tensor, rho: float, rule: Rule = "min-p") -> torch.Tensor:
    """Boolean mask [..., V] of the safe vocabulary, from float32 log-probs [..., V]."""
    _check(rho, rule)
    if rule == "min-p":
        log_rho = torch.tensor(math.log(rho), dtype=logp.dtype)
        return logp >= logp.amax(dim=-1, keepdim=True) + log_rho
    if rule == "absolute":
        return logp >= torch.tensor(math.log(rho), dtype=logp.dtype)
    return top_p_mask(logp, rho)


def top_p_mask(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus mask [..., V]: drop the least likely tokens whose total mass is <= 1 - top_p.

    Same rule as vLLM's sampler (ascending sort, cumulative sum, always keep the top token).
    """
    if top_p >= 1.0:
        return torch.ones_like(logp, dtype=torch.bool)
    sorted_logp, idx = logp.sort(dim=-1, descending=False)  # [..., V] ascending
    cum = sorted_logp.exp().cumsum(dim=-1)
    drop_sorted = cum <= 1 - torch.tensor(top_p, dtype=cum.dtype, device=cum.device)
    drop_sorted[..., -1] = False  # the most likely token always stays
    drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
    return ~drop


def safe_vocab_mask(
    logits: torch.Tensor, rho: float, rule: Rule = "min-p", temperature: float = 1.0
) -> torch.Tensor:
    """Boolean mask [..., V]: True for tokens in the safe vocabulary S_rho."""
    return safe_vocab_mask_from_logp(log_probs(logits, temperature), rho, rule)


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
    mask = safe_vocab_mask_from_logp(logp.detach(), rho, rule)  # [..., V]
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
    logp = log_probs(logits, temperature)
    mask = safe_vocab_mask_from_logp(logp, rho, rule)
    return logp.exp().masked_fill(mask, 0.0).sum(dim=-1)


def pruned_mass_grid_from_logp(
    logp: torch.Tensor,
    grid: Sequence[float],
    rule: Literal["min-p", "absolute"] = "min-p",
    probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pruned mass at every threshold of an ascending `grid` at once. [..., V] -> [..., G].

    One pass: each token goes into the bin of the largest threshold it falls below, its
    probability is summed per bin, and a cumulative sum over bins gives m(rho_g). The
    keep/prune comparison is the same float32 one as `safe_vocab_mask_from_logp`. `probs`
    (= logp.exp()) may be passed in to avoid recomputing it.
    """
    log_grid = [math.log(r) for r in grid]
    if any(b <= a for a, b in itertools.pairwise(log_grid)):
        raise ValueError("the pruning grid must be strictly ascending")
    # [G] ascending, on logp's device (a CPU tensor here breaks CUDA inputs)
    g = torch.tensor(log_grid, dtype=logp.dtype, device=logp.device)
    n = len(grid)
    flat_logp = logp.reshape(-1, logp.shape[-1])  # [N, V]
    if rule == "min-p":
        thresholds = flat_logp.amax(dim=-1, keepdim=True) + g  # [N, G]
        # bin b(i) = number of thresholds logp_i is NOT below: token i is pruned at g >= b(i)
        bins = torch.searchsorted(thresholds.contiguous(), flat_logp, right=True)  # [N, V]
    elif rule == "absolute":
        bins = torch.bucketize(flat_logp, g, right=True)  # [N, V] in 0..G, same thresholds
    else:
        raise ValueError(f"grid pruned mass supports min-p and absolute, not {rule!r}")
    flat_p = flat_logp.exp() if probs is None else probs.reshape(flat_logp.shape)  # [N, V]
    mass = torch.zeros(flat_logp.shape[0], n + 1, dtype=logp.dtype, device=logp.device)
    mass.scatter_add_(1, bins, flat_p)  # [N, G+1]
    # tokens in bin b are pruned at thresholds g >= b: m_g = sum_{b <= g} mass_b
    out = mass[:, :n].cumsum(dim=1)  # [N, G]
    return out.reshape(*logp.shape[:-1], n)


__all__ = [
    "RULES",
    "log_probs",
    "pruned_logprobs",
    "pruned_mass",
    "pruned_mass_grid_from_logp",
    "safe_vocab_mask",
    "safe_vocab_mask_from_logp",
    "top_p_mask",
]
