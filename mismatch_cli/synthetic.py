"""Synthetic runs with a known ground truth, for tests and benchmarks (one shared generator).

`synthetic_tables`: each position draws training logits z [V], a logit perturbation delta [V]
with max |delta_i| = eps, defines p = softmax(z) (training side) and q = softmax(z + delta)
(inference side), samples a ~ q and stores exactly the columns `measure` stores, computed by
the same per-position code (`rescore.position_stats`). The (1 - p) bound therefore holds for
every token. Torch is imported only when this function runs.

`bulk_token_columns`: numpy only, the columns `report` reads, for runs of 10^7-10^8 tokens
generated chunk by chunk (benchmarks); |delta| <= 2 eps (1 - p) by construction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .runs import new_meta, token_frame, write_run
from .schema import COARSE_COLUMNS

SYNTHETIC_CONFIG: dict[str, Any] = {
    "model": "synthetic",
    "infer_engine": "synthetic",
    "infer_dtype": "float32",
    "train_dtype": "float32",
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": -1,
    "min_p": 0.0,
}


def synthetic_tables(
    num_sequences: int = 32,
    max_len: int = 48,
    vocab: int = 64,
    eps: float = 0.1,
    top_k: int = 8,
    logit_scale: float = 3.0,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(tokens, sequences) DataFrames of a synthetic run with the given perturbation size."""
    import torch

    from .rescore import position_stats

    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(1, max_len // 4), max_len + 1, size=num_sequences)
    N = int(lengths.sum())
    z = torch.as_tensor(rng.standard_normal((N, vocab)) * logit_scale, dtype=torch.float32)
    delta = torch.as_tensor(rng.uniform(-eps, eps, (N, vocab)), dtype=torch.float32)
    logp = torch.log_softmax(z, dim=-1)  # [N, V] training side
    logq = torch.log_softmax(z + delta, dim=-1)  # [N, V] inference side
    u = rng.random(N)
    cdf = logq.double().exp().cumsum(dim=-1).numpy()
    tokens = np.minimum((cdf < u[:, None]).sum(axis=1), vocab - 1)  # a ~ q
    tok = torch.as_tensor(tokens)
    q_top = logq.topk(min(top_k, vocab), dim=-1)
    lq = logq.gather(1, tok[:, None]).squeeze(1)
    st = position_stats(logp, tok, q_top.indices, q_top.values, lq, top_k, torch.softmax(z, -1))

    seq_id = np.repeat(np.arange(num_sequences), lengths)
    f64 = lambda k: st[k].double().numpy()  # noqa: E731
    df = token_frame(
        {
            "seq_id": seq_id.astype(np.int64),
            "prompt_id": (seq_id // 2).astype(np.int64),
            "sample_idx": (seq_id % 2).astype(np.int32),
            "pos": np.concatenate([np.arange(n) for n in lengths]).astype(np.int32),
            "token_id": tokens.astype(np.int32),
            "logp_infer": lq.double().numpy(),
            "logp_train": f64("logp_train"),
            "p_train": f64("p_train"),
            "p_max_train": f64("p_max_train"),
            "logp_max_train": f64("logp_max_train"),
            "entropy_train": f64("entropy_train"),
            "eps_hat": f64("eps_hat"),
            **{k: f64(k) for k in COARSE_COLUMNS},
            "topk_ids_infer": list(q_top.indices.numpy().astype(np.int32)),
            "topk_logp_infer": list(q_top.values.numpy()),
            "topk_ids_train": list(st["topk_ids_train"].numpy()),
            "topk_logp_train": list(st["topk_logp_train"].numpy()),
            "pruned_mass_minp": list(st["pruned_mass_minp"].numpy()),
            "pruned_mass_abs": list(st["pruned_mass_abs"].numpy()),
        }
    )
    ids = np.arange(num_sequences)
    seqs = pd.DataFrame(
        {
            "seq_id": ids.astype(np.int64),
            "prompt_id": (ids // 2).astype(np.int64),
            "sample_idx": (ids % 2).astype(np.int32),
            "prompt_token_ids": [np.array([1, 2, 3], dtype=np.int32)] * num_sequences,
            "response_token_ids": [
                np.asarray(v, dtype=np.int32) for _, v in df.groupby("seq_id")["token_id"]
            ],
            "finish_reason": ["length"] * num_sequences,
            "text": [""] * num_sequences,
        }
    )
    return df, seqs


def synthetic_meta(**fields: Any) -> dict[str, Any]:
    """run.json of a synthetic run: `new_meta` with the synthetic config and model."""
    return new_meta(
        "synthetic",
        config=dict(SYNTHETIC_CONFIG),
        model={"name": "synthetic", "path": None, "weights_sha256": None},
        **fields,
    )


def write_synthetic_run(path: str | Path, **kwargs: Any) -> Path:
    """Write a complete synthetic run directory (run.json + both tables) and return its path."""
    tokens, seqs = synthetic_tables(**kwargs)
    return write_run(path, tokens, seqs, synthetic_meta(synthetic={"eps": 0.1, **kwargs}))


def bulk_token_columns(
    num_tokens: int, first_seq: int = 0, eps: float = 0.1, seed: int = 0
) -> dict[str, np.ndarray]:
    """The columns `report` reads for `num_tokens` synthetic tokens, numpy only (fast).

    The deltas follow the (1 - p) shape: |delta| <= 2 eps (1 - p), signed noise plus a small
    positive tail bias; most tokens confident, a long tail of p down to 1e-8; about 1e-5 of
    tokens have an infinite delta. Completion lengths 16..496 (mean 256); sequence ids start
    at `first_seq` (so chunks of one run can be generated separately)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(16, 497, size=num_tokens // 256 + 2)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), num_tokens) + 1]
    lengths[-1] -= lengths.sum() - num_tokens  # exactly num_tokens
    seq_id = first_seq + np.repeat(np.arange(lengths.size, dtype=np.int64), lengths)  # [N]
    logp_train = -rng.exponential(1.0, num_tokens) * rng.choice([0.05, 2.0, 8.0], num_tokens)
    p_train = np.exp(logp_train)
    delta = 2 * eps * (1 - p_train) * rng.uniform(-1, 1, num_tokens) + 0.002 * (1 - p_train)
    kept = rng.random(num_tokens) > 1e-5
    delta[~kept] = np.inf
    return {
        "seq_id": seq_id,
        "delta": delta,
        "p_train": np.where(kept, p_train, 0.0),
        "p_infer": np.minimum(p_train * np.exp(np.where(kept, delta, 0.0)), 1.0),
        "eps_hat": rng.uniform(0.5 * eps, eps, num_tokens),
        "kept_train": kept,
    }


def bulk_grid_columns(
    cols: dict[str, np.ndarray], first_token: int = 0, seed: int = 0, grids: bool = True
) -> dict[str, Any]:
    """What `sweep-threshold` and `corrections` read on top of `bulk_token_columns`, numpy
    only: p_max_train (>= p_train), both pruned-mass grids as list<float32> Arrow columns
    (m(rho) = (1 - p_max) sqrt(rho / scale), capped at 1 - p_max: monotone in rho, small
    enough at the lowest rho that the sweep recommends one; omitted when not `grids`), and
    `step` (one per 10^6 tokens from `first_token`) / `advantage` (one per sequence) as
    imported runs have them."""
    import pyarrow as pa

    from .schema import RHO_GRID

    rng = np.random.default_rng(10_000 + seed)
    p = cols["p_train"]
    n = p.size
    p_max = np.maximum(p, rng.uniform(0.3, 1.0, n))  # [n]
    seq = cols["seq_id"]
    out: dict[str, Any] = {
        "p_max_train": p_max,
        "step": ((first_token + np.arange(n)) // 1_000_000).astype(np.int64),
        "advantage": rng.normal(0, 1, int(seq.max() - seq.min()) + 1)[seq - seq.min()],
    }
    if grids:
        rho = np.asarray(RHO_GRID, dtype=np.float64)  # [G]
        tail = (1 - p_max)[:, None]  # [n, 1]
        G = rho.size
        offsets = pa.array(np.arange(0, (n + 1) * G, G, dtype=np.int32))
        for name, scale in (("pruned_mass_minp", 0.5), ("pruned_mass_abs", 0.3)):
            m = tail * np.minimum(1.0, np.sqrt(rho[None, :] / scale))  # [n, G]
            out[name] = pa.ListArray.from_arrays(
                offsets, pa.array(m.reshape(-1).astype(np.float32))
            )
    return out
