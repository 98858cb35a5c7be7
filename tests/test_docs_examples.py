"""The code in the docs runs: the DVP loss of docs/choosing-a-threshold.md on random tensors."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "choosing-a-threshold.md"
MARKER = "<!-- test: dvp-loss -->"
# A python fence right after the marker (blank lines allowed in between).
BLOCK = re.compile(re.escape(MARKER) + r"\s*```python\n(.*?)\n```", re.DOTALL)


def marked_blocks(text: str) -> list[str]:
    """The python code blocks preceded by the dvp-loss marker comment."""
    return BLOCK.findall(text)


@pytest.fixture(scope="module")
def snippet() -> str:
    blocks = marked_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) == 1, f"expected one python block marked {MARKER} in {DOC.name}"
    return blocks[0]


def prelude(B: int, T: int, V: int, rho: float, temperature: float, seed: int) -> dict:
    """The names the snippet expects: logits [B, T, V], tokens [B, T], advantages [B],
    mask [B, T], rho, temperature."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 4.0).requires_grad_(True)
    tokens = torch.randint(0, V, (B, T), generator=g)
    advantages = torch.randn(B, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()  # right padding
    return {
        "logits": logits,
        "tokens": tokens,
        "advantages": advantages,
        "mask": mask,
        "rho": rho,
        "temperature": temperature,
    }


@pytest.mark.parametrize(
    ("rho", "temperature", "seed"),
    [(1e-3, 1.0, 0), (0.05, 0.7, 1), (0.2, 1.3, 2)],
)
def test_dvp_loss_snippet_runs(snippet: str, rho: float, temperature: float, seed: int) -> None:
    ns = prelude(B=3, T=7, V=32, rho=rho, temperature=temperature, seed=seed)
    logits = ns["logits"]
    exec(compile(snippet, str(DOC), "exec"), ns)

    loss = ns["loss"]
    assert loss.ndim == 0
    assert math.isfinite(loss.item())
    grad = logits.grad
    assert grad is not None, "the snippet must call loss.backward()"
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0

    # Positions outside the loss (padding, tokens outside the safe set) get no gradient.
    use = ns["mask"].bool() & ns["kept"]
    assert use.any()
    assert torch.all(grad[~use] == 0)
    assert torch.all(grad[use].abs().sum(dim=-1) > 0)


def test_dvp_loss_snippet_masks_pruned_tokens(snippet: str) -> None:
    """Sampled tokens outside the safe set (here: the least likely token) are dropped and the
    loss still equals the hand-computed pruned policy gradient loss on the rest."""
    ns = prelude(B=2, T=5, V=16, rho=0.1, temperature=1.0, seed=3)
    logits = ns["logits"]
    ns["tokens"] = logits.detach().argmin(dim=-1)  # far below 0.1 * max p at scale 4
    ns["tokens"][:, 0] = logits.detach()[:, 0].argmax(dim=-1)  # one kept token per row
    exec(compile(snippet, str(DOC), "exec"), ns)
    assert not ns["kept"].all() and ns["kept"].any()
    assert math.isfinite(ns["loss"].item())

    # Reference: log p~ = log p - log P(S) on kept response tokens, token-mean REINFORCE.
    with torch.no_grad():
        logp = torch.log_softmax(logits.float(), dim=-1)
        safe = logp >= logp.amax(dim=-1, keepdim=True) + math.log(0.1)
        logp_s = logp - torch.logsumexp(logp.masked_fill(~safe, -math.inf), dim=-1, keepdim=True)
        tok = ns["tokens"][..., None]
        lp = logp_s.gather(-1, tok).squeeze(-1)
        use = ns["mask"].bool() & safe.gather(-1, tok).squeeze(-1)
        ref = -(ns["advantages"][:, None] * torch.where(use, lp, 0.0)).sum() / use.sum()
    torch.testing.assert_close(ns["loss"].detach(), ref)
