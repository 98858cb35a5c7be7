"""Synthetic runs with a known ground truth, for tests and benchmarks.

Each position draws training logits z [V], a logit perturbation delta [V] with
max |delta_i| = eps, defines p = softmax(z) (training side) and q = softmax(z + delta)
(inference side), samples a ~ q and stores exactly the columns `measure` stores, computed by
the same per-position code. The (1 - p) bound therefore holds for every token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from .rescore import position_stats
from .runs import RunDir, atomic_write_table
from .schema import CONVENTIONS, FORMAT_VERSION, RHO_GRID, SEQUENCES_FILE, TOKENS_FILE


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
    st = position_stats(logp, tok, q_top.indices, q_top.values, lq, top_k)

    seq_id = np.repeat(np.arange(num_sequences), lengths)
    pos = np.concatenate([np.arange(n) for n in lengths])
    logp_infer = lq.double().numpy()
    logp_train = st["logp_train"].double().numpy()
    df = pd.DataFrame(
        {
            "seq_id": seq_id.astype(np.int64),
            "prompt_id": (seq_id // 2).astype(np.int64),
            "sample_idx": (seq_id % 2).astype(np.int32),
            "pos": pos.astype(np.int32),
            "token_id": tokens.astype(np.int32),
            "logp_infer": logp_infer,
            "logp_train": logp_train,
            "delta": logp_infer - logp_train,
            "p_infer": np.exp(logp_infer),
            "p_train": np.exp(logp_train),
            "p_max_train": np.exp(st["logp_max_train"].double().numpy()),
            "logp_max_train": st["logp_max_train"].double().numpy(),
            "entropy_train": st["entropy_train"].double().numpy(),
            "eps_hat": st["eps_hat"].double().numpy(),
            "kept_train": np.isfinite(logp_train),
            "topk_ids_infer": list(q_top.indices.numpy().astype(np.int32)),
            "topk_logp_infer": list(q_top.values.numpy()),
            "topk_ids_train": list(st["topk_ids_train"].numpy()),
            "topk_logp_train": list(st["topk_logp_train"].numpy()),
            "pruned_mass_minp": list(st["pruned_mass_minp"].numpy()),
            "pruned_mass_abs": list(st["pruned_mass_abs"].numpy()),
        }
    )
    g = df.groupby("seq_id", sort=True)
    seqs = pd.DataFrame(
        {
            "seq_id": np.arange(num_sequences, dtype=np.int64),
            "prompt_id": (np.arange(num_sequences) // 2).astype(np.int64),
            "sample_idx": (np.arange(num_sequences) % 2).astype(np.int32),
            "prompt_token_ids": [np.array([1, 2, 3], dtype=np.int32)] * num_sequences,
            "response_token_ids": [np.asarray(v, dtype=np.int32) for _, v in g["token_id"]],
            "num_tokens": lengths.astype(np.int32),
            "sum_delta": g["delta"].sum().to_numpy(),
            "logp_infer_sum": g["logp_infer"].sum().to_numpy(),
            "logp_train_sum": g["logp_train"].sum().to_numpy(),
            "finish_reason": ["length"] * num_sequences,
            "text": [""] * num_sequences,
        }
    )
    return df, seqs


def write_synthetic_run(path: str | Path, **kwargs: Any) -> Path:
    """Write a complete synthetic run directory (run.json + both tables) and return its path."""
    path = Path(path)
    tokens, seqs = synthetic_tables(**kwargs)
    run = RunDir(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_table(path / TOKENS_FILE, pa.Table.from_pandas(tokens, preserve_index=False))
    atomic_write_table(path / SEQUENCES_FILE, pa.Table.from_pandas(seqs, preserve_index=False))
    run.write_meta(
        {
            "format_version": FORMAT_VERSION,
            "status": "complete",
            "synthetic": {"eps": kwargs.get("eps", 0.1), **{k: v for k, v in kwargs.items()}},
            "model": {"name": "synthetic", "path": None, "weights_sha256": None},
            "config": {
                "model": "synthetic",
                "infer_engine": "synthetic",
                "infer_dtype": "float32",
                "train_dtype": "float32",
                "temperature": 1.0,
                "top_p": 1.0,
                "top_k": -1,
                "min_p": 0.0,
            },
            "rho_grid": list(RHO_GRID),
            "conventions": CONVENTIONS,
            "summary": {"num_tokens": len(tokens), "num_sequences": len(seqs)},
        }
    )
    return path
