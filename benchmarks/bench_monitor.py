"""The trainer-side monitor's cost per step against the step it watches.

`StepMonitor.update` on a step's [B, T] log-probs and mask (what the slime and SkyRL
plug-ins call), with and without the training side's logits (DVP pruned mass), against a
transformers forward + backward of the default model (SmolLM2-135M, float32, eager
attention) over the same B x T tokens: what a trainer minimally does per step. Target: the
monitor costs <= 1% of the forward + backward. The numbers hold for the device named in the
output (this benchmark runs on the CPU: on a GPU the forward + backward is far faster, and
the monitor's CPU side is not).

Default: 4 sequences x 256 tokens, median of 3 interleaved repeats (a couple of minutes on
a 2-core CPU); `--large`: 8 x 512.

    python benchmarks/bench_monitor.py [--batch 4] [--length 256] [--repeats 3] [--large]
        [--profile]   where the monitor's time goes (cProfile of a few updates)
"""

from __future__ import annotations

import argparse
import cProfile
import platform
import pstats
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's package, not whichever one is installed

from mismatch_cli.models import load_model, provision_default_model  # noqa: E402
from mismatch_cli.monitor import StepMonitor  # noqa: E402

try:
    from benchmarks.common import interleaved
except ImportError:  # run as a script from benchmarks/
    from common import interleaved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--large", action="store_true", help="8 x 512 tokens")
    ap.add_argument("--profile", action="store_true", help="cProfile of the monitor's updates")
    args = ap.parse_args()
    if args.large:
        args.batch, args.length = 8, 512
    B, T = args.batch, args.length

    torch.manual_seed(0)
    device = torch.device("cpu")
    model, _ = load_model(str(provision_default_model()), "float32", device)
    for p in model.parameters():
        p.requires_grad_(True)
    V = model.config.vocab_size
    ids = torch.randint(0, V, (B, T + 1))
    inp, tok = ids[:, :-1], ids[:, 1:]
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1:, T - T // 4 :] = False  # some right padding, as a trainer's batch has

    with torch.no_grad():
        logits = model(inp).logits.float()  # [B, T, V]: what the training forward holds
    logp_train = torch.log_softmax(logits, -1).gather(-1, tok[..., None])[..., 0]  # [B, T]
    rng = np.random.default_rng(0)
    logp_infer = logp_train + torch.from_numpy(rng.normal(0, 0.02, (B, T)).astype(np.float32))
    logp_infer = logp_infer.clamp(max=0.0)

    def fwd_bwd() -> None:
        out = model(inp).logits.float()
        lp = torch.log_softmax(out, -1).gather(-1, tok[..., None])[..., 0]
        loss = -(lp * mask).sum() / mask.sum()
        loss.backward()
        model.zero_grad(set_to_none=True)

    plain, with_logits = StepMonitor(), StepMonitor()

    def monitor() -> None:
        plain.update(logp_infer, logp_train, mask)

    def monitor_logits() -> None:
        with_logits.update(logp_infer, logp_train, mask, logits=logits)

    if args.profile:
        for name, fn in (("monitor", monitor), ("monitor + logits", monitor_logits)):
            fn()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(3):
                fn()
            prof.disable()
            print(f"== {name}: 3 updates")
            pstats.Stats(prof).sort_stats("cumulative").print_stats(18)
        return

    t = interleaved(
        {"fwd_bwd": fwd_bwd, "monitor": monitor, "monitor_logits": monitor_logits},
        repeats=args.repeats,
    )
    n = int(mask.sum())
    print(
        f"monitor benchmark: {B} x {T} positions ({n} tokens under the mask), V={V}, "
        f"device cpu ({torch.get_num_threads()} threads, {platform.processor() or 'cpu'}), "
        f"median of {args.repeats} (interleaved)"
    )
    print(f"  forward + backward (SmolLM2-135M, float32): {t['fwd_bwd']:8.3f} s")
    print(f"  StepMonitor.update:                         {t['monitor']:8.4f} s")
    print(f"  StepMonitor.update with logits (DVP mass):  {t['monitor_logits']:8.4f} s")
    r0, r1 = t["monitor"] / t["fwd_bwd"], t["monitor_logits"] / t["fwd_bwd"]
    print(f"  ratio monitor / forward+backward:           {r0:8.2%}  (target <= 1%)")
    print(f"  ratio monitor with logits / fwd+bwd:        {r1:8.2%}  (target <= 1%)")


if __name__ == "__main__":
    main()
