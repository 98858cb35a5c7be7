"""One min-p rule, vLLM's, everywhere: the training-side replay (what `measure --min-p`
applies), `dvp.safe_vocab_mask` and `sweep-threshold` keep or prune a token at the boundary
identically, and exactly as vLLM's own MinPLogitsProcessor does."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mismatch_cli import dvp
from mismatch_cli import sweep as sw
from mismatch_cli.rescore import position_stats
from mismatch_cli.sampling import Sampling, min_p_keep, processed_logits


def _boundary_rows(rho: float, n: int = 300, vocab: int = 1000, blocks: int = 12) -> torch.Tensor:
    """Rows [blocks * (n + 1), V] of random logits whose token 1 sits within n/2 ulps of the
    min-p threshold logit z_max + log(rho)."""
    g = torch.Generator().manual_seed(int(-math.log(rho) * 1000))
    rows = []
    for _ in range(blocks):
        z = torch.randn(vocab, generator=g) * 3
        x = [np.float32(float(z.max()) + math.log(rho))]
        for _ in range(n // 2):
            x.insert(0, np.nextafter(x[0], np.float32(-np.inf)))
            x.append(np.nextafter(x[-1], np.float32(np.inf)))
        block = z.repeat(len(x), 1)
        block[:, 1] = torch.tensor(np.asarray(x, dtype=np.float32))
        rows.append(block)
    return torch.cat(rows)


@pytest.mark.parametrize("rho", [1e-3, 0.02, 0.2])
def test_min_p_boundary_is_decided_identically_everywhere(rho: float) -> None:
    z = _boundary_rows(rho)
    tok = torch.ones(z.shape[0], dtype=torch.long)
    # 1. the training-side replay of `measure --min-p rho`
    replay = torch.isfinite(processed_logits(z, Sampling(min_p=rho))[:, 1])
    # 2. the trainer's primitive
    dvp_kept = dvp.safe_vocab_mask(z, rho)[:, 1]
    # 3. sweep-threshold, from the columns an unpruned run stores
    logp, probs = torch.log_softmax(z, -1), torch.softmax(z, -1)
    none = torch.full((z.shape[0], 1), -1)  # no inference-side top-K needed here
    st = position_stats(logp, tok, none, torch.full((z.shape[0], 1), -np.inf), logp[:, 1], 2, probs)
    p_train = st["p_train"].double().numpy()  # float64 in tokens.parquet
    p_max = st["p_max_train"].double().numpy()
    sweep_kept = sw.kept_mask(p_train, p_max, rho, "min-p")
    # 4. vLLM's own logits processor arithmetic
    vllm_kept = probs[:, 1] >= probs.amax(-1) * torch.tensor(rho, dtype=torch.float32)

    assert torch.equal(replay, dvp_kept)
    assert np.array_equal(replay.numpy(), sweep_kept)
    assert torch.equal(replay, vllm_kept)
    assert replay.any() and (~replay).any()  # the boundary is really inside the rows
    # the log-space comparison the tool used before disagrees on some of these rows
    old = logp[:, 1] >= logp.amax(-1) + torch.tensor(math.log(rho), dtype=torch.float32)
    assert not torch.equal(old, replay)


def test_min_p_keep_matches_vllms_processor() -> None:
    from vllm.v1.sample.logits_processor.builtin import MinPLogitsProcessor

    z = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)) * 4
    proc = MinPLogitsProcessor.__new__(MinPLogitsProcessor)
    proc.min_p_count = 1
    proc.min_p = torch.full((64, 1), 0.05, dtype=torch.float32)
    got = proc.apply(z.clone())
    assert torch.equal(torch.isfinite(got), min_p_keep(torch.softmax(z, -1), 0.05))
