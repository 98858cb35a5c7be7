"""Generation phase of `measure` against a bare `LLM.generate` with the same sampling params.

One vLLM engine serves both, run alternately (median of --repeats). Ours = `VllmEngine.generate`
(the same call plus the rich progress adapter and the conversion of every position's top-K
log-probs into arrays). Target: ratio (bare time / ours time) >= 0.95.

The default size (16 prompts x 2 samples x <= 32 tokens, 8 timed or warm-up calls: <= 8.2k
generated tokens) takes a few minutes on a 2-core CPU; `--large` is the earlier default
(32 x 2 x 64, <= 32.8k tokens, ~20 minutes there), run by `make bench-large`.

    python benchmarks/bench_generate.py [--prompts 16] [--samples 2] [--max-tokens 32] [--large]
"""

from __future__ import annotations

import argparse
import os


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--large", action="store_true", help="32 prompts x 2 x 64 tokens")
    args = ap.parse_args()
    if args.large:
        args.prompts, args.max_tokens = 32, 64
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from mismatch_cli.config import MeasureConfig
    from mismatch_cli.models import load_tokenizer, provision_default_model
    from mismatch_cli.prompts import builtin_prompts, encode_prompts
    from mismatch_cli.rollout import VllmEngine

    try:
        from benchmarks.common import interleaved
    except ImportError:
        from common import interleaved

    path = str(provision_default_model())
    cfg = MeasureConfig(
        samples_per_prompt=args.samples, max_tokens=args.max_tokens, enforce_eager=True
    )
    ids = encode_prompts(builtin_prompts()[: args.prompts], load_tokenizer(path), True)
    prompts = list(enumerate(ids))
    engine = VllmEngine(path, cfg)
    from vllm.inputs import TokensPrompt

    inputs = [TokensPrompt(prompt_token_ids=x) for x in ids]
    params = [engine.sampling_params(pid) for pid, _ in prompts]

    def bare() -> None:
        engine.llm.generate(inputs, params, use_tqdm=False)

    def ours() -> None:
        engine.generate(prompts, lambda n: None)

    t = interleaved({"bare": bare, "ours": ours}, repeats=args.repeats)
    ratio = t["bare"] / t["ours"]
    n = args.prompts * args.samples
    print(
        f"generate benchmark: {n} completions x <= {args.max_tokens} tokens, top-{cfg.top_logprobs} "
        f"processed log-probs, median of {args.repeats} (interleaved)"
    )
    print(f"  bare LLM.generate:     {t['bare']:.2f} s")
    print(f"  measure's generation:  {t['ours']:.2f} s")
    print(
        f"  ratio bare/ours = {ratio:.3f}  (target >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'})"
    )
    engine.close()


if __name__ == "__main__":
    main()
