"""vLLM's sampler, replayed: the sampling distribution both sides are compared under.

vLLM samples from logits processed in this order (vllm/v1/sample/sampler.py and
logits_processor/builtin.py, vLLM 0.32):

    z  = logits / temperature                                    float32
    min-p   drop i where softmax(z)_i <  float32(min_p) * max_j softmax(z)_j
    top-k   drop i where z_i < (k-th largest z)
    top-p   sort ascending, drop the tokens whose cumulative probability is
            <= 1 - float32(top_p), always keeping the most likely
    log p = log_softmax(z with dropped tokens at -inf)

With `logprobs_mode="processed_logprobs"` vLLM returns log p of that distribution. The
training side (`rescore`) and the transformers engine (`rollout.HfEngine`) replay it with
`processed_logits`; `dvp` and `sweep` use the same `min_p_keep` comparison, so a token at
the boundary is kept or pruned identically everywhere (one min-p rule, vLLM's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """The sampling settings replayed on the training side."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0

    @property
    def truncates(self) -> bool:
        """True when some setting can drop tokens (the kept sets of both sides can differ)."""
        return self.top_p < 1.0 or self.top_k > 0 or self.min_p > 0


def _f32(x: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32, device=like.device)


def min_p_keep(probs: torch.Tensor, min_p: float) -> torch.Tensor:
    """vLLM's min-p rule on float32 probabilities: keep p_i >= float32(min_p) * max_j p_j.
    [..., V] -> [..., V] bool. `probs` must be `torch.softmax` of float32 logits."""
    return probs >= probs.amax(dim=-1, keepdim=True) * _f32(min_p, probs)


def top_p_drop(z: torch.Tensor, top_p: float) -> torch.Tensor:
    """vLLM's nucleus rule: which tokens top-p drops. [..., V] float32 logits -> bool."""
    if top_p >= 1.0:
        return torch.zeros_like(z, dtype=torch.bool)
    z_sorted, idx = z.sort(dim=-1, descending=False)  # [..., V] ascending
    cum = torch.softmax(z_sorted, dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= 1 - _f32(top_p, z)  # vLLM's float32 1 - p
    drop_sorted[..., -1] = False  # the most likely token always stays
    return torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)


def processed_logits(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Logits of the sampling distribution, dropped tokens at -inf. [n, V] -> [n, V] float32."""
    z = logits.float()
    if s.temperature != 1.0:
        z = z / s.temperature
    if s.min_p > 0:
        z = z.masked_fill(~min_p_keep(torch.softmax(z, dim=-1), s.min_p), float("-inf"))
    if s.top_k > 0 and s.top_k < z.shape[-1]:
        kth = z.topk(s.top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if s.top_p < 1.0:
        z = z.masked_fill(top_p_drop(z, s.top_p), float("-inf"))
    return z


def processed_logprobs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """log-probs of the sampling distribution, as vLLM's sampler builds it. [n, V] -> [n, V]."""
    return torch.log_softmax(processed_logits(logits, s), dim=-1)


__all__ = [
    "Sampling",
    "min_p_keep",
    "processed_logits",
    "processed_logprobs",
    "top_p_drop",
]
