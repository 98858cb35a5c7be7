"""Rescoring throughput of `measure` against a plain batched forward pass.

Both run the default model on the same batches (same sequences, same padding, same
attention implementation). The plain pass does what a trainer minimally does: forward,
log_softmax, gather the sampled tokens. Ours adds the replayed sampling, entropy, top-K,
eps_hat and the pruned-mass grids. Target: ratio (ours / plain tokens/s) >= 0.9.

Default: 16 sequences x (48 prompt + 128 response) tokens, one padded batch (a couple of
minutes on a 2-core CPU); `--large` scores 64 sequences (several batches), run by
`make bench-large`.

    python benchmarks/bench_rescore.py [--sequences 16] [--response 128] [--repeats 3] [--large]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from mismatch_cli.models import load_model, provision_default_model
from mismatch_cli.rescore import Sampling, SeqInput, forward_logits, make_batches, score_sequences

try:
    from benchmarks.common import interleaved
except ImportError:  # run as a script from benchmarks/
    from common import interleaved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=48)
    ap.add_argument("--response", type=int, default=128)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--large", action="store_true", help="64 sequences")
    args = ap.parse_args()
    if args.large:
        args.sequences = 64

    torch.manual_seed(0)
    device = torch.device("cpu")
    model, _ = load_model(str(provision_default_model()), args.dtype, device)
    rng = np.random.default_rng(0)
    V = model.config.vocab_size
    seqs = [
        SeqInput(
            rng.integers(0, V, args.prompt).tolist(),
            rng.integers(0, V, args.response).tolist(),
            rng.integers(0, V, (args.response, args.top_k)).astype(np.int32),
            np.full((args.response, args.top_k), -3.0, np.float32),
            np.full(args.response, -3.0),
        )
        for _ in range(args.sequences)
    ]
    n_tokens = args.sequences * args.response
    batches = make_batches([(args.prompt, args.response)] * args.sequences, args.batch_tokens)

    @torch.inference_mode()
    def plain() -> None:
        for b in batches:
            bs = [seqs[i] for i in b]
            logits, _ = forward_logits(model, bs, device)
            toks = torch.cat([torch.tensor(s.response_token_ids) for s in bs])
            torch.log_softmax(logits.float(), -1).gather(1, toks[:, None])

    def ours() -> None:
        score_sequences(model, seqs, Sampling(), args.top_k, device, args.batch_tokens)

    t = interleaved({"plain": plain, "ours": ours}, repeats=args.repeats)
    tps = {k: n_tokens / v for k, v in t.items()}
    ratio = tps["ours"] / tps["plain"]
    print(
        f"rescore benchmark: {n_tokens} tokens in {len(batches)} batches, {args.dtype}, "
        f"median of {args.repeats} (interleaved)"
    )
    print(f"  plain forward+log_softmax+gather: {tps['plain']:8.0f} tokens/s")
    print(f"  measure's rescoring:               {tps['ours']:8.0f} tokens/s")
    print(
        f"  ratio ours/plain = {ratio:.3f}  (target >= 0.90: {'met' if ratio >= 0.9 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
