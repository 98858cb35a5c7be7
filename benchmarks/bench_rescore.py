"""Rescoring throughput of `measure` against a plain batched forward pass.

Both run the default model on the same batches (same sequences, same padding, same
attention implementation). The plain pass does what a trainer minimally does: forward,
log_softmax, gather the sampled tokens. Ours adds the replayed sampling, entropy, top-K,
eps_hat and the pruned-mass grids. Target: ratio (ours / plain tokens/s) >= 0.9.

Default: 16 sequences x (48 prompt + 128 response) tokens, one padded batch (a couple of
minutes on a 2-core CPU); `--large` scores 64 sequences (several batches), run by
`make bench-large`.

    python benchmarks/bench_rescore.py [--sequences 16] [--response 128] [--repeats 3] [--large]
        [--before REF]   also time the rescoring of git REF (e.g. main), interleaved
        [--profile]      seconds per stage of one batch: body, LM head, per-position parts
        [--memory V]     peak memory of the per-position pass at vocabulary V (a child process)

`MISMATCH_COMPILE=1` / `0` picks the compiled or the eager per-position pass (the default,
`auto`, compiles only for runs of 100,000 positions or more: eager at this size). Numbers
measured on a 2-core CPU: docs/gpu.md ("Rescoring speed").
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's package, not whichever one is installed

from mismatch_cli.models import load_model, provision_default_model  # noqa: E402
from mismatch_cli.rescore import (  # noqa: E402
    Sampling,
    SeqInput,
    forward_logits,
    make_batches,
    score_sequences,
)

try:
    from benchmarks.common import interleaved
except ImportError:  # run as a script from benchmarks/
    from common import interleaved


def package_at(ref: str) -> Any:
    """`mismatch_cli.rescore` as it is at git `ref`, imported under another name."""
    tmp = Path(tempfile.mkdtemp(prefix="mismatch-before-"))
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "mismatch_cli"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    name = "mismatch_before"
    spec = importlib.util.spec_from_file_location(
        name,
        tmp / "mismatch_cli" / "__init__.py",
        submodule_search_locations=[str(tmp / "mismatch_cli")],
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return importlib.import_module(f"{name}.rescore")


def make_seqs(args: argparse.Namespace, V: int) -> list[SeqInput]:
    rng = np.random.default_rng(0)
    return [
        SeqInput(
            rng.integers(0, V, args.prompt).tolist(),
            rng.integers(0, V, args.response).tolist(),
            rng.integers(0, V, (args.response, args.top_k)).astype(np.int32),
            np.full((args.response, args.top_k), -3.0, np.float32),
            np.full(args.response, -3.0),
        )
        for _ in range(args.sequences)
    ]


@torch.inference_mode()
def profile(model: Any, seqs: list[SeqInput], args: argparse.Namespace) -> None:
    """Seconds per stage of the first batch (medians of --repeats): the transformer body, the
    LM head, and each part of the per-position pass (as `rescore.score_logits` runs it)."""
    from mismatch_cli import rescore
    from mismatch_cli.dvp import pruned_mass_grids
    from mismatch_cli.schema import RHO_GRID

    batch = make_batches([(args.prompt, args.response)] * args.sequences, args.batch_tokens)[0]
    bs = [seqs[i] for i in batch]
    ids = torch.tensor([list(s.prompt_token_ids) + list(s.response_token_ids)[:-1] for s in bs])
    T = args.response
    plan = rescore.plan_pass(model, Sampling())
    body = model.model
    state: dict[str, Any] = {}

    def st_body() -> None:
        state["h"] = body(input_ids=ids, use_cache=False).last_hidden_state[:, -T:]

    def st_head() -> None:
        state["logits"] = model.lm_head(state["h"]).reshape(-1, model.config.vocab_size)

    def slices(fn: Any) -> Any:
        def run() -> None:
            z = state["logits"]
            for r in range(0, z.shape[0], plan.rows):
                fn(z[r : r + plan.rows])

        return run

    def stats_parts(z: torch.Tensor) -> None:
        lp, p = torch.log_softmax(z, -1), torch.softmax(z, -1)
        state.update(lp=lp, p=p)

    stages = {
        "forward: transformer body": st_body,
        "forward: LM head": st_head,
        "log_softmax (plain needs it too)": slices(lambda z: torch.log_softmax(z, -1)),
        "softmax": slices(lambda z: torch.softmax(z, -1)),
        "top-K": slices(lambda z: torch.log_softmax(z, -1).topk(args.top_k, 1)),
        "entropy": slices(
            lambda z: rescore._entropy(torch.softmax(z, -1), torch.log_softmax(z, -1), True)
        ),
        "pruned-mass grids": slices(lambda z: pruned_mass_grids(torch.softmax(z, -1), RHO_GRID)),
    }
    times: dict[str, list[float]] = {k: [] for k in stages}
    for _ in range(args.repeats + 1):
        for k, fn in stages.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    # entropy / top-K / grids stages recompute log_softmax / softmax: report the difference
    ls, sm = med["log_softmax (plain needs it too)"], med["softmax"]
    med["top-K"] -= ls
    med["entropy"] -= ls + sm
    med["pruned-mass grids"] -= sm
    total = sum(med.values())
    print(f"profile of one batch ({ids.shape[0]} x {ids.shape[1]} tokens, {T * len(bs)} scored, "
          f"{plan.rows} rows per slice), medians of {args.repeats}:")  # fmt: skip
    for k, v in med.items():
        print(f"  {k:34s} {v:7.3f} s  {v / total:6.1%}")


def memory(V: int, rows: int, sampling: str) -> None:
    """Peak resident memory of the per-position pass over `rows` x V logits, beyond its
    input, against `rescore.bytes_per_row` (run in a fresh child process)."""
    code = f"""
import resource, torch, numpy as np
from mismatch_cli import rescore
from mismatch_cli.rescore import Sampling, PositionPass
s = Sampling(**{sampling})
rows, V = {rows}, {V}
logits = torch.randn(rows, V) * 3
tok = torch.randint(0, V, (rows,)); ids = torch.randint(0, V, (rows, 20))
lqt = torch.full((rows, 20), -3.0); lq = torch.full((rows,), -3.0)
plan = PositionPass(rows=rows, budget_bytes=0, bytes_per_row=0, budget_source="")
rescore.score_logits(logits[:2], tok[:2], ids[:2], lqt[:2], lq[:2], s, 20, plan)  # warm up
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
rescore.score_logits(logits, tok, ids, lqt, lq, s, 20, plan)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(peak - base, rescore.bytes_per_row(V, s) * rows)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    used, model = (int(x) for x in out.stdout.split())
    print(f"  V={V:,} rows={rows} {sampling}: peak {used / 2**20:7.0f} MiB beyond the input, "
          f"{used / (4 * V * rows):.1f} arrays; budgeted {model / 2**20:7.0f} MiB")  # fmt: skip


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
    ap.add_argument("--before", metavar="REF", help="also time the rescoring of git REF")
    ap.add_argument("--profile", action="store_true", help="seconds per stage of one batch")
    ap.add_argument("--memory", type=int, metavar="V", help="peak memory of the pass at vocab V")
    args = ap.parse_args()
    if args.large:
        args.sequences = 64
    if args.memory:
        print(f"per-position pass memory at V={args.memory:,} (child processes):")
        for sampling in ("{}", "{'temperature': 0.7, 'top_p': 0.9}"):
            memory(args.memory, 64, sampling)
        return

    torch.manual_seed(0)
    device = torch.device("cpu")
    model, _ = load_model(str(provision_default_model()), args.dtype, device)
    V = model.config.vocab_size
    seqs = make_seqs(args, V)
    if args.profile:
        profile(model, seqs, args)
        return
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

    fns = {"plain": plain, "ours": ours}
    if args.before:
        before = package_at(args.before)
        bseqs = [before.SeqInput(*(getattr(s, f) for f in s.__dataclass_fields__)) for s in seqs]
        fns["before"] = lambda: before.score_sequences(
            model, bseqs, before.Sampling(), args.top_k, device, args.batch_tokens
        )
    t = interleaved(fns, repeats=args.repeats)
    tps = {k: n_tokens / v for k, v in t.items()}
    ratio = tps["ours"] / tps["plain"]
    print(
        f"rescore benchmark: {n_tokens} tokens in {len(batches)} batches, {args.dtype}, "
        f"median of {args.repeats} (interleaved)"
    )
    print(f"  plain forward+log_softmax+gather: {tps['plain']:8.0f} tokens/s")
    print(f"  measure's rescoring:               {tps['ours']:8.0f} tokens/s")
    if args.before:
        print(f"  rescoring at {args.before}:{'':>{20 - len(args.before)}}{tps['before']:8.0f} tokens/s"
              f"  (ratio {tps['before'] / tps['plain']:.3f})")  # fmt: skip
    print(
        f"  ratio ours/plain = {ratio:.3f}  (target >= 0.90: {'met' if ratio >= 0.9 else 'NOT met'})"
    )
    print(json.dumps({"ratio": round(ratio, 4), **{f"{k}_s": round(v, 3) for k, v in t.items()}}))


if __name__ == "__main__":
    main()
